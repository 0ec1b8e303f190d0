"""A throw-away SoftHSM2 token for tests (a helper module, not a conftest).

    from softhsm import softhsm_token

    def test_x(tmp_path):
        with softhsm_token(tmp_path) as tok:
            vault = Pkcs11KeyVault(tok["lib"], tok["token"], tok["pin"], "kek")
            ...
            vault.close()

Each token lives in its own directory under ``tmp_path`` with its own
softhsm2.conf, pointed to by SOFTHSM2_CONF while the block runs, so tests
never touch /var/lib/softhsm or each other.  SoftHSM2 reads SOFTHSM2_CONF in
C_Initialize, and ami.security.vault finalizes the module when its last vault closes:
close every vault inside the block, or the next test still sees this token.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SOFTHSM_LIB = os.environ.get("SOFTHSM2_LIB", "/usr/lib/softhsm/libsofthsm2.so")
SKIP_REASON = "SoftHSM2 not installed (apt-get install softhsm2)"


def softhsm_installed() -> bool:
    return Path(SOFTHSM_LIB).is_file() and shutil.which("softhsm2-util") is not None


def requires_softhsm(obj):  # type: ignore[no-untyped-def]
    """Decorator for tests (or classes) that need SoftHSM2; marks them `softhsm`."""
    skip = pytest.mark.skipif(not softhsm_installed(), reason=SKIP_REASON)
    return pytest.mark.softhsm(skip(obj))


@contextmanager
def softhsm_token(
    tmp_path: Path, *, label: str = "ami", so_pin: str = "1234", pin: str = "5678"
) -> Iterator[dict[str, object]]:
    """Initialise a fresh token; yield dict(lib, token, pin, conf)."""
    if not softhsm_installed():
        pytest.skip(SKIP_REASON)
    token_dir = tmp_path / "softhsm-tokens"
    token_dir.mkdir(mode=0o700)
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--so-pin", so_pin, "--pin", pin],
            check=True,
            capture_output=True,
        )
        yield {"lib": SOFTHSM_LIB, "token": label, "pin": pin, "conf": conf}
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
