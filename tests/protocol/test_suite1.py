"""DLMS security suite 1: every public vector byte for byte, properties, fuzz.

Vectors are copied from the team fact sheet on suite 1 (Green Book tables as
quoted by public stacks, each recomputed with ``cryptography``); tests must
not read ../shared, so they live here with their provenance.  The GB
signatures are randomized: they can only be *verified*.  Our own signatures
are deterministic (RFC 6979), so the one derived server signature is also
reproduced byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from ami.protocol import ProtocolError, open_apdu, parse_apdu, seal_apdu
from ami.protocol.errors import AuthenticationFailed, MalformedFrame, MalformedMessage, UnsupportedSecurity
from ami.protocol.frames import iv_for
from ami.protocol.keys import KeyId
from ami.protocol.suite1 import (
    AES_GCM_128,
    AES_WRAP_128,
    SC1_AUTH,
    SC1_AUTH_ENC,
    SC1_ENC,
    EcdhAgreement,
    InvalidPublicKey,
    KeyAgreementEntry,
    SignatureInvalid,
    Signer,
    SoftwareEcdh,
    SoftwareSigner,
    Suite1Cipher,
    agree_ephemeral_unified,
    agree_one_pass_originator,
    agree_one_pass_recipient,
    agree_static_unified,
    answer_key_agreement,
    check_suite1_security_control,
    decode_key_agreement,
    decode_one_pass_key_data,
    decode_public_key,
    decode_signature,
    encode_key_agreement,
    encode_public_key,
    encode_signature,
    ephemeral_unified_other_info,
    finish_key_agreement,
    hls7_client_signed_data,
    hls7_server_signed_data,
    kdf,
    offer_ephemeral_key,
    one_pass_other_info,
    parse_suite1_apdu,
    private_key_from_scalar,
    scalar_from_rng,
    security_control,
    start_key_agreement,
    static_unified_other_info,
    suite_of,
    verify_signature,
)

from ._util import AK, EK, FAST, FUZZ, IC, QUICK, SPECIFIC_TAGS, SYSTEM_TITLE, VECTORS, flips, mutate, mutation, secret, titles

h = bytes.fromhex

# --- vectors (fact sheet §7; Green Book Ed. 8 Table C.1/C.2/41, "page 502") ------

ST_C = h("4D4D4D0000BC614E")  # client, party U
ST_S = h("4D4D4D0000000001")  # server
ALG_ID = h("60857405080300")

#: (private scalar d, public key X||Y): CX ECDSASignatureImplTest / KeyAgreementImplTest, GX-JT.
CLIENT_SIGN = (
    h("418073C239FA6125011DE4D6CD2E645780289F761BB21BFB0835CB5585E8B373"),
    h("BAAFFDE06A8CB1C9DAE8D94023C601DBBB249254BA22EDD827E820BCA2BCC643"
      "62FBB83D86A82B87BB8B7161D2AAB5521911A946B97A284A90F7785CD9047D25"),
)
SERVER_SIGN = (
    h("AE55414FFE079F9FC95649536BD1C2B5653D200813727E07D501A8B550C69207"),
    h("933ACF15B03A9248E029B2787FB52A0AECAF635F07C42A0019FB3197E38F8F54"
      "9A125EA36781B0CA96BE89A0E1FE2CF9B7361ED48B3C5E24592B9C0F4EDD31D1"),
)
CLIENT_KA = (
    h("A51C16FF5C498FCC89323D4A9267CD71BF81FD6F6A891CD240DA7F3D6F283E65"),
    h("07C56DE2DCAF0FD793EF29F019C89B4A0CC1E001CE94F4FFBE10BC05E7E66F76"
      "71A13FBCF9E662B9826FFF6A6938546D524ED6D3405F020296BDE16B04F7A7C2"),
)
SERVER_KA = (
    h("AAD3FD0732E991CF52A74C66C1F2827DDC53522A2E0A169D7C4FFCC0FB5D6A4D"),
    h("A653565B0E06070BAE9FBE140A5D2156812AEE2DD525053E3EFC850BF13BFDFF"
      "CB240BC7B77BFF5883344E7275908D2287BEFA3725017295A096989D2338290B"),
)
GB_KEY_PAIRS = {"client-sign": CLIENT_SIGN, "server-sign": SERVER_SIGN, "client-ka": CLIENT_KA, "server-ka": SERVER_KA}

# §7.1 Ephemeral Unified Model (GB Table C.1)
EUM_CLIENT_EPH_Q = h(
    "2914D60E10AB705F62ED6CC349D7CB99B9AB3F3978E59278C7AF595B3AF98794"
    "1372DAB6D5AF1FA867E134167E6F23DE664A6693E05F43414611058D1B48F894"
)
EUM_CLIENT_SIG = h(  # over 00 || client ephemeral Q
    "06F0607702AA0E2435A183E2F6B1ECD19629712E389A213610C03F77B2590860"
    "EA840AF5C3FA1F2BCDF055D4744E9A01CE9A0E55026BCAA4EEBEB764CED64BB3"
)
EUM_SERVER_EPH = (
    h("34A8C23A34DBB519D09B245754C85A6CFE05D14A063EFA5AA41545AA8241EFAE"),
    h("95F41066009B185B074F5FFFF736B71C325FCADB2BC0CF1A4F4B17BBE7AB81D6"
      "2946506BC8169C7B539B39A5D8463787F449C9BD2583FA67A1075B0DBFC638BA"),
)
EUM_Z = h("C1CF8FE7891AEF3617D7190795E61FE6C24EFC3CCA2E08469BAD1A225CE6EA08")
EUM_K = h("C5F4512846EDE51CFB8CCF59F08A694E")  # CX NIST_SP_800_56_KDFTest EXPECTED_GUEK_CLIENT
#: Derived (not published): RFC 6979 signature of 00 || server ephemeral Q by the server signing key.
EUM_SERVER_SIG = h(
    "5991368E3D65EE1668B2D025F8A7C6FFA5ADC8DCF8E9770B7A4E50472066D638"
    "944476D228DE2E487DBEB2B0FF3883FD9AD8E5C6502802BE2BE194E82F2B4E1F"
)

# §7.2 One-Pass DH client -> server (GB Table C.2 / Table 41)
OP_CLIENT_EPH = (
    h("47DAB03842E5B6E74828EF4F449B378D7DD1A5DAE1FFCA5AE0B0BE0AD18EC57E"),
    h("C323C2BD45711DE4688637D919F92E9DB8FB2DFC213A88D21C9DC8DCBA917D81"
      "70511DE1BADB360D50058F794B0960AE11FA28D392CFF907A62D13E3357B1DC0"),
)
OP_CLIENT_SIG = h(  # over the bare Q
    "B51BE089D0B682863B2217201E73A1A9031968A9B4121DCBC3281A69739AF874"
    "29F5B3AC5471E7B6A04A2C0F2F8A25FD772A317DF97FC5463FEAC248EB8AB8BE"
)
OP_Z = h("0D4385BA0DD756CBCAB9887EB538396EE8F090A14C1079B4359F115B977F4615")
OP_K = h("59A71FD81C929A86A99438DA17A66C05")
OP_HASH = h("59A71FD81C929A86A99438DA17A66C058C6A93FD3065F5EE16A05D775927659B")
TABLE_41 = h(
    "DD080102030405060708084D4D4D0000BC614E084D4D4D00000000010000010201018180"
    "C323C2BD45711DE4688637D919F92E9DB8FB2DFC213A88D21C9DC8DCBA917D8170511DE1BADB360D50058F794B0960AE11FA28D392CFF907A62D13E3357B1DC0"
    "B51BE089D0B682863B2217201E73A1A9031968A9B4121DCBC3281A69739AF87429F5B3AC5471E7B6A04A2C0F2F8A25FD772A317DF97FC5463FEAC248EB8AB8BE"
    "81EB3100000000"
    "F435069679270C5BF4425EE5777402A6C8D51C620EED52DBB188378B836E2857D5C053E6DDF27FA87409AEF502CD9618AE47017C010224FD109CC0BEB21E742D"
    "44AB40CD11908743EC90EC8C40E221D517F72228E1A26E827F43DC18ED27B5F458D66508B05A2A4CC6FED178C881AFC3BC67064689BE8BB41C80ABB3C114A31F"
    "4CB03B8B64C7E0B4CE77B2399C93347858888F92239713B38DF01C4858245827A92EF334172EA636B31CBBDF2A96AD5D035F66AA38F1A2D97D4BBA99622E6B5F"
    "18789CECB2DFB3937D9F3E17F8B472098E6563238F37528374809836002AEA6E7012D2ADFAA7"
)
TABLE_41_PLAINTEXT = h(
    "D94000000000040100010000600100FF020100080000010000FF0202001400000D0000FF0702001400000D0000FF0804000001040203"
    "090100090CFFFFFFFFFFFFFF00000000000901FF0203090101090CFFFFFFFFFFFFFF00000000000901FF0203090102090CFFFFFFFFFF"
    "FFFF00000000000901FF0203090103090CFFFFFFFFFFFFFF00000000000901FF0104020809010011FF11FF11FF11FF11FF11FF11FF02"
    "080901011102110111011101110111011101020809010211FF11FF11FF11FF11FF11FF11FF02080901031101110211021102110211021102"
)

# §7.3 One-Pass DH server -> client
OP_SERVER_EPH_Q = h(
    "6439724714B47CD9CB988897D8424AB946DCD083D37A954637616011B9C23787"
    "73295F0F850D8DAFD1BBE9FE666E53E4F097CD10B38B69622152724A90987444"
)
OP_SERVER_SIG = h(
    "E1FF47974A1F6931A6502F58147463F0E8CC517D47F55B0AC56DD8AC5C9D0E48"
    "1934F2D90F9893016BD82B6E3FFE21FF1588F3278B4E9D98EB4FB62ADD64B380"
)
OP_S2C_Z = h("2B4302DC49790E2E78D990CFB52ED6E2F273DECE441A2D95E4301B93812A9FAC")
OP_S2C_K = h("F0184BDA9466BFA4601A64A7EF46504A")  # CX EXPECTED_GUEK_SERVER

# §7.4 Static Unified Model
SU_Z = h("B1455B2AD5F68BCFFE6AD5412BA89548ACA7E0CBF4B1560D6A57496F15E931AD")
SU_TXID = h("0102030405060708")
SU_K = h("56C46B57DF675515C31025455822514A")  # GX-JT block cipher key
SU_CIPHERTEXT_TAG = h(
    "607581D83815281B561904E6A72B83BF3FB0B1F2A0A23A82A804B39911F6CB1B4EF9B6F76C6338ED058014FFBF4A13A162E0EED11EEB8F597757A18215F28E1D"
    "3FC2D44586C4B8AFE4500B535B579506CDB925CBEFF7F1CF6BF96C583B9CF588FE8F6B01A574824D7CEC597F057FFA8700AF12AD63A7FA72040439F4392C089B"
    "265F9EB1AC308239906DC04E1A8712ABE383CF92349842EBA166EF2E9EB2F53D0DBA025D79875463398BBC3007BC4A6FC12780C21EE1ABF080BF0FA926242834"
    "C0AC30D55A1EF8856E7DED48621F17FDF4D5B54EDDADD874119251049B6AEE111C12FBC2FEAF"
)

# §7.5: the three CX KeyAgreementImplTest keys contradict CX's own KDF test; never to be produced.
WRONG_CX_KEYS = {h("E025CA6F9EE8D2B40F993739D44CFBC0"), h("8CD08FF02EAC71712DE8449DC8331833"), h("E357F06755CBF5C2C31457FE3CD1D5B8")}

# §1.2: the suite-0 glo-get-request of vectors.json with SC 0x31 (derived, recomputed).
GET_REQUEST = next(v for v in VECTORS["vectors"] if v["name"] == "glo-get-request, auth+enc")
SC31_APDU = h("C81E3101234567411312FF935A47566827C467BCE8691C99484B00B2449055B5")

ALL_PRIVATE = [CLIENT_SIGN[0], SERVER_SIGN[0], CLIENT_KA[0], SERVER_KA[0], EUM_SERVER_EPH[0], OP_CLIENT_EPH[0]]
ALL_DERIVED = [EUM_Z, EUM_K, OP_Z, OP_K, OP_S2C_Z, OP_S2C_K, SU_Z, SU_K]


@pytest.fixture(autouse=True)
def _register_secrets():
    """No error message may carry a private scalar, a Z or a derived key."""
    secret(*ALL_PRIVATE, *ALL_DERIVED)


def signer(pair) -> SoftwareSigner:
    secret(pair[0])
    return SoftwareSigner.from_scalar(pair[0])


def ecdh(pair) -> SoftwareEcdh:
    secret(pair[0])
    return SoftwareEcdh.from_scalar(pair[0])


# --- public key encodings ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(GB_KEY_PAIRS))
def test_green_book_public_keys_from_their_private_keys(name):
    d, q = GB_KEY_PAIRS[name]
    assert SoftwareSigner.from_scalar(d).public_key_bytes() == q
    assert SoftwareEcdh.from_scalar(d).public_key_bytes() == q
    assert encode_public_key(private_key_from_scalar(d).public_key()) == q
    assert encode_public_key(decode_public_key(q)) == q


def test_ephemeral_public_keys_of_the_vectors():
    assert SoftwareEcdh.from_scalar(EUM_SERVER_EPH[0]).public_key_bytes() == EUM_SERVER_EPH[1]
    assert SoftwareEcdh.from_scalar(OP_CLIENT_EPH[0]).public_key_bytes() == OP_CLIENT_EPH[1]
    for q in (EUM_CLIENT_EPH_Q, OP_SERVER_EPH_Q):  # published without their private keys
        assert encode_public_key(decode_public_key(q)) == q


# --- ECDSA: published signatures verify, with exactly the signed bytes DLMS uses ---------


def test_ephemeral_unified_client_signature_covers_key_id_and_key():
    verify_signature(CLIENT_SIGN[1], b"\x00" + EUM_CLIENT_EPH_Q, EUM_CLIENT_SIG)
    entry = KeyAgreementEntry(KeyId.GLOBAL_UNICAST, EUM_CLIENT_EPH_Q, EUM_CLIENT_SIG)
    assert entry.signed_data == b"\x00" + EUM_CLIENT_EPH_Q
    with pytest.raises(SignatureInvalid):  # not over the bare key
        verify_signature(CLIENT_SIGN[1], EUM_CLIENT_EPH_Q, EUM_CLIENT_SIG)
    with pytest.raises(SignatureInvalid):  # nor under another key id
        verify_signature(CLIENT_SIGN[1], b"\x01" + EUM_CLIENT_EPH_Q, EUM_CLIENT_SIG)


def test_one_pass_signatures_cover_the_bare_key():
    verify_signature(CLIENT_SIGN[1], OP_CLIENT_EPH[1], OP_CLIENT_SIG)
    verify_signature(SERVER_SIGN[1], OP_SERVER_EPH_Q, OP_SERVER_SIG)
    with pytest.raises(SignatureInvalid):  # the GX-NET rule (01 || Q) is not the GB one
        verify_signature(CLIENT_SIGN[1], b"\x01" + OP_CLIENT_EPH[1], OP_CLIENT_SIG)
    with pytest.raises(SignatureInvalid):  # and the signer matters
        verify_signature(SERVER_SIGN[1], OP_CLIENT_EPH[1], OP_CLIENT_SIG)


def test_derived_server_signature_is_reproduced_byte_for_byte():
    """RFC 6979: the same key and message always give the same r || s."""
    s = signer(SERVER_SIGN)
    assert s.sign(b"\x00" + EUM_SERVER_EPH[1]) == EUM_SERVER_SIG
    verify_signature(SERVER_SIGN[1], b"\x00" + EUM_SERVER_EPH[1], EUM_SERVER_SIG)
    assert offer_ephemeral_key(KeyId.GLOBAL_UNICAST, ecdh(EUM_SERVER_EPH), s).signature == EUM_SERVER_SIG


def test_signature_der_conversion_roundtrip():
    der = decode_signature(OP_CLIENT_SIG)
    assert der[0] == 0x30 and encode_signature(der) == OP_CLIENT_SIG


# --- ECDH shared secrets and the KDF --------------------------------------------------------


def test_ephemeral_unified_z_and_key():
    z = ecdh(EUM_SERVER_EPH).exchange(EUM_CLIENT_EPH_Q)
    assert z == EUM_Z
    info = ephemeral_unified_other_info(ST_C, ST_S)
    assert info == ALG_ID + ST_C + ST_S
    assert kdf(z, info) == EUM_K
    assert kdf(z, info) not in WRONG_CX_KEYS


def test_one_pass_client_to_server_z_and_key_both_sides():
    assert ecdh(OP_CLIENT_EPH).exchange(SERVER_KA[1]) == OP_Z
    assert ecdh(SERVER_KA).exchange(OP_CLIENT_EPH[1]) == OP_Z
    info = one_pass_other_info(ST_C, ST_S)
    assert kdf(OP_Z, info) == OP_K
    assert kdf(OP_Z, info, 32) == OP_HASH


def test_one_pass_server_to_client_swaps_the_parties():
    z = ecdh(CLIENT_KA).exchange(OP_SERVER_EPH_Q)
    assert z == OP_S2C_Z
    assert kdf(z, one_pass_other_info(ST_S, ST_C)) == OP_S2C_K
    assert kdf(z, one_pass_other_info(ST_C, ST_S)) != OP_S2C_K


def test_static_unified_z_and_key():
    assert ecdh(CLIENT_KA).exchange(SERVER_KA[1]) == SU_Z
    info = static_unified_other_info(ST_C, ST_S, SU_TXID)
    assert info == ALG_ID + ST_C + b"\x08" + SU_TXID + ST_S
    assert kdf(SU_Z, info) == SU_K
    for own, peer in ((CLIENT_KA, SERVER_KA), (SERVER_KA, CLIENT_KA)):
        key = agree_static_unified(
            ecdh(own), peer[1], originator_title=ST_C, recipient_title=ST_S, transaction_id=SU_TXID
        )
        assert key == SU_K


def test_cx_key_agreement_test_keys_are_not_produced():
    """Fact sheet §7.5: CX's KeyAgreementImplTest keys contradict its own KDF test."""
    for z in (EUM_Z, OP_Z, OP_S2C_Z):
        for u, v in ((ST_C, ST_S), (ST_S, ST_C)):
            assert kdf(z, one_pass_other_info(u, v)) not in WRONG_CX_KEYS


# --- whole exchanges on the vectors ----------------------------------------------------------


def gb_key_agreement_request() -> bytes:
    return encode_key_agreement([KeyAgreementEntry(KeyId.GLOBAL_UNICAST, EUM_CLIENT_EPH_Q, EUM_CLIENT_SIG)])


def test_key_agreement_request_encoding():
    request = gb_key_agreement_request()
    assert request == h("010102021600098180") + EUM_CLIENT_EPH_Q + EUM_CLIENT_SIG
    assert decode_key_agreement(request) == (KeyAgreementEntry(KeyId.GLOBAL_UNICAST, EUM_CLIENT_EPH_Q, EUM_CLIENT_SIG),)


def test_meter_answers_the_green_book_key_agreement():
    response, keys = answer_key_agreement(
        gb_key_agreement_request(),
        lambda: ecdh(EUM_SERVER_EPH),
        signer(SERVER_SIGN),
        CLIENT_SIGN[1],
        client_title=ST_C,
        server_title=ST_S,
    )
    assert keys == {KeyId.GLOBAL_UNICAST: EUM_K}
    assert response == h("010102021600098180") + EUM_SERVER_EPH[1] + EUM_SERVER_SIG
    # What the client checks (its ephemeral private key is not published).
    (entry,) = decode_key_agreement(response)
    verify_signature(SERVER_SIGN[1], entry.signed_data, entry.signature)


def test_meter_refuses_a_request_signed_by_another_key():
    with pytest.raises(SignatureInvalid):
        answer_key_agreement(
            gb_key_agreement_request(),
            lambda: pytest.fail("no ephemeral key before the signature verified"),
            signer(SERVER_SIGN),
            SERVER_SIGN[1],
            client_title=ST_C,
            server_title=ST_S,
        )


def test_table_41_one_pass_key_data_and_ciphertext():
    """GB Table 41: the key-info carries Q || sig; the agreed key decrypts the
    ciphertext.  Its tag is not reproducible under any known AAD rule (fact
    sheet §1.3), so the body is opened as encryption-only (SC 0x21)."""
    assert TABLE_41[:36] == h("DD080102030405060708084D4D4D0000BC614E084D4D4D000000000100000102010181") + b"\x80"
    key_data = TABLE_41[36 : 36 + 128]
    assert decode_one_pass_key_data(key_data) == (OP_CLIENT_EPH[1], OP_CLIENT_SIG)
    key = agree_one_pass_recipient(
        ecdh(SERVER_KA), key_data, CLIENT_SIGN[1], originator_title=ST_C, recipient_title=ST_S
    )
    assert key == OP_K
    content = TABLE_41[36 + 128 :]
    assert content[:2] == h("81EB") and len(content) == 2 + 0xEB
    sc, ic, body = content[2], int.from_bytes(content[3:7], "big"), content[7:]
    assert (sc, ic) == (SC1_AUTH_ENC, 0)
    ciphertext, tag = body[:-12], body[-12:]
    c = Suite1Cipher(key, h("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"))
    iv = iv_for(ST_C, ic)
    assert c.open(SC1_ENC, iv, ciphertext, allow_unauthenticated=True) == TABLE_41_PLAINTEXT
    # Documented open question: SC || AK is not the AAD the GB example used.
    with pytest.raises(AuthenticationFailed):
        c.open(SC1_AUTH_ENC, iv, body)
    assert len(tag) == 12


def test_one_pass_originator_side_gives_the_table_41_key():
    key_data, key = agree_one_pass_originator(
        ecdh(OP_CLIENT_EPH), signer(CLIENT_SIGN), SERVER_KA[1], originator_title=ST_C, recipient_title=ST_S
    )
    assert key == OP_K
    public, signature = decode_one_pass_key_data(key_data)
    assert public == OP_CLIENT_EPH[1]
    verify_signature(CLIENT_SIGN[1], public, signature)  # RFC 6979, so not the GB's randomized one


def test_one_pass_server_to_client_recipient():
    key = agree_one_pass_recipient(
        ecdh(CLIENT_KA), OP_SERVER_EPH_Q + OP_SERVER_SIG, SERVER_SIGN[1], originator_title=ST_S, recipient_title=ST_C
    )
    assert key == OP_S2C_K


def test_static_unified_ciphertext_of_gx_jt():
    c = Suite1Cipher(SU_K, h("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"))
    ciphertext = SU_CIPHERTEXT_TAG[:-12]
    assert c.open(SC1_ENC, iv_for(ST_C, 0), ciphertext, allow_unauthenticated=True) == TABLE_41_PLAINTEXT


# --- the suite-1 SC byte and Suite1Cipher ------------------------------------------------------


def test_sc_constants_and_helpers():
    assert (SC1_AUTH, SC1_ENC, SC1_AUTH_ENC) == (0x11, 0x21, 0x31)
    assert security_control() == 0x31 and security_control(encrypted=False) == 0x11
    assert security_control(0) == 0x30
    assert suite_of(0x31) == 1 and suite_of(0x30) == 0 and suite_of(0x32) == 2 and suite_of(0x35) == 5
    assert check_suite1_security_control(0x31) == 0x30
    assert check_suite1_security_control(0x11) == 0x10
    assert check_suite1_security_control(0x21, allow_unauthenticated=True) == 0x20


@pytest.mark.parametrize("sc", [0x30, 0x32, 0x33, 0x35, 0x3F, 0x71, 0xB1, 0x21, 0x01, 0x00, 0x100, -1])
def test_sc_refusals(sc):
    with pytest.raises(UnsupportedSecurity):
        check_suite1_security_control(sc)


def test_sc31_vector_byte_for_byte():
    """Fact sheet §1.2: same ciphertext as the 0x30 vector, a different tag."""
    c = Suite1Cipher(EK, AK)
    pt = h(GET_REQUEST["plaintext"])
    frame = seal_apdu(c, 0xC8, SYSTEM_TITLE, IC, pt, security_control=SC1_AUTH_ENC)
    assert frame == SC31_APDU
    assert frame[7:20] == h(GET_REQUEST["apdu"])[7:20] and frame[20:] != h(GET_REQUEST["apdu"])[20:]
    apdu = parse_suite1_apdu(frame)
    assert (apdu.tag, apdu.security_control, apdu.invocation_counter) == (0xC8, 0x31, IC)
    assert open_apdu(c, apdu, SYSTEM_TITLE) == pt
    with pytest.raises(UnsupportedSecurity):  # the suite-0 parser refuses suite 1 ...
        parse_apdu(frame)
    with pytest.raises(UnsupportedSecurity):  # ... and the suite-1 parser suite 0
        parse_suite1_apdu(h(GET_REQUEST["apdu"]))


@pytest.mark.parametrize("tag", [0xDB, 0xDC, 0x21, 0x28, 0xC8, 0xD0])
@pytest.mark.parametrize("sc", [SC1_AUTH_ENC, SC1_AUTH])
def test_suite1_frames_roundtrip_and_every_bit_flip_is_refused(tag, sc):
    c = Suite1Cipher(EK, AK)
    frame = seal_apdu(c, tag, ST_S, 0x00ABCDEF, b"suite one reading", security_control=sc)

    def receive(data):
        apdu = parse_suite1_apdu(data)
        return open_apdu(c, apdu, ST_S if apdu.system_title is None else None)

    assert receive(frame) == b"suite one reading"
    for i, bit, mutated in flips(frame):
        if i == 0 and tag in SPECIFIC_TAGS and mutated[0] in SPECIFIC_TAGS:
            # As in suite 0, DLMS does not authenticate the service tag (C8 ->
            # C9, D0 -> D1...): the receiver must check the tag fits the exchange.
            assert receive(mutated) == b"suite one reading"
            continue
        with pytest.raises((AuthenticationFailed, MalformedFrame)):
            receive(mutated)


@given(ek=st.binary(min_size=16, max_size=16), pt=st.binary(max_size=300), ic=st.integers(0, 2**32 - 1), title=titles)
@FAST
def test_suite1_cipher_roundtrip(ek, pt, ic, title):
    secret(ek)
    c = Suite1Cipher(ek, AK)
    iv = iv_for(title, ic)
    for sc in (SC1_AUTH_ENC, SC1_AUTH):
        assert c.open(sc, iv, c.seal(sc, iv, pt)) == pt
    body = c.seal(SC1_AUTH_ENC, iv, pt)
    with pytest.raises(AuthenticationFailed):  # the SC is authenticated: 0x31 is not 0x11
        c.open(SC1_AUTH, iv, body)


def test_suite1_cipher_refuses_suite0_and_hides_its_keys():
    c = Suite1Cipher(EK, AK)
    with pytest.raises(UnsupportedSecurity):
        c.seal(0x30, iv_for(ST_C, 1), b"x")
    with pytest.raises(UnsupportedSecurity):
        c.open(0x30, iv_for(ST_C, 1), bytes(20))
    with pytest.raises(MalformedFrame):
        c.open(SC1_AUTH_ENC, iv_for(ST_C, 1), bytes(11))
    assert repr(c) == "<Suite1Cipher>"
    with pytest.raises(ValueError):
        Suite1Cipher(EK[:15], AK)


# --- properties: signatures, ECDH, KDF, key agreement ---------------------------------------

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
scalars = st.integers(1, N - 1).map(lambda d: d.to_bytes(32, "big"))
messages = st.binary(max_size=200)


@given(d=scalars, msg=messages)
@QUICK
def test_sign_verify_roundtrip_is_deterministic(d, msg):
    secret(d)
    s = SoftwareSigner.from_scalar(d)
    sig = s.sign(msg)
    assert len(sig) == 64 and len(s.public_key_bytes()) == 64
    assert s.sign(msg) == sig  # no randomness of its own
    verify_signature(s.public_key_bytes(), msg, sig)
    verify_signature(decode_public_key(s.public_key_bytes()), msg, sig)


@given(d=scalars, msg=messages, where=st.integers(0, 10**6), bit=st.integers(0, 7), part=st.sampled_from("smk"))
@QUICK
def test_any_bit_flip_in_signature_message_or_key_fails(d, msg, where, bit, part):
    secret(d)
    s = SoftwareSigner.from_scalar(d)
    sig, key = s.sign(msg), s.public_key_bytes()
    if part == "m" and not msg:
        msg, sig = b"\x00", s.sign(b"\x00")
    target = {"s": sig, "m": msg, "k": key}[part]
    flipped = bytearray(target)
    flipped[where % len(flipped)] ^= 1 << bit
    args = {"s": (key, msg, bytes(flipped)), "m": (key, bytes(flipped), sig), "k": (bytes(flipped), msg, sig)}[part]
    with pytest.raises(ProtocolError) as info:
        verify_signature(*args)
    assert isinstance(info.value, (SignatureInvalid, InvalidPublicKey))


def test_every_bit_flip_of_a_published_signature_fails():
    data = b"\x00" + EUM_CLIENT_EPH_Q
    for _i, _bit, mutated in flips(EUM_CLIENT_SIG):
        with pytest.raises(SignatureInvalid):
            verify_signature(CLIENT_SIGN[1], data, mutated)
    for _i, _bit, mutated in flips(data):
        with pytest.raises(SignatureInvalid):
            verify_signature(CLIENT_SIGN[1], mutated, EUM_CLIENT_SIG)
    for _i, _bit, mutated in flips(CLIENT_SIGN[1]):
        with pytest.raises((SignatureInvalid, InvalidPublicKey)):
            verify_signature(mutated, data, EUM_CLIENT_SIG)


@given(a=scalars, b=scalars)
@QUICK
def test_ecdh_is_symmetric(a, b):
    secret(a, b)
    x, y = SoftwareEcdh.from_scalar(a), SoftwareEcdh.from_scalar(b)
    z = x.exchange(y.public_key_bytes())
    secret(z)
    assert len(z) == 32 and z == y.exchange(x.public_key_bytes())


@given(z=st.binary(min_size=32, max_size=32), u=titles, v=titles, other=titles)
@FAST
def test_kdf_is_deterministic_and_bound_to_the_titles(z, u, v, other):
    secret(z)
    k = kdf(z, ephemeral_unified_other_info(u, v))
    secret(k)
    assert len(k) == 16 and k == kdf(z, one_pass_other_info(u, v))  # same layout, same key
    assert repr(k) == "<secret 16 bytes>"
    if other != u:
        assert kdf(z, ephemeral_unified_other_info(other, v)) != k
    if other != v:
        assert kdf(z, ephemeral_unified_other_info(u, other)) != k
    if u != v:
        assert kdf(z, ephemeral_unified_other_info(v, u)) != k  # direction matters
    assert kdf(z, ephemeral_unified_other_info(u, v, AES_WRAP_128)) != k  # so does the algorithm
    assert kdf(z, static_unified_other_info(u, v, b"\x01")) != kdf(z, static_unified_other_info(u, v, b"\x02"))


def rng_from(seed: bytes):
    """A deterministic stand-in for the caller's random source (SHAKE-256 stream)."""
    from hashlib import shake_256

    state = {"n": 0}

    def rng(n: int) -> bytes:
        state["n"] += 1
        return shake_256(seed + state["n"].to_bytes(4, "big")).digest(n)

    return rng


@given(seed_c=st.binary(min_size=8, max_size=8), seed_s=st.binary(min_size=8, max_size=8),
       ids=st.lists(st.sampled_from(list(KeyId)), min_size=1, max_size=4, unique=True))
@QUICK
def test_full_ephemeral_unified_agreement_gives_both_sides_the_same_keys(seed_c, seed_s, ids):
    client_sign, server_sign = signer(CLIENT_SIGN), signer(SERVER_SIGN)
    rng_c, rng_s = rng_from(b"c" + seed_c), rng_from(b"s" + seed_s)
    request, pending = start_key_agreement(ids, lambda: SoftwareEcdh.from_rng(rng_c), client_sign)
    response, meter_keys = answer_key_agreement(
        request, lambda: SoftwareEcdh.from_rng(rng_s), server_sign, CLIENT_SIGN[1], client_title=ST_C, server_title=ST_S
    )
    client_keys = finish_key_agreement(response, pending, SERVER_SIGN[1], client_title=ST_C, server_title=ST_S)
    secret(*client_keys.values())
    assert client_keys == meter_keys and set(client_keys) == set(ids)
    assert len(set(client_keys.values())) == len(ids)  # one fresh ephemeral pair per key
    assert "PendingKeyAgreement" in repr(pending) and "secret" not in repr(pending)


def test_fresh_ephemerals_give_fresh_keys_under_the_same_long_term_keys():
    """What forward secrecy rests on: the session key depends on ephemeral
    keys only, so the long-term (signing) keys alone never reproduce it."""
    keys = set()
    for seed in range(5):
        rng = rng_from(bytes([seed]))
        request, pending = start_key_agreement([KeyId.GLOBAL_UNICAST], lambda: SoftwareEcdh.from_rng(rng), signer(CLIENT_SIGN))
        response, meter_keys = answer_key_agreement(
            request, lambda: SoftwareEcdh.from_rng(rng), signer(SERVER_SIGN), CLIENT_SIGN[1], client_title=ST_C, server_title=ST_S
        )
        secret(*meter_keys.values())
        keys |= set(meter_keys.values())
    assert len(keys) == 5


def test_client_refuses_a_forged_or_mismatched_response():
    rng = rng_from(b"forged")
    request, pending = start_key_agreement([KeyId.GLOBAL_UNICAST], lambda: SoftwareEcdh.from_rng(rng), signer(CLIENT_SIGN))
    # An attacker answers with its own ephemeral key signed by a key it holds.
    mallory = SoftwareSigner.from_scalar(b"\x00" * 31 + b"\x07")
    forged = encode_key_agreement([offer_ephemeral_key(KeyId.GLOBAL_UNICAST, SoftwareEcdh.from_rng(rng), mallory)])
    with pytest.raises(SignatureInvalid):
        finish_key_agreement(forged, pending, SERVER_SIGN[1], client_title=ST_C, server_title=ST_S)
    other = encode_key_agreement([offer_ephemeral_key(KeyId.BROADCAST, SoftwareEcdh.from_rng(rng), signer(SERVER_SIGN))])
    with pytest.raises(MalformedMessage):
        finish_key_agreement(other, pending, SERVER_SIGN[1], client_title=ST_C, server_title=ST_S)


def test_software_implementations_satisfy_the_protocols():
    assert isinstance(signer(CLIENT_SIGN), Signer) and isinstance(ecdh(CLIENT_KA), EcdhAgreement)
    assert repr(signer(CLIENT_SIGN)) == "<SoftwareSigner>" and repr(ecdh(CLIENT_KA)) == "<SoftwareEcdh>"

    class TokenSigner:  # what a PKCS#11 backend will look like: sign() and public_key_bytes() only
        def __init__(self, inner):
            self.inner = inner

        def sign(self, data):
            return self.inner.sign(data)

        def public_key_bytes(self):
            return self.inner.public_key_bytes()

    entry = offer_ephemeral_key(KeyId.GLOBAL_UNICAST, ecdh(EUM_SERVER_EPH), TokenSigner(signer(SERVER_SIGN)))
    assert entry.signature == EUM_SERVER_SIG

    class DerSigner(TokenSigner):  # a backend returning DER is caught, not sent
        def sign(self, data):
            return decode_signature(self.inner.sign(data))

    with pytest.raises(ValueError):
        offer_ephemeral_key(KeyId.GLOBAL_UNICAST, ecdh(EUM_SERVER_EPH), DerSigner(signer(SERVER_SIGN)))


def test_hls7_signed_data_layout():
    stoc, ctos = b"S" * 32, b"C" * 32
    assert hls7_client_signed_data(ST_C, ST_S, stoc, ctos) == ST_C + ST_S + stoc + ctos
    assert hls7_server_signed_data(ST_C, ST_S, stoc, ctos) == ST_S + ST_C + ctos + stoc
    with pytest.raises(ValueError):
        hls7_client_signed_data(ST_C[:7], ST_S, stoc, ctos)


# --- the randomness handed in ---------------------------------------------------------------


def test_scalar_from_rng_rejects_out_of_range_draws_and_broken_sources():
    draws = iter([b"\x00" * 32, b"\xff" * 32, N.to_bytes(32, "big"), (N - 1).to_bytes(32, "big")])
    assert scalar_from_rng(lambda n: next(draws)) == (N - 1).to_bytes(32, "big")
    with pytest.raises(ValueError):
        scalar_from_rng(lambda n: b"\x00" * n)
    with pytest.raises(ValueError):
        scalar_from_rng(lambda n: b"\x01" * (n - 1))
    for bad in (b"\x00" * 32, N.to_bytes(32, "big"), b"\x01" * 31):
        with pytest.raises(ValueError):
            private_key_from_scalar(bad)


# --- decoders under fuzz: only ProtocolError, never anything else -----------------------------

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
GX = CLIENT_SIGN[1][:32]
GY = CLIENT_SIGN[1][32:]


@pytest.mark.parametrize(
    "key",
    [
        bytes(64),  # the "point at infinity" some encoders write
        GX + (int.from_bytes(GY, "big") ^ 1).to_bytes(32, "big"),  # x of a real key, y off by one
        P.to_bytes(32, "big") + GY,  # coordinate = p
        b"\xff" * 64,
        GX + P.to_bytes(32, "big"),  # y = p
    ],
    ids=["zero", "y+1", "x=p", "ff", "y=p"],
)
def test_points_off_the_curve_are_refused(key):
    with pytest.raises(InvalidPublicKey):
        decode_public_key(key)
    with pytest.raises(InvalidPublicKey):
        ecdh(CLIENT_KA).exchange(key)
    with pytest.raises(InvalidPublicKey):
        verify_signature(key, b"x", EUM_CLIENT_SIG)
    request = h("010102021600098180") + key + EUM_CLIENT_SIG
    with pytest.raises(InvalidPublicKey):
        decode_key_agreement(request)
    with pytest.raises(InvalidPublicKey):
        decode_one_pass_key_data(key + EUM_CLIENT_SIG)


def test_the_negated_point_is_on_the_curve_but_another_key():
    neg = GX + (P - int.from_bytes(GY, "big")).to_bytes(32, "big")
    decode_public_key(neg)
    with pytest.raises(SignatureInvalid):
        verify_signature(neg, b"\x00" + EUM_CLIENT_EPH_Q, EUM_CLIENT_SIG)


@pytest.mark.parametrize("n", [0, 1, 32, 63, 65, 128])
def test_bad_lengths_are_malformed(n):
    with pytest.raises(InvalidPublicKey):
        decode_public_key(bytes(n))
    with pytest.raises(MalformedMessage):
        decode_signature(bytes(n))
    with pytest.raises(MalformedMessage):
        verify_signature(CLIENT_SIGN[1], b"x", bytes(n))
    with pytest.raises(MalformedMessage):
        decode_one_pass_key_data(bytes(n))
    assert issubclass(InvalidPublicKey, MalformedMessage) and InvalidPublicKey.reason == "malformed_message"
    assert issubclass(SignatureInvalid, AuthenticationFailed) and SignatureInvalid.reason == "auth_failed"


def test_key_agreement_decoder_refusals():
    good = gb_key_agreement_request()
    for bad in (
        b"",
        b"\x01",
        b"\x02" + good[1:],  # not an array
        b"\x01\x00",  # empty array
        b"\x01\x02" + good[2:],  # count says two
        good[:-1],
        good + b"\x00",
        good[:2] + b"\x02\x03" + good[4:],  # structure of 3
        good[:4] + b"\x11" + good[5:],  # not an enum
        good[:5] + b"\x04" + good[6:],  # key_id 4
        good[:6] + b"\x0a" + good[7:],  # not an octet-string
        good[:7] + b"\x81\x7f" + good[9:],  # wrong length
        h("0102") + good[2:] + good[2:],  # the same key id twice
    ):
        with pytest.raises(MalformedMessage):
            decode_key_agreement(bad)


SUITE1_FRAMES = [seal_apdu(Suite1Cipher(EK, AK), tag, ST_S, 7, b"payload", security_control=SC1_AUTH_ENC) for tag in (0xDB, 0xC8)]


@given(data=st.binary(max_size=600))
@FUZZ
def test_decoders_on_arbitrary_bytes_raise_only_protocol_errors(data):
    for decode in (decode_key_agreement, decode_one_pass_key_data, decode_public_key, decode_signature, parse_suite1_apdu):
        try:
            decode(data)
        except ProtocolError:
            pass
    try:
        verify_signature(data[:64], data[64:], data[:64])
    except ProtocolError:
        pass


@given(ops=st.lists(mutation, min_size=1, max_size=4), which=st.integers(0, 3))
@FUZZ
def test_decoders_on_mutated_encodings_raise_only_protocol_errors(ops, which):
    c = Suite1Cipher(EK, AK)
    if which < 2:
        data = mutate(SUITE1_FRAMES[which], ops)
        try:
            apdu = parse_suite1_apdu(data)
            open_apdu(c, apdu, ST_S if apdu.system_title is None else None)
        except ProtocolError:
            pass
        return
    base = gb_key_agreement_request() if which == 2 else OP_CLIENT_EPH[1] + OP_CLIENT_SIG
    data = mutate(base, ops)
    try:
        if which == 2:
            for e in decode_key_agreement(data):
                verify_signature(CLIENT_SIGN[1], e.signed_data, e.signature)
        else:
            agree_one_pass_recipient(ecdh(SERVER_KA), data, CLIENT_SIGN[1], originator_title=ST_C, recipient_title=ST_S)
    except ProtocolError:
        return
    assert data == base  # anything that still verifies is the original


# --- sans-I/O -------------------------------------------------------------------------------


def test_importing_suite1_loads_no_io_module():
    from .test_no_io import FORBIDDEN_MODULES, PACKAGE

    code = (
        "import sys, json; b = set(sys.modules); import ami.protocol.suite1;"
        " print(json.dumps(sorted(set(sys.modules) - b)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent.parent)
    added = set(json.loads(out.stdout))
    assert "ami.protocol.suite1" in added
    assert {m for m in added if m.split(".")[0] in FORBIDDEN_MODULES} == set()


def test_suite1_is_covered_by_the_source_allowlist_check():
    from .test_no_io import PACKAGE

    assert (PACKAGE / "suite1.py").is_file()  # test_no_io globs ami/protocol/*.py
