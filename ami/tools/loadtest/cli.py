"""``ami loadtest``: run the whole pipeline (fleet -> relays -> head-end) under a
constant-rate load and measure it (docs/benchmarks.md, "Load tests").

    ami loadtest --meters 10000 --concentrators 20 --rate 5000 --duration 30 --baseline \\
                 --report out.json --csv out.csv --plot out.png --min-fps 4500 --max-p99-ms 250 --max-loss 0

    ami loadtest --cluster-workers 2 --meters 5000 --rate 2000 --duration 20   # the clustered head-end

Exit status: 0 when every threshold set holds, 1 when one is missed, 2 when
the run itself failed (a service died, a start-up timed out) or could not
run here (``--cluster-workers`` without rabbitmq-server or PostgreSQL).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

#: The realistic topology: France has ~35 million meters behind ~800,000 concentrators.
METERS_PER_CONCENTRATOR = 50


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text or not text.startswith("AMI__"):
        raise argparse.ArgumentTypeError("takes AMI__SECTION__KEY=VALUE")
    key, value = text.split("=", 1)
    return key, value


def add_arguments(parser: argparse.ArgumentParser, config: dict) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    load = parser.add_argument_group("load (emqtt-bench / wrk2 style)")
    load.add_argument("--meters", type=_positive(int), default=1000, help="meters provisioned (the fleet)")
    load.add_argument("--concentrators", type=_positive(int), default=None,
                      help="concentrators (relays; one MQTT connection per PLC segment on each side); default: "
                           f"one per {METERS_PER_CONCENTRATOR} meters, the realistic topology")
    load.add_argument("--rate", type=_positive(float), default=1000.0,
                      help="target frames/s (readings), constant-rate schedule")
    load.add_argument("--duration", type=_positive(float), default=30.0, help="measurement window (s)")
    load.add_argument("--ramp-up", type=_non_negative, default=5.0,
                      help="meters boot spread over this long (s); the window opens after it, once all are associated")
    load.add_argument("--mass-boot", action="store_true",
                      help="every meter boots at the same instant and the window opens at once: readings flow "
                           "while the boot storm is absorbed (a region after a power cut)")
    load.add_argument("--fleet-nice", type=int, default=0, choices=range(0, 20), metavar="N",
                      help="run the fleet at this niceness (0-19): meters are hardware of their own, so above "
                           "capacity the generator should take only the CPU the pipeline leaves")
    load.add_argument("--find-capacity", action="store_true",
                      help="search the highest constant rate holding --max-p99-ms (default 250), 0 lost, 0 rejected: "
                           "runs of --duration s, starting at --rate; --report/--plot describe the steps")
    load.add_argument("--capacity-precision", type=_positive(float), default=0.1,
                      help="--find-capacity stops when the bracket is narrower than this fraction")
    load.add_argument("--qos", type=int, choices=[0, 1, 2], default=int(config.get("bus", {}).get("qos", 1)))
    load.add_argument("--payload-size", type=_positive(int),
                      help="bytes per PLC uplink frame: readings are padded up to it (default: their natural size)")
    load.add_argument("--broker", default=None,
                      help="mqtt://host:port of an existing broker; 'mosquitto' starts a private Mosquitto on a free "
                           "port; default: the embedded amqtt broker on a free port")
    load.add_argument("--broker-pid", type=int, help="pid of an external broker, to report its CPU and RSS")
    load.add_argument("--cluster-workers", type=int, default=0, metavar="N",
                      help="the clustered head-end instead of the single process: start a 3-node RabbitMQ cluster "
                           "in the run folder, a fresh PostgreSQL database, N `ami headend-worker` processes; relays "
                           "and fleet use every node's MQTT listener (failover list); exit 2 when rabbitmq-server "
                           "or PostgreSQL is absent (docs/scale-out.md)")
    load.add_argument("--partitions", type=_positive(int), default=8,
                      help="--cluster-workers: partition queues")
    load.add_argument("--cluster-pg", default="postgresql://postgres@127.0.0.1:5432",
                      help="--cluster-workers: the PostgreSQL server (trust auth) where the run's database is "
                           "created, and dropped at the end unless --keep")
    load.add_argument("--cluster-dir", type=Path, default=None,
                      help="--cluster-workers: use the running cluster of `ami cluster up --dir DIR` (left running) "
                           "instead of starting one in the run folder")
    load.add_argument("--baseline", action="store_true",
                      help="also run the bare topology (same processes, connections, payload sizes; no sealing, "
                           "no opening, no forwarding, no head-end) and report pipeline/bare")
    load.add_argument("--rotate-all-at", type=_non_negative, metavar="SECONDS",
                      help="renew every session key this long into the window (renewal storm)")
    topo = parser.add_argument_group("topology and tuning")
    topo.add_argument("--fleet-processes", type=_positive(int), default=1, help="ami meters processes (--shard i/n)")
    topo.add_argument("--relay-processes", type=_positive(int), default=1,
                      help="ami concentrator processes (--shard i/n)")
    topo.add_argument("--batch-max-frames", type=_positive(int), help="relay WAN batch size (default: config)")
    topo.add_argument("--batch-max-delay-ms", type=_non_negative, help="relay WAN batch delay (default: config)")
    topo.add_argument("--set", dest="env", action="append", type=_env_pair, default=[], metavar="AMI__S__K=V",
                      help="configuration override passed to every service (repeatable)")
    topo.add_argument("--sample-interval", type=_positive(float), default=1.0,
                      help="metrics interval of every service and of the report series (s)")
    topo.add_argument("--drain", type=_non_negative, default=30.0,
                      help="after the window the load drops to a tenth (gap-fill recovers what could not flow live) "
                           "for at most this long, then the fleet stops and the head-end gets as long again to store "
                           "what was pushed")
    topo.add_argument("--no-recover", dest="recover", action="store_false",
                      help="stop the fleet right after the window (no low-load recovery phase)")
    topo.add_argument("--settle-max", type=_non_negative, default=120.0,
                      help="after the ramp-up, wait at most this long for every meter to associate")
    topo.add_argument("--storm-timeout", type=_non_negative, default=300.0,
                      help="after the window, wait at most this long for the renewal storm to finish")
    topo.add_argument("--workdir", type=Path, help="parent of the run's temporary folder (default: system temp)")
    topo.add_argument("--keep", action="store_true", help="keep the run's folder (data, logs)")
    topo.add_argument("--profile", help="py-spy record these roles (headend,fleet,relays,broker or all) to SVG "
                                        "in the run folder (kept)")
    out = parser.add_argument_group("output and thresholds")
    out.add_argument("--report", type=Path, help="write the JSON report here")
    out.add_argument("--csv", type=Path, help="write the time series here")
    out.add_argument("--plot", type=Path, help="write throughput and latency over time here (PNG)")
    out.add_argument("--min-fps", type=_non_negative, help="fail (exit 1) below this many accepted frames/s")
    out.add_argument("--max-p99-ms", type=_non_negative, help="fail (exit 1) above this p99 latency")
    out.add_argument("--max-loss", type=_non_negative,
                     help="fail (exit 1) above this fraction of pushed readings lost (0: none may be lost)")
    out.add_argument("--quiet", action="store_true", help="no live progress")
    out.add_argument("--log-level", default="info")


def options_from_args(args: argparse.Namespace):
    from ami.tools.loadtest.run import Options

    if args.concentrators is None:
        args.concentrators = max(1, args.meters // METERS_PER_CONCENTRATOR)
    if args.concentrators > args.meters:
        raise SystemExit("--concentrators cannot exceed --meters")
    if args.fleet_processes > args.concentrators or args.relay_processes > args.concentrators:
        raise SystemExit("--fleet-processes / --relay-processes cannot exceed --concentrators")
    if args.cluster_workers < 0:
        raise SystemExit("--cluster-workers must be >= 0")
    if args.cluster_workers:
        for flag, value in (("--broker", args.broker), ("--broker-pid", args.broker_pid),
                            ("--baseline", args.baseline or None), ("--rotate-all-at", args.rotate_all_at)):
            if value is not None:
                # --rotate-all-at: campaign completion is not aggregated across workers yet.
                raise SystemExit(f"{flag} is not supported with --cluster-workers")
    return Options(
        meters=args.meters,
        concentrators=args.concentrators,
        rate=args.rate,
        duration=args.duration,
        ramp_up=args.ramp_up,
        qos=args.qos,
        payload_size=args.payload_size,
        broker=args.broker,
        broker_pid=args.broker_pid,
        baseline=args.baseline,
        rotate_all_at=args.rotate_all_at,
        fleet_processes=args.fleet_processes,
        relay_processes=args.relay_processes,
        batch_max_frames=args.batch_max_frames,
        batch_max_delay_ms=args.batch_max_delay_ms,
        sample_interval=args.sample_interval,
        drain=args.drain,
        settle_max=args.settle_max,
        storm_timeout=args.storm_timeout,
        workdir=args.workdir,
        keep=args.keep,
        env=dict(args.env),
        config_file=getattr(args, "config_file", None),
        live=not args.quiet,
        profile=args.profile,
        mass_boot=args.mass_boot,
        fleet_nice=args.fleet_nice,
        recover=args.recover,
        cluster_workers=args.cluster_workers,
        partitions=args.partitions,
        cluster_pg=args.cluster_pg,
        cluster_dir=args.cluster_dir,
    )


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace, config: dict) -> int:
    from rich.console import Console

    from ami.tools.loadtest import report as reportlib
    from ami.tools.loadtest.run import LoadTest, LoadTestError, LoadTestSkipped

    console = Console(stderr=True)
    # SIGTERM (a supervisor, `kill`) takes the Ctrl-C path: every run's
    # cleanup stops the broker, services and cluster it started, instead of
    # leaving them running as orphans.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.cluster_workers:
        from ami.tools.loadtest.clustered import missing

        why = missing(args.cluster_pg)
        if why:
            console.print(f"[yellow]skipped:[/yellow] --cluster-workers needs RabbitMQ and PostgreSQL: {why}",
                          soft_wrap=True)
            return 2
    if args.find_capacity:
        from ami.tools.loadtest.capacity import find_capacity_main

        return find_capacity_main(args, console, options_from_args)
    options = options_from_args(args)
    test = LoadTest(options, console=console)
    test.thresholds = {"min_fps": args.min_fps, "max_p99_ms": args.max_p99_ms, "max_loss": args.max_loss}
    try:
        report = test.run()
    except LoadTestSkipped as exc:
        console.print(f"[yellow]skipped:[/yellow] {exc}", soft_wrap=True)
        return 2
    except LoadTestError as exc:
        console.print(f"[red]load test failed:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    if args.csv:
        reportlib.write_csv(report, args.csv)
    if args.plot:
        from ami.tools.loadtest.plot import plot_report

        plot_report(report, args.plot)
    Console(file=sys.stdout).print(reportlib.summary_table(report))
    for note in report["notes"]:
        console.print(f"note: {note}")
    return 0 if report["thresholds"]["passed"] else 1
