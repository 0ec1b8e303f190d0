"""Suite 1 with the head-end's signing key in a PKCS#11 token (SoftHSM2).

The key pair is generated inside the token, its private half sensitive and
never extractable, and every signature of a suite-1 AARQ is made there; the
meters verify it with the public half, as for a file key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim import INTERVAL, Sim  # noqa: E402
from softhsm import requires_softhsm, softhsm_token  # noqa: E402

from ami.protocol import suite1  # noqa: E402
from ami.security.vault import Pkcs11KeyVault, VaultError  # noqa: E402


@requires_softhsm
def test_token_signing_key_is_generated_inside_and_never_leaves(tmp_path: Path) -> None:
    from pkcs11 import Attribute, KeyType, ObjectClass

    with softhsm_token(tmp_path) as tok:
        vault = Pkcs11KeyVault(str(tok["lib"]), str(tok["token"]), str(tok["pin"]), "ami-kek")
        try:
            signer = vault.signer()
            public = signer.public_key_bytes()
            assert len(public) == 64
            signature = signer.sign(b"an AARQ")
            suite1.verify_signature(public, b"an AARQ", signature)  # software verifies the token's r || s
            with pytest.raises(suite1.SignatureInvalid):
                suite1.verify_signature(public, b"another AARQ", signature)
            assert vault.signer().public_key_bytes() == public  # found again, not regenerated

            def inspect(_kek):
                session = vault._login.session  # noqa: SLF001 (test)
                key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC,
                                      label="ami-kek-sign")
                with pytest.raises(Exception):  # the token refuses to hand out the private value
                    key[Attribute.VALUE]
                return key[Attribute.SENSITIVE], key[Attribute.EXTRACTABLE]

            assert vault.with_kek(inspect) == (True, False)
        finally:
            vault.close()


@requires_softhsm
def test_suite1_meters_associate_with_a_headend_signing_in_the_token(tmp_path: Path) -> None:
    with softhsm_token(tmp_path) as tok:
        vault = Pkcs11KeyVault(str(tok["lib"]), str(tok["token"]), str(tok["pin"]), "ami-kek")
        try:
            signer = vault.signer()
            sim = Sim(4, 2, suites="1")
            sim.headend_signer = signer
            sim.config = type(sim.config)(**{**{f: getattr(sim.config, f) for f in sim.config.__slots__},
                                            "headend_sign_public": signer.public_key_bytes()})
            for mid in sim.titles:  # meters built with the token's public key
                sim.meters[mid] = sim._build_meter(mid, boot_at=sim.now)  # noqa: SLF001
            sim.engine = sim._new_engine()  # noqa: SLF001
            sim.engine.load(sim.store.snapshot(), sim.now)
            sim.run(3 * INTERVAL)
            assert sim.all_associated()
            assert sim.engine.counters["associations_suite1"] == 4
            sim.assert_readings()
            sim.assert_clean()
        finally:
            vault.close()


@requires_softhsm
def test_no_signing_key_is_created_when_asked_not_to(tmp_path: Path) -> None:
    with softhsm_token(tmp_path) as tok:
        vault = Pkcs11KeyVault(str(tok["lib"]), str(tok["token"]), str(tok["pin"]), "ami-kek")
        try:
            with pytest.raises(VaultError, match="no signing key"):
                vault.signer(create=False)
        finally:
            vault.close()
