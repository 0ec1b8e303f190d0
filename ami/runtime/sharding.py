"""Which PLC segments a fleet or relay process serves: all, a list, or a shard.

``--shard i/n`` (1-based) takes every n-th segment starting with the i-th, so
``-c meters=3`` style deployments split the network without overlap.
"""

from __future__ import annotations

import argparse


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/", 1))
    except ValueError:
        raise argparse.ArgumentTypeError("--shard takes i/n, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError("--shard i/n needs 1 <= i <= n")
    return i, n


def parse_list(text: str) -> list[str]:
    return [x for x in (p.strip() for p in text.split(",")) if x]


def select(known: list[str], chosen: list[str] | None, shard: tuple[int, int] | None) -> list[str]:
    """The segments to serve: ``chosen`` (checked), a shard of ``known``, or all."""
    if chosen:
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ValueError(f"unknown segments: {', '.join(unknown[:5])}")
        return list(dict.fromkeys(chosen))
    if shard:
        i, n = shard
        if not 1 <= i <= n:
            raise ValueError("--shard i/n needs 1 <= i <= n")
        return sorted(known)[i - 1 :: n]
    return list(known)
