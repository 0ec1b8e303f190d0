"""``ami meters`` whose readings carry a ``pad`` field (``ami loadtest --payload-size``).

    python -m ami.loadtest.padded_meters PAD_BYTES meters --broker ... --rate ... --stamp

A stopgap until ``ami meters`` has a padding flag of its own: before running
the ``meters`` subcommand it wraps the message encoder the meter module uses
so that every ``Reading`` gets ``"pad": <PAD_BYTES zero bytes>`` in its msgpack
map.  The head-end's ``decode_message`` ignores unknown fields, the frame is
sealed (and authenticated) with the pad inside, and nothing else changes:
gap-fill replies, events and association frames keep their natural size.
"""

from __future__ import annotations

import sys

import msgpack


def install(pad: int) -> None:
    import ami.machines.meter as meter_module
    from ami.protocol.messages import VERSION, Reading, encode_message

    filler = bytes(pad)

    def encode_padded(msg):  # same map as encode_message, plus the pad
        if type(msg) is Reading:
            m = {"t": "rd", **msg.to_map(), "pad": filler, "v": VERSION}
            return msgpack.packb(m, use_bin_type=True)
        return encode_message(msg)

    meter_module.encode_message = encode_padded


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].isdigit():
        print("usage: python -m ami.loadtest.padded_meters PAD_BYTES meters ARGS...", file=sys.stderr)
        return 2
    pad = int(argv[0])
    if pad > 0:
        install(pad)
    from ami.cli import main as ami_main

    return ami_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
