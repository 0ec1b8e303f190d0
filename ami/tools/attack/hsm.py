"""``ami attack hsm``: the stolen database when the KEK lives in a PKCS#11 token.

The database plus a copy of the token directory without the PIN yield
nothing; with the PIN on the live host the KEK can be *used* (unwrap) but
not read out, and the meter keys it unwrapped stay usable afterwards.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ami.tools.attack.store import Dump, kek_search
from ami.tools.attack.traffic import Frame, decrypt_traffic
from ami.tools.attack.with_kek import Unwrapped, with_vault


def pkcs11_params(spec: str) -> dict[str, str]:
    scheme, _, rest = spec.partition(":")
    if scheme != "pkcs11":
        raise ValueError("--vault must be a pkcs11: spec")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        k, _, v = item.partition("=")
        params[k.strip()] = v.strip()
    return params


def _with_softhsm_conf(conf: Path | None):
    """Point SoftHSM2 at ``conf`` for the block (it reads SOFTHSM2_CONF at C_Initialize)."""
    from contextlib import contextmanager

    @contextmanager
    def block() -> Iterator[None]:
        previous = os.environ.get("SOFTHSM2_CONF")
        if conf is not None:
            os.environ["SOFTHSM2_CONF"] = str(conf)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("SOFTHSM2_CONF", None)
            else:
                os.environ["SOFTHSM2_CONF"] = previous

    return block()


def copy_token_dir(token_dir: Path, dest: Path) -> Path:
    """Copy a SoftHSM2 token directory (what a thief with file access takes)
    and write a softhsm2.conf pointing to the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(token_dir, dest / "tokens")
    conf = dest / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {dest / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def hsm_attack(dump: Dump, frames: list[Frame], *, vault_spec: str, token_copy: Path | None,
               pin_guesses: Iterable[str] = ("", "0000", "1234", "123456", "password"),
               live_pin: str | None = None) -> dict[str, Any]:
    """The stolen DB when the KEK is inside a PKCS#11 token.

    ``token_copy``: a copy of the token directory (with its softhsm2.conf),
    used without the PIN.  ``live_pin``: the attacker on the live host with
    the PIN (read from the head-end's environment) can call the token.
    """
    from ami.security.vault import Pkcs11KeyVault, VaultError
    from ami.security.vault.pkcs11 import secret_keys_visible_without_login

    params = pkcs11_params(vault_spec)
    lib, token, label = params["lib"], params["token"], params.get("label") or "ami-kek"
    report: dict[str, Any] = {}
    at_rest: dict[str, Any] = {"db": kek_search(dump.raw, dump.wrapped_blobs[0]) if dump.wrapped_blobs else {"hits": 0}}
    if token_copy is not None:
        conf = Path(token_copy) / "softhsm2.conf"
        data = b"".join(p.read_bytes() for p in sorted(Path(token_copy).rglob("*")) if p.is_file())
        at_rest["token_copy_files"] = kek_search(data, dump.wrapped_blobs[0]) if dump.wrapped_blobs else {"hits": 0}
        refused = 0
        guesses = list(pin_guesses)
        with _with_softhsm_conf(conf):
            for guess in guesses:
                try:
                    v = Pkcs11KeyVault(lib, token, guess, label, create=False)
                except VaultError:
                    refused += 1
                    continue
                v.close()
            at_rest["pin_guesses"] = len(guesses)
            at_rest["pin_guesses_refused"] = refused
            at_rest["private_objects_visible_without_login"] = secret_keys_visible_without_login(lib, token)
    kek_hits = sum(v.get("hits", 0) for v in at_rest.values() if isinstance(v, dict))
    pin_found = at_rest.get("pin_guesses", 0) - at_rest.get("pin_guesses_refused", 0)
    at_rest["keys_usable"] = len(dump.wrapped_blobs) if kek_hits or pin_found else 0
    at_rest["frames_decrypted"] = 0
    report["without_pin"] = at_rest
    if live_pin is not None:
        report["live_host_with_pin"] = _live_use(dump, frames, lib, token, label, live_pin)
        if token_copy is not None:
            with _with_softhsm_conf(Path(token_copy) / "softhsm2.conf"):
                try:
                    v = Pkcs11KeyVault(lib, token, live_pin, label, create=False)
                    try:
                        v.unwrap(dump.wrapped_blobs[0], dump.wrapped_identities[0])
                        report["token_copy_with_pin_unwraps"] = True
                    finally:
                        v.close()
                except VaultError:
                    report["token_copy_with_pin_unwraps"] = False
            report["note"] = ("SoftHSM2 is software: a copy of its token directory plus the PIN is as good as "
                              "the KEK. A hardware HSM's key cannot be copied; only the live PIN session matters.")
    return report


def _live_use(dump: Dump, frames: list[Frame], lib: str, token: str, label: str, pin: str) -> dict[str, Any]:
    from pkcs11 import Attribute, MechanismFlag, PKCS11Error
    from pkcs11 import KeyType as P11KeyType

    from ami.security.vault import Pkcs11KeyVault, VaultError

    vault = Pkcs11KeyVault(lib, token, pin, label, create=False)
    out: dict[str, Any] = {}
    keys = Unwrapped({}, {}, 0)
    try:
        attrs = vault.with_kek(lambda k: {"extractable": bool(k[Attribute.EXTRACTABLE]),
                                          "sensitive": bool(k[Attribute.SENSITIVE]),
                                          "never_extractable": bool(k[Attribute.NEVER_EXTRACTABLE])})
        out["kek_attributes"] = attrs

        def read_value(k: Any) -> str:
            try:
                k[Attribute.VALUE]
                return "read"
            except PKCS11Error as exc:
                return type(exc).__name__

        out["kek_value_read"] = vault.with_kek(read_value)

        def export(k: Any) -> str:
            # Wrap the KEK under a key of the attacker's own: the token refuses.
            wrapper = k.session.generate_key(P11KeyType.AES, 128, store=False,
                                             capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP)
            try:
                wrapper.wrap_key(k)
                return "exported"
            except PKCS11Error as exc:
                return type(exc).__name__
            finally:
                wrapper.destroy()

        out["kek_export_by_wrapping"] = vault.with_kek(export)
        report, traffic, keys = with_vault(dump, vault, frames, forge=False, takeover=False)
        out["use"] = {"keys_unwrapped": report["keys_unwrapped"],
                      "frames_decrypted": report["traffic"]["frames_decrypted"],
                      "readings_decrypted": report["traffic"]["readings_decrypted"],
                      # Suite 1: the token unwraps every stored key, none of which
                      # opens a recorded suite-1 session (agreed, never stored).
                      "by_suite": {s: {"dc_decrypted": t["dc_decrypted"], "dc_total": t["dc_total"],
                                       "readings_decrypted": t["readings_decrypted"]}
                                   for s, t in report["traffic_by_suite"].items()}}
    finally:
        vault.close()
    try:
        vault.unwrap(dump.wrapped_blobs[0], dump.wrapped_identities[0])
        out["after_access_unwrap"] = "worked"
    except VaultError:
        out["after_access_unwrap"] = "refused"
    # What the attacker still holds once the access is over: not the KEK, but
    # every meter key it had the token unwrap (the head-end unwraps them into
    # its own memory to use them), and they keep working on the capture.
    kept = decrypt_traffic(frames, keys.ring())
    out["after_access"] = {
        "kek_held": False,
        "meter_keys_kept": len(keys.keys) + len(keys.sessions),
        "frames_still_decrypted_with_kept_keys": len(kept.opened),
    }
    return out
