"""``ami attack``: what a stolen key store, a relay or the broker give an attacker.

Runnable evidence for docs/security.md, in three sub-actions:

``ami attack capture --out FILE --duration S [--user relay-c0001 ...]``
    What a compromised relay or broker operator sees: subscribes to the PLC
    and WAN topics (as each ``--user``, with its password from
    DATA/bus/identities/<user>.secret, or anonymously) and writes every message as a
    msgpack record ``{"t", "u", "topic", "p"}``.  Reports how many frames it
    saw and shows they are ciphertext: nothing in them decodes.

``ami attack store --store DB --capture FILE [--kek FILE | --vault SPEC | --no-kek] [--host-dir DIR]``
    The stolen head-end database.  ``without_kek``: what the dump yields
    (topology, titles, wrapped blobs, readings in clear) and proof that no
    key is usable.  ``with_kek``: every key unwrapped (expired ones too),
    every session key ever transported recovered from the captured AARQs,
    every captured frame decrypted (no forward secrecy), a forged reading
    accepted by a ``HeadEndEngine`` loaded from the stolen store
    (impersonation) and a CCC key_transfer accepted by a ``Meter``
    (takeover).  ``--host-dir`` also searches the files lying beside the
    database (KEK file, factory key file).

``ami attack hsm --store DB --vault pkcs11:... --token-copy DIR [--capture FILE]``
    The same theft when the KEK lives in a PKCS#11 token: the database plus a
    copy of the token directory without the PIN yield nothing; with the PIN
    on the live host the KEK can be *used* (unwrap) but not read out.

The report never contains key material: counts, ids and verdicts only.

Modules, by job:

* ``capture``: the bus capture (relay's / broker operator's view) and its summary;
* ``traffic``: frames out of a capture, the attacker's key ring, decryption;
* ``store``: the stolen database read without the KEK (through
  :func:`headend.store.read_store_file`), the KEK search, files beside it;
* ``with_kek``: the database plus the KEK: unwrapping, forged readings,
  meter takeover;
* ``hsm``: the KEK inside a PKCS#11 token;
* ``cli``: ``add_arguments``/``main`` (``ami attack``, ``python -m ami.tools.attack``)
  and the human summary.

The names below are re-exported for the tests and interactive use.
"""

from __future__ import annotations

from ami.tools.attack.capture import (
    CAPTURE_FILTERS,
    capture,
    capture_filters,
    capture_summary,
    read_capture,
    read_captures,
)
from ami.tools.attack.cli import add_arguments, human_summary, main, store_report
from ami.tools.attack.hsm import copy_token_dir, hsm_attack, pkcs11_params
from ami.tools.attack.store import (
    Dump,
    host_files,
    kek_search,
    read_dump,
    steal,
    without_kek,
)
from ami.tools.attack.traffic import (
    Frame,
    KeyRing,
    Known,
    Opened,
    TrafficResult,
    decrypt_traffic,
    frames_from_records,
    headend_title_from,
    keystream_probe,
    kind_of,
    max_ic_seen,
)
from ami.tools.attack.with_kek import (
    RawKekVault,
    Unwrapped,
    attacker_aarq,
    forge_readings,
    meter_from_store,
    take_over,
    takeover_all,
    unwrap_dump,
    with_vault,
)

__all__ = [
    "CAPTURE_FILTERS",
    "Dump",
    "Frame",
    "KeyRing",
    "Known",
    "Opened",
    "RawKekVault",
    "TrafficResult",
    "Unwrapped",
    "add_arguments",
    "attacker_aarq",
    "capture",
    "capture_filters",
    "capture_summary",
    "copy_token_dir",
    "decrypt_traffic",
    "forge_readings",
    "frames_from_records",
    "headend_title_from",
    "host_files",
    "hsm_attack",
    "human_summary",
    "kek_search",
    "keystream_probe",
    "kind_of",
    "main",
    "max_ic_seen",
    "meter_from_store",
    "pkcs11_params",
    "read_capture",
    "read_captures",
    "read_dump",
    "steal",
    "store_report",
    "take_over",
    "takeover_all",
    "unwrap_dump",
    "with_vault",
    "without_kek",
]
