"""``python -m ami.tools.attack ...``: ``ami attack ...`` without going through ``ami.cli``."""

from __future__ import annotations

import argparse
import sys

from ami.runtime.config import load_config
from ami.tools.attack.cli import add_arguments, main


def run() -> int:
    config = load_config()
    parser = argparse.ArgumentParser(prog="ami attack", description="attacker's view: capture traffic, break a "
                                     "stolen store, HSM case")
    add_arguments(parser, config)
    return main(parser.parse_args(), config)


if __name__ == "__main__":
    sys.exit(run())
