"""``ami headend-worker``: one clustered head-end worker (headend/worker.py, docs/scale-out.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ami.runtime.logs import configure_logging
from ami.runtime.service import run_service


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    h = config.get("headend", {})
    c = config.get("cluster", {})
    parser.add_argument("--amqp", default=c.get("amqp", "amqp://guest:guest@127.0.0.1:5681/,"
                                                       "amqp://guest:guest@127.0.0.1:5682/,"
                                                       "amqp://guest:guest@127.0.0.1:5683/"),
                        help="the cluster's AMQP URLs, comma separated (failover in turn)")
    parser.add_argument("--store", default=c.get("store", "postgresql://postgres@127.0.0.1:5432/ami"),
                        help="postgresql://... (shared by every worker)")
    parser.add_argument("--vault", default=h.get("vault", "file:headend.kek"), help="file:PATH or pkcs11:...")
    parser.add_argument("--partitions", type=int, default=int(c.get("partitions", 8)),
                        help="partition queues (fixed for the life of the deployment)")
    parser.add_argument("--index", type=int, default=0, help="this worker's number (its home partitions)")
    parser.add_argument("--workers", type=int, default=int(c.get("workers", 3)), help="workers expected")
    parser.add_argument("--prefetch", type=int, default=int(c.get("prefetch", 64)))
    parser.add_argument("--id", default=None, help="worker identity (default worker<index>)")
    parser.add_argument("--data", type=Path, default=Path(config.get("data", {}).get("dir", "data")))
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", choices=("console", "json"), default=None)


def main(args: argparse.Namespace, config: dict) -> int:
    from headend.worker import Worker

    configure_logging(args.log_level, log_format=args.log_format)
    config = dict(config)
    config["headend"] = {**config.get("headend", {}), "vault": args.vault}
    urls = [u.strip() for u in args.amqp.split(",") if u.strip()]
    worker = Worker(config, args.data, urls, args.store, args.partitions, args.id or f"worker{args.index}",
                    index=args.index, workers=args.workers, prefetch=args.prefetch)
    return run_service(worker.run)
