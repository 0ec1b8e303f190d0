"""Suite-0 cipher: tag verification, refusals, and the two-call open path.

The open path never returns a plaintext unless the 12-byte tag verified:
every single-bit flip, every truncation and every appended byte of sealed
DB / DC / 0x21 frames is refused, with the error the header position implies.
"""

from __future__ import annotations

import hmac

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol import Opener, ProtocolError, ReceiveCounter, Suite0Cipher, open_apdu, parse_apdu, seal_apdu
from ami.protocol.errors import AuthenticationFailed, FrameTooLarge, MalformedFrame, UnsupportedSecurity
from ami.protocol.frames import (
    GENERAL_DED_CIPHERING,
    GENERAL_GLO_CIPHERING,
    GLO_INITIATE_REQUEST,
    encode_apdu,
)
from ami.protocol import cipher as cipher_module
from ami.protocol.cipher import check_security_control
from ami.protocol.frames import iv_for

from ._util import AK, ALL_TAGS, EK, FAST, QUICK, cipher, flips, ics, keys16, secret, titles

METER = bytes.fromhex("4C4E4B0000BC614E")
OTHER = bytes.fromhex("4C4E4B0000BC614F")
PLAINTEXT = bytes.fromhex("88a174a272 64".replace(" ", "")) + b"a reading of about forty bytes."
FRAME_IC = 0x00ABCDEF


def sealed(tag: int, sc: int = 0x30) -> bytes:
    return seal_apdu(cipher(), tag, METER, FRAME_IC, PLAINTEXT, security_control=sc)


FRAMES = {
    "DB": (sealed(GENERAL_GLO_CIPHERING), 11),  # (frame, offset of SC)
    "DC": (sealed(GENERAL_DED_CIPHERING), 11),
    "21": (sealed(GLO_INITIATE_REQUEST), 2),
    "DC-auth-only": (sealed(GENERAL_DED_CIPHERING, 0x10), 11),
}


def _open(frame: bytes) -> bytes:
    """What a receiver does with the bytes, title given as from the association."""
    apdu = parse_apdu(frame)
    return open_apdu(cipher(), apdu, METER if apdu.system_title is None else None)


@pytest.mark.parametrize("name", list(FRAMES))
def test_frames_open_untouched(name):
    frame, _ = FRAMES[name]
    assert _open(frame) == PLAINTEXT


@pytest.mark.parametrize("name", list(FRAMES))
def test_every_single_bit_flip_is_refused(name):
    frame, sc_at = FRAMES[name]
    general = frame[0] in (GENERAL_GLO_CIPHERING, GENERAL_DED_CIPHERING)
    seen = 0
    for i, bit, mutated in flips(frame):
        with pytest.raises(ProtocolError) as info:
            _open(mutated)
        exc = info.value
        assert isinstance(exc, (AuthenticationFailed, MalformedFrame)), (i, bit, exc)
        if i == 0 or i == sc_at - 1 or (general and i == 1):
            # APDU tag, length octet, system-title length: framing errors.
            assert isinstance(exc, MalformedFrame), (i, bit, exc)
        elif i == sc_at:
            flipped = mutated[i]
            if flipped in (0x10, 0x30):  # still a valid SC: then the tag catches it
                assert isinstance(exc, AuthenticationFailed), (i, bit, exc)
            else:
                assert isinstance(exc, UnsupportedSecurity), (i, bit, hex(flipped), exc)
        else:
            # System title, IC (both in the IV), ciphertext, tag: all authenticated.
            assert isinstance(exc, AuthenticationFailed), (i, bit, exc)
        seen += 1
    assert seen == 8 * len(frame)


@pytest.mark.parametrize("name", list(FRAMES))
def test_bit_flips_through_an_opener_never_move_the_counter(name):
    frame, _ = FRAMES[name]
    opener = Opener(cipher(), METER, ReceiveCounter(FRAME_IC))
    for i, bit, mutated in flips(frame):
        try:
            apdu = parse_apdu(mutated)
        except MalformedFrame:
            continue
        with pytest.raises((AuthenticationFailed, MalformedFrame, ProtocolError)):
            opener.open(apdu)
        assert opener.counter.lowest_acceptable == FRAME_IC, (i, bit)
    assert opener.open(parse_apdu(frame)) == PLAINTEXT
    assert opener.counter.lowest_acceptable == FRAME_IC + 1


@pytest.mark.parametrize("name", list(FRAMES))
def test_every_truncation_is_refused(name):
    frame, _ = FRAMES[name]
    for n in range(len(frame)):
        with pytest.raises(MalformedFrame):
            parse_apdu(frame[:n])


@pytest.mark.parametrize("name", list(FRAMES))
def test_every_appended_byte_is_refused(name):
    frame, _ = FRAMES[name]
    for b in range(256):
        with pytest.raises(MalformedFrame):
            parse_apdu(frame + bytes((b,)))
    with pytest.raises(MalformedFrame):
        parse_apdu(frame + frame)


@pytest.mark.parametrize("name", list(FRAMES))
def test_reframed_truncations_fail_the_tag(name):
    """Cut the body but fix the length octet: the frame parses, the tag fails."""
    frame, _ = FRAMES[name]
    apdu = parse_apdu(frame)
    for cut in range(1, len(apdu.body) + 1):
        body = apdu.body[:-cut]
        raw = encode_apdu(apdu.tag, apdu.security_control, apdu.invocation_counter, body, apdu.system_title)
        with pytest.raises((AuthenticationFailed, MalformedFrame)) as info:
            _open(raw)
        if len(body) >= 12:
            assert isinstance(info.value, AuthenticationFailed)
        # A longer body (tag repeated, zero-padded) fails too.
    for extra in (b"\x00", apdu.body[-12:]):
        raw = encode_apdu(
            apdu.tag, apdu.security_control, apdu.invocation_counter, apdu.body + extra, apdu.system_title
        )
        with pytest.raises(AuthenticationFailed):
            _open(raw)


@pytest.mark.parametrize("sc", [0x30, 0x10])
def test_wrong_key_ak_or_title_fail_authentication(sc):
    good_ek, good_ak = bytes(range(1, 17)), bytes(range(101, 117))
    secret(good_ek, good_ak)
    frame = seal_apdu(Suite0Cipher(good_ek, good_ak), 0xC8, METER, 7, PLAINTEXT, security_control=sc)
    apdu = parse_apdu(frame)
    assert open_apdu(cipher(good_ek, good_ak), apdu, METER) == PLAINTEXT
    wrong = bytes(range(2, 18))
    with pytest.raises(AuthenticationFailed):
        open_apdu(cipher(wrong, good_ak), apdu, METER)
    with pytest.raises(AuthenticationFailed):
        open_apdu(cipher(good_ek, wrong), apdu, METER)
    with pytest.raises(AuthenticationFailed):
        open_apdu(cipher(good_ek, good_ak), apdu, OTHER)  # another sender's IV


@FAST
@given(ek=keys16, ak=keys16, ek2=keys16, ak2=keys16, title=titles, title2=titles, ic=ics, sc=st.sampled_from([0x30, 0x10]))
def test_wrong_material_always_fails(ek, ak, ek2, ak2, title, title2, ic, sc):
    secret(ek, ak, ek2, ak2)
    body = Suite0Cipher(ek, ak).seal(sc, iv_for(title, ic), PLAINTEXT)
    if ek2 != ek:
        with pytest.raises(AuthenticationFailed):
            Suite0Cipher(ek2, ak).open(sc, iv_for(title, ic), body)
    if ak2 != ak:
        with pytest.raises(AuthenticationFailed):
            Suite0Cipher(ek, ak2).open(sc, iv_for(title, ic), body)
    if title2 != title:
        with pytest.raises(AuthenticationFailed):
            Suite0Cipher(ek, ak).open(sc, iv_for(title2, ic), body)
    if ic != 0:
        with pytest.raises(AuthenticationFailed):
            Suite0Cipher(ek, ak).open(sc, iv_for(title, ic - 1), body)
    other_sc = 0x10 if sc == 0x30 else 0x30  # the whole SC byte is authenticated
    with pytest.raises((AuthenticationFailed, MalformedFrame)):
        Suite0Cipher(ek, ak).open(other_sc, iv_for(title, ic), body)


REFUSED_SC = [0x00, 0x20, 0x80, 0x40, 0x50, 0x70, 0x90, 0xB0, 0xF0] + [0x30 | s for s in range(1, 16)] + [
    0x10 | s for s in range(1, 16)
]


@pytest.mark.parametrize("sc", REFUSED_SC, ids=hex)
def test_refused_security_controls(sc):
    c = cipher()
    iv = iv_for(METER, 1)
    with pytest.raises(UnsupportedSecurity):
        check_security_control(sc)
    with pytest.raises(UnsupportedSecurity):
        c.seal(sc, iv, PLAINTEXT)
    with pytest.raises(UnsupportedSecurity):
        c.open(sc, iv, bytes(40))
    with pytest.raises(UnsupportedSecurity):
        seal_apdu(c, 0xDB, METER, 1, PLAINTEXT, security_control=sc)
    raw = encode_apdu(0xDB, sc, 1, bytes(40), METER)
    with pytest.raises(UnsupportedSecurity):
        parse_apdu(raw)
    if sc != 0x20:  # only plain "encryption only" is ever opted into
        with pytest.raises(UnsupportedSecurity):
            parse_apdu(raw, allow_unauthenticated=True)
        with pytest.raises(UnsupportedSecurity):
            c.open(sc, iv, bytes(40), allow_unauthenticated=True)


def test_accepted_security_controls():
    assert check_security_control(0x30) == 0x30
    assert check_security_control(0x10) == 0x10
    assert check_security_control(0x20, allow_unauthenticated=True) == 0x20
    with pytest.raises(UnsupportedSecurity):
        cipher().seal(0x20, iv_for(METER, 1), PLAINTEXT)  # never *sent* unauthenticated


def test_body_shorter_than_tag():
    c = cipher()
    for n in range(12):
        with pytest.raises(MalformedFrame):
            c.open(0x30, iv_for(METER, 1), bytes(n))
        with pytest.raises(MalformedFrame):
            c.open(0x10, iv_for(METER, 1), bytes(n))


def test_tag_is_compared_with_compare_digest(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(cipher_module.hmac, "compare_digest", spy)
    frame, _ = FRAMES["DC"]
    assert _open(frame) == PLAINTEXT
    with pytest.raises(AuthenticationFailed):
        _open(frame[:-1] + bytes((frame[-1] ^ 1,)))
    assert calls == [(12, 12), (12, 12)]


def test_seal_layout_and_lengths():
    c = cipher()
    iv = iv_for(METER, 5)
    out = c.seal(0x30, iv, PLAINTEXT)
    assert len(out) == len(PLAINTEXT) + 12
    out10 = c.seal(0x10, iv, PLAINTEXT)
    assert out10[:-12] == PLAINTEXT and len(out10) == len(PLAINTEXT) + 12
    assert c.seal(0x30, iv, b"") == c.seal(0x30, iv, b"")[:12] and len(c.seal(0x30, iv, b"")) == 12
    assert c.open(0x30, iv, c.seal(0x30, iv, b"")) == b""
    assert c.open(0x10, iv, c.seal(0x10, iv, b"")) == b""


def test_constructor_and_repr():
    for bad in (b"", bytes(15), bytes(17), bytes(32)):
        with pytest.raises(ValueError):
            Suite0Cipher(bad, AK)
        with pytest.raises(ValueError):
            Suite0Cipher(EK, bad)
    c = Suite0Cipher(bytearray(EK), memoryview(AK))
    assert repr(c) == "<Suite0Cipher>" and str(c) == "<Suite0Cipher>"
    assert not hasattr(c, "__dict__")


def _reference_open(ek: bytes, ak: bytes, sc: int, iv: bytes, body: bytes) -> bytes:
    """An independent opener: cryptography's GCM mode with min_tag_length=12."""
    text, tag = body[:-12], body[-12:]
    dec = Cipher(algorithms.AES(ek), modes.GCM(iv, tag, min_tag_length=12)).decryptor()
    if sc == 0x30:
        dec.authenticate_additional_data(bytes((sc,)) + ak)
        out = dec.update(text)
    else:
        dec.authenticate_additional_data(bytes((sc,)) + ak + text)
        out = text
    dec.finalize()
    return out


@FAST
@given(
    ek=keys16,
    ak=keys16,
    title=titles,
    ic=ics,
    sc=st.sampled_from([0x30, 0x10]),
    tag=st.sampled_from(ALL_TAGS),
    plaintext=st.binary(max_size=3000),
)
def test_round_trip_and_reference(ek, ak, title, ic, sc, tag, plaintext):
    secret(ek, ak)
    c = Suite0Cipher(ek, ak)
    frame = seal_apdu(c, tag, title, ic, plaintext, security_control=sc)
    apdu = parse_apdu(frame)
    assert (apdu.tag, apdu.security_control, apdu.invocation_counter) == (tag, sc, ic)
    assert apdu.system_title == (title if tag in (0xDB, 0xDC) else None)
    assert open_apdu(c, apdu, title) == plaintext
    iv = iv_for(title, ic)
    assert _reference_open(ek, ak, sc, iv, apdu.body) == plaintext
    # One flipped bit anywhere in the body is caught.
    i = (ic ^ len(plaintext)) % len(apdu.body)
    bad = bytearray(apdu.body)
    bad[i] ^= 1 << (ic % 8)
    with pytest.raises(AuthenticationFailed):
        c.open(sc, iv, bytes(bad))


@pytest.mark.parametrize("size", [4096 - 20, 4096, 65_535, 65_536, 200_000])
@pytest.mark.parametrize("tag", [0xDB, 0x21])
def test_oversized_frames_refused_on_seal(size, tag):
    # Typed error at every size: above 65535 bytes encode_length used to
    # raise a bare ValueError instead of FrameTooLarge.
    with pytest.raises(FrameTooLarge):
        seal_apdu(cipher(), tag, METER, 1, bytes(size))


@QUICK
@given(ek=keys16, ak=keys16, title=titles, ic=ics, plaintext=st.binary(max_size=200))
def test_gcm_encrypt_equals_reference_tag(ek, ak, title, ic, plaintext):
    """The 12-byte tag is the first 12 bytes of the standard 16-byte GCM tag."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    secret(ek, ak)
    iv = iv_for(title, ic)
    full = AESGCM(ek).encrypt(iv, plaintext, b"\x30" + ak)
    assert Suite0Cipher(ek, ak).seal(0x30, iv, plaintext) == full[:-4]
