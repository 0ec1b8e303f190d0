"""The attacks run against one stolen store and capture (used by ``ami attack store`` and ``compare``)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from ami.tools.attack.capture import read_captures
from ami.tools.attack.store import host_files, read_dump, steal, without_kek
from ami.tools.attack.traffic import frames_from_records
from ami.tools.attack.with_kek import RawKekVault, with_vault

__all__ = ["store_report"]


def store_report(db: Path, captures: list[Path], *, kek: bytes | None = None, vault: Any = None,
                 host_dir: Path | None = None, headend_sign_public: bytes | None = None) -> dict[str, Any]:
    frames, _ = frames_from_records(read_captures(captures)) if captures else ([], Counter())
    with tempfile.TemporaryDirectory(prefix="ami-dump-") as tmp:
        dump = read_dump(steal(db, Path(tmp)))
        report: dict[str, Any] = {"capture": {"frames": len(frames)}, "without_kek": without_kek(dump, frames)}
        if kek is not None:
            vault = RawKekVault(kek)
        if vault is not None:
            report["with_kek"], _t, _k = with_vault(dump, vault, frames, headend_sign_public=headend_sign_public)
        if host_dir is not None:
            report["host_files"] = host_files(host_dir, dump, frames, skip=[db])
    return report
