"""``ami config``: the effective configuration and where each value comes from.

TOML by default (the source as a trailing comment), JSON with ``--json``::

    {"config": {...}, "sources": {"headend.session_max_age_s": {"source": "env",
     "name": "AMI__HEADEND__SESSION_MAX_AGE_S"}, ...}, "defaults_file": ".../ami/runtime/default.toml"}

Sources: ``default`` (the packaged ami/runtime/default.toml), ``file`` (with
its path: --config, $AMI_CONFIG or config/local.toml) or ``env`` (with the
variable's name).
"""

from __future__ import annotations

import argparse
import json
import sys

from ami.runtime.config import DEFAULT_FILE, dump_toml, load_config_with_sources


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    parser.add_argument("--json", action="store_true", help="JSON with a sources map instead of TOML")


def _describe(origin: dict[str, str]) -> str:
    if origin["source"] == "file":
        return f"file {origin['path']}"
    if origin["source"] == "env":
        return f"env {origin['name']}"
    return "default"


def main(args: argparse.Namespace, config: dict) -> int:
    # The same loader the dispatcher used, asked for provenance too.
    effective, sources = load_config_with_sources(getattr(args, "config", None))
    if args.json:
        out = {"config": effective, "sources": sources, "defaults_file": str(DEFAULT_FILE)}
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    header = (
        "# Effective configuration of `ami`.  Defaults: "
        f"{DEFAULT_FILE}; each value's source is on its line.\n\n"
    )
    comments = {name: _describe(origin) for name, origin in sources.items()}
    sys.stdout.write(header + dump_toml(effective, comments))
    return 0
