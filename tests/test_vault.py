"""The head-end key vault: file and PKCS#11 (SoftHSM2) backends, no mocks."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from ami.security import vault as vault_mod
from ami.security.vault import (
    FileKeyVault,
    KeyVault,
    Pkcs11KeyVault,
    VaultError,
    WrongRow,
    key_identity,
    open_vault,
    session_identity,
)

try:  # tests/ used as a package, or (pytest's default) as a plain directory
    from tests.softhsm import requires_softhsm, softhsm_token
except ImportError:
    from softhsm import requires_softhsm, softhsm_token

# RFC 3394 section 4.1: 128-bit key data wrapped with a 128-bit KEK.
RFC_KEK = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
RFC_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
RFC_WRAPPED = bytes.fromhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5")

FIXED_KEY = bytes.fromhex("a5" * 16)
ID = key_identity("m000001", "ak", 1)  # the row a test key is bound to


def binding(identity: bytes) -> bytes:
    """What is wrapped after the key: independent of the vault's own code."""
    return hashlib.sha256(b"ami-wrapped-key-binding\0" + identity).digest()[:24]


def write_kek(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def assert_no_secret(text: str, *secrets_: bytes) -> None:
    low = text.lower()
    for s in secrets_:
        assert s.hex() not in low, "secret bytes leaked into a message"
        assert repr(s) not in text


def flip(blob: bytes, index: int, bit: int = 0) -> bytes:
    b = bytearray(blob)
    b[index] ^= 1 << bit
    return bytes(b)


# --------------------------------------------------------------------------
# File backend
# --------------------------------------------------------------------------


def test_file_vault_creates_kek_0600(tmp_path: Path) -> None:
    v = open_vault("file:keys/kek.bin", data_dir=tmp_path)
    path = tmp_path / "keys" / "kek.bin"
    st = path.stat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 16
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["kek.bin"]  # no temp left
    assert isinstance(v, KeyVault)
    v.close()


def test_file_vault_created_0600_despite_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        FileKeyVault(tmp_path / "kek").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "kek").stat().st_mode) == 0o600


def test_second_open_reuses_kek(tmp_path: Path) -> None:
    v1 = open_vault("file:kek.bin", data_dir=tmp_path)
    kek = (tmp_path / "kek.bin").read_bytes()
    w1 = v1.wrap(FIXED_KEY, ID)
    v1.close()
    v2 = open_vault(f"file:{tmp_path / 'kek.bin'}")
    assert (tmp_path / "kek.bin").read_bytes() == kek
    assert v2.wrap(FIXED_KEY, ID) == w1
    assert v2.unwrap(w1, ID) == FIXED_KEY
    v2.close()


def test_concurrent_first_open_agrees_on_one_kek(tmp_path: Path) -> None:
    path = tmp_path / "kek.bin"

    def wrap_once(_: int) -> bytes:
        v = FileKeyVault(path)
        try:
            return v.wrap(FIXED_KEY, ID)
        finally:
            v.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = set(pool.map(wrap_once, range(32)))
    assert len(results) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["kek.bin"]


@pytest.mark.parametrize("size", [16, 24, 32])
def test_file_wrap_equals_cryptography(tmp_path: Path, size: int) -> None:
    v = FileKeyVault(tmp_path / "kek")
    kek = (tmp_path / "kek").read_bytes()
    key = secrets.token_bytes(size)
    wrapped = v.wrap(key, ID)
    assert wrapped == aes_key_wrap(kek, key + binding(ID))
    assert len(wrapped) == size + 24 + 8
    assert v.unwrap(wrapped, ID) == key
    v.close()


def test_rfc3394_vector_through_file_vault(tmp_path: Path) -> None:
    write_kek(tmp_path / "rfc.kek", RFC_KEK)
    v = open_vault("file:rfc.kek", data_dir=tmp_path)
    # The old, unbound format is plain RFC 3394 (read only to migrate a store)...
    assert v.unwrap_legacy_many([RFC_WRAPPED]) == [RFC_KEY]
    # ...the bound one is RFC 3394 of key || binding.
    assert v.wrap(RFC_KEY, ID) == aes_key_wrap(RFC_KEK, RFC_KEY + binding(ID))
    with pytest.raises(VaultError, match="old, unbound format"):
        v.unwrap(RFC_WRAPPED, ID)  # never accepted as a bound key
    v.close()


def test_file_unwrap_many(tmp_path: Path) -> None:
    v = FileKeyVault(tmp_path / "kek")
    keys = [secrets.token_bytes(16) for _ in range(200)]
    ids = [key_identity(f"m{i:06d}", "cc_lan", 1) for i in range(200)]
    assert v.unwrap_many([v.wrap(k, i) for k, i in zip(keys, ids)], ids) == keys
    with pytest.raises(VaultError, match="identities"):
        v.unwrap_many([v.wrap(keys[0], ids[0])], [])
    v.close()


def test_tampered_blob_raises(tmp_path: Path) -> None:
    write_kek(tmp_path / "kek", RFC_KEK)
    v = FileKeyVault(tmp_path / "kek")
    bound = v.wrap(RFC_KEY, ID)
    # Every single-bit flip of the wrapped blob must be caught.
    for i in range(len(bound)):
        for bit in range(8):
            with pytest.raises(VaultError) as err:
                v.unwrap(flip(bound, i, bit), ID)
            assert_no_secret(str(err.value), RFC_KEK, RFC_KEY)
    with pytest.raises(VaultError, match="index 1"):
        v.unwrap_many([bound, flip(bound, 5)], [ID, ID])
    with pytest.raises(VaultError):
        v.unwrap(bound[:-1], ID)  # not a multiple of 8
    v.close()


def test_wrong_kek_fails_integrity(tmp_path: Path) -> None:
    a, b = FileKeyVault(tmp_path / "a"), FileKeyVault(tmp_path / "b")
    with pytest.raises(VaultError, match="integrity"):
        b.unwrap(a.wrap(FIXED_KEY, ID), ID)
    a.close()
    b.close()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602])
def test_kek_file_accessible_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    write_kek(tmp_path / "kek", RFC_KEK, mode)
    with pytest.raises(VaultError, match=f"{mode:04o}") as err:
        FileKeyVault(tmp_path / "kek")
    assert_no_secret(str(err.value), RFC_KEK)


@pytest.mark.parametrize("size", [0, 15, 17, 24, 32, 33])
def test_kek_file_of_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    data = (RFC_KEK.hex() + "\n").encode()[:size] if size >= 32 else bytes(size)
    write_kek(tmp_path / "kek", data)
    with pytest.raises(VaultError, match="bytes") as err:
        FileKeyVault(tmp_path / "kek")
    assert_no_secret(str(err.value), RFC_KEK)


def test_kek_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kek").mkdir(mode=0o700)
    with pytest.raises(VaultError):
        FileKeyVault(tmp_path / "kek")


def test_missing_kek_without_create(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="does not exist"):
        FileKeyVault(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()


def test_texts_never_contain_key_bytes(tmp_path: Path) -> None:
    write_kek(tmp_path / "kek", RFC_KEK)
    v = FileKeyVault(tmp_path / "kek")
    texts = [repr(v), str(v), f"{v}", v.name]
    for bad in (b"\x01" * 15, RFC_KEY + b"\x00", "a string key"):
        with pytest.raises(VaultError) as err:
            v.wrap(bad, ID)  # type: ignore[arg-type]
        texts.append(str(err.value))
    bound = v.wrap(RFC_KEY, ID)
    for blob, identity in ((flip(bound, 0), ID), (bound, key_identity("m000002", "ak", 1))):
        with pytest.raises(VaultError) as err:
            v.unwrap(blob, identity)
        texts.append(str(err.value))
    assert repr(v) == f"<FileKeyVault file:{tmp_path / 'kek'}>"
    for text in texts:
        assert_no_secret(text, RFC_KEK, RFC_KEY, RFC_WRAPPED, bound)


def test_closed_file_vault_refuses_work(tmp_path: Path) -> None:
    v = FileKeyVault(tmp_path / "kek")
    wrapped = v.wrap(FIXED_KEY, ID)
    v.close()
    v.close()  # idempotent
    with pytest.raises(VaultError, match="closed"):
        v.unwrap(wrapped, ID)
    with FileKeyVault(tmp_path / "kek") as v2:  # context manager closes too
        assert v2.unwrap(wrapped, ID) == FIXED_KEY


def test_spec_errors() -> None:
    with pytest.raises(VaultError, match="data_dir"):
        open_vault("file:relative.kek")
    with pytest.raises(VaultError, match="scheme"):
        open_vault("vault:thing")
    with pytest.raises(VaultError):
        open_vault("no-scheme-at-all")
    with pytest.raises(VaultError, match="lib"):
        open_vault("pkcs11:token=ami")


def test_pkcs11_spec_never_takes_or_echoes_a_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(VaultError, match="pin_env") as err:
        open_vault("pkcs11:lib=/x.so;token=ami;pin=98765432;label=k")
    assert "98765432" not in str(err.value)
    with pytest.raises(VaultError) as err:
        open_vault("pkcs11:lib=/x.so;token=ami;secret98765432")
    assert "98765432" not in str(err.value)
    monkeypatch.delenv("AMI_TEST_PIN_UNSET", raising=False)
    with pytest.raises(VaultError, match="AMI_TEST_PIN_UNSET"):
        open_vault("pkcs11:lib=/x.so;token=ami;pin_env=AMI_TEST_PIN_UNSET")


# --------------------------------------------------------------------------
# PKCS#11 backend on SoftHSM2
# --------------------------------------------------------------------------


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    with softhsm_token(tmp_path) as tok:
        monkeypatch.setenv("AMI_HSM_PIN", str(tok["pin"]))
        yield tok
        # Every test closes its vaults: the token must be logged out again.
        worker = vault_mod.pkcs11._get_worker()
        assert worker.call(lambda: dict(worker.logins)) == {}


def hsm_spec(tok: dict, label: str = "ami-kek", extra: str = "") -> str:
    return f"pkcs11:lib={tok['lib']};token={tok['token']};pin_env=AMI_HSM_PIN;label={label}{extra}"


@requires_softhsm
class TestPkcs11Vault:
    @pytest.mark.parametrize("size", [16, 24, 32])
    def test_round_trip(self, hsm: dict, size: int) -> None:
        v = open_vault(hsm_spec(hsm))
        assert isinstance(v, Pkcs11KeyVault)
        key = secrets.token_bytes(size)
        wrapped = v.wrap(key, ID)
        assert len(wrapped) == size + 24 + 8
        assert wrapped != key and key not in wrapped
        assert v.unwrap(wrapped, ID) == key
        assert v.wrap(key, ID) == wrapped  # RFC 3394 is deterministic
        with pytest.raises(WrongRow):
            v.unwrap(wrapped, key_identity("m000001", "ak", 2))
        v.close()

    def test_output_is_byte_identical_to_rfc3394(self, hsm: dict) -> None:
        from pkcs11 import Attribute, KeyType, ObjectClass

        v = open_vault(hsm_spec(hsm))
        # Import the RFC KEK as a locked-down token key next to ours.
        v.with_kek(lambda kek: kek.session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: RFC_KEK,
            Attribute.LABEL: "rfc-kek",
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
        }))
        rfc = open_vault(hsm_spec(hsm, "rfc-kek"))
        assert rfc.unwrap_legacy_many([RFC_WRAPPED]) == [RFC_KEY]  # the old format (migration)
        assert rfc.wrap(RFC_KEY, ID) == aes_key_wrap(RFC_KEK, RFC_KEY + binding(ID))
        key = secrets.token_bytes(32)
        assert rfc.wrap(key, ID) == aes_key_wrap(RFC_KEK, key + binding(ID))
        # Same bytes as the file backend under the same KEK.
        write_kek(hsm["conf"].parent / "rfc.kek", RFC_KEK)
        with FileKeyVault(hsm["conf"].parent / "rfc.kek") as file_vault:
            assert file_vault.wrap(key, ID) == rfc.wrap(key, ID)
            assert rfc.unwrap(file_vault.wrap(key, ID), ID) == key
        rfc.close()
        v.close()

    def test_kek_persists_in_token(self, hsm: dict) -> None:
        v1 = open_vault(hsm_spec(hsm))
        wrapped = v1.wrap(FIXED_KEY, ID)
        v1.close()  # logs out, closes the session, C_Finalize
        v2 = open_vault(hsm_spec(hsm))
        assert v2.unwrap(wrapped, ID) == FIXED_KEY
        v2.close()
        # And a separate process, with its own login, finds the same KEK.
        code = (
            "import sys; from ami.security.vault import open_vault\n"
            "v = open_vault(sys.argv[1])\n"
            "sys.stdout.write(v.unwrap(bytes.fromhex(sys.argv[2]), sys.argv[3].encode()).hex())\n"
            "v.close()\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, hsm_spec(hsm, extra=";create=no"), wrapped.hex(), ID.decode()],
            check=True, capture_output=True, text=True, timeout=60,
        )
        assert out.stdout == FIXED_KEY.hex()

    def test_two_open_vaults_share_one_login(self, hsm: dict) -> None:
        v1 = open_vault(hsm_spec(hsm))
        v2 = open_vault(hsm_spec(hsm))  # no USER_ALREADY_LOGGED_IN
        wrapped = v1.wrap(FIXED_KEY, ID)
        assert v2.unwrap(wrapped, ID) == FIXED_KEY
        v1.close()  # must not log v2 out
        assert v2.unwrap(wrapped, ID) == FIXED_KEY
        v2.close()

    def test_kek_is_sensitive_and_not_extractable(self, hsm: dict) -> None:
        from pkcs11 import Attribute
        from pkcs11.exceptions import AttributeSensitive

        v = open_vault(hsm_spec(hsm))
        attrs = v.with_kek(lambda k: {a: k[a] for a in (
            Attribute.EXTRACTABLE, Attribute.SENSITIVE, Attribute.TOKEN,
            Attribute.WRAP, Attribute.UNWRAP, Attribute.ENCRYPT, Attribute.DECRYPT,
            Attribute.NEVER_EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
        )})
        assert attrs[Attribute.EXTRACTABLE] is False
        assert attrs[Attribute.SENSITIVE] is True
        assert attrs[Attribute.NEVER_EXTRACTABLE] is True
        assert attrs[Attribute.ALWAYS_SENSITIVE] is True
        assert attrs[Attribute.TOKEN] is True
        assert attrs[Attribute.WRAP] and attrs[Attribute.UNWRAP]
        assert not attrs[Attribute.ENCRYPT] and not attrs[Attribute.DECRYPT]
        with pytest.raises(AttributeSensitive):
            v.with_kek(lambda k: k[Attribute.VALUE])
        v.close()

    def test_unwrap_many_1000(self, hsm: dict) -> None:
        v = open_vault(hsm_spec(hsm))
        keys = [secrets.token_bytes(16) for _ in range(1000)]
        ids = [key_identity(f"m{i:06d}", "ak", 3) for i in range(1000)]
        wrapped = [v.wrap(k, i) for k, i in zip(keys, ids)]
        assert v.unwrap_many(wrapped, ids) == keys
        assert v.unwrap_many([], []) == []
        v.close()

    def test_eight_threads_at_once(self, hsm: dict) -> None:
        v = open_vault(hsm_spec(hsm))
        start = threading.Barrier(8)

        def hammer(_: int) -> int:
            start.wait()  # all 8 threads really hit the vault together
            for _ in range(50):
                key = secrets.token_bytes(16)
                assert v.unwrap(v.wrap(key, ID), ID) == key
            return 50

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert sum(pool.map(hammer, range(8))) == 400

        # ...and every PKCS#11 call ran on the one worker thread.
        names = set()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for name in pool.map(
                lambda _: v.with_kek(lambda k: threading.current_thread().name), range(64)
            ):
                names.add(name)
        assert len(names) == 1 and names.pop().startswith("ami-pkcs11")
        v.close()

    def test_tampered_blob_raises(self, hsm: dict) -> None:
        v = open_vault(hsm_spec(hsm))
        wrapped = v.wrap(FIXED_KEY, ID)
        for i in (0, 7, 8, len(wrapped) - 1):
            with pytest.raises(VaultError, match="integrity") as err:
                v.unwrap(flip(wrapped, i), ID)
            assert_no_secret(str(err.value), FIXED_KEY, wrapped)
        with pytest.raises(VaultError, match="index 2"):
            v.unwrap_many([wrapped, wrapped, flip(wrapped, 3)], [ID] * 3)
        assert v.unwrap(wrapped, ID) == FIXED_KEY  # the session survived the errors
        v.close()

    def test_wrong_pin_refused_without_echo(self, hsm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AMI_HSM_PIN", "87654321")
        with pytest.raises(VaultError, match="PinIncorrect") as err:
            open_vault(hsm_spec(hsm))
        assert "87654321" not in str(err.value)
        # Already logged in: a second vault must still present the right PIN.
        v = Pkcs11KeyVault(str(hsm["lib"]), "ami", str(hsm["pin"]), "ami-kek")
        with pytest.raises(VaultError, match="wrong PIN") as err:
            Pkcs11KeyVault(str(hsm["lib"]), "ami", "87654321", "ami-kek")
        assert "87654321" not in str(err.value)
        v.close()

    def test_repr_shows_only_the_name(self, hsm: dict) -> None:
        v = open_vault(hsm_spec(hsm))
        assert repr(v) == str(v) == "<Pkcs11KeyVault pkcs11:ami/ami-kek>"
        assert str(hsm["pin"]) not in repr(vault_mod.pkcs11._get_worker())
        v.close()
        with pytest.raises(VaultError, match="closed"):
            v.wrap(FIXED_KEY, ID)

    def test_missing_kek_with_create_no(self, hsm: dict) -> None:
        with pytest.raises(VaultError, match="no such KEK"):
            open_vault(hsm_spec(hsm, "absent", ";create=no"))

    def test_extractable_kek_is_refused(self, hsm: dict) -> None:
        from pkcs11 import Attribute, KeyType, MechanismFlag

        v = open_vault(hsm_spec(hsm))
        v.with_kek(lambda k: k.session.generate_key(
            KeyType.AES, 128, label="weak", store=True,
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True},
        ))
        with pytest.raises(VaultError, match="extractable"):
            open_vault(hsm_spec(hsm, "weak"))
        v.close()

    def test_unknown_token(self, hsm: dict) -> None:
        with pytest.raises(VaultError, match="NoSuchToken"):
            Pkcs11KeyVault(str(hsm["lib"]), "no-such-token", str(hsm["pin"]), "k")


# --------------------------------------------------------------------------
# Wrapped keys bound to their row (both backends)
# --------------------------------------------------------------------------


@pytest.fixture(params=["file", pytest.param("pkcs11", marks=pytest.mark.softhsm)])
def any_vault(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    if request.param == "file":
        with FileKeyVault(tmp_path / "kek") as v:
            yield v
        return
    with softhsm_token(tmp_path) as tok:
        monkeypatch.setenv("AMI_HSM_PIN", str(tok["pin"]))
        v = open_vault(hsm_spec(tok))
        try:
            yield v
        finally:
            v.close()


def test_a_blob_moved_to_another_row_does_not_unwrap(any_vault) -> None:
    """Who can write the store but lacks the KEK can only move blobs around:
    an expired version into the active one, meter A's into meter B's, a key
    row's into a session row.  Each move fails, naming the row, never a key."""
    v = any_vault
    expired, active = secrets.token_bytes(16), secrets.token_bytes(16)
    a_v1, a_v2 = key_identity("mA", "cc_lan", 1), key_identity("mA", "cc_lan", 2)
    blob_v1, blob_v2 = v.wrap(expired, a_v1), v.wrap(active, a_v2)
    assert v.unwrap(blob_v2, a_v2) == active and v.unwrap(blob_v1, a_v1) == expired
    moves = [
        (blob_v1, a_v2),  # the expired key copied into the active row
        (blob_v2, key_identity("mB", "cc_lan", 2)),  # meter A's key into meter B's row
        (blob_v2, key_identity("mA", "ak", 2)),  # another key type
        (blob_v2, session_identity("mA", 2)),  # a session row
    ]
    for blob, identity in moves:
        with pytest.raises(WrongRow, match="bound to another row") as err:
            v.unwrap(blob, identity)
        assert identity.decode() in str(err.value)  # names the row
        assert err.value.reason == "wrapped_key_wrong_row"
        assert_no_secret(str(err.value), expired, active, blob)
    with pytest.raises(WrongRow, match="mB"):
        v.unwrap_many([blob_v2, blob_v2], [a_v2, key_identity("mB", "cc_lan", 2)])


def test_identities_are_unambiguous() -> None:
    assert key_identity("m1", "ak", 1) == b"ami-key|m1|ak|1"
    assert session_identity("m1", 7) == b"ami-session|m1|7"
    for bad in ("m|1", "", "m\n1"):
        with pytest.raises(VaultError):
            key_identity(bad, "ak", 1)
