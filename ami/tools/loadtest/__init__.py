"""``ami loadtest``: run the whole pipeline under a constant-rate load and measure it.

Modules:

* ``cli``: the subcommand (flags in the style of emqtt-bench and wrk2);
* ``run``: the orchestration: provisioning, broker, service subprocesses,
  the monitor collector, the phases (bare baseline, pipeline, renewal storm),
  drain and the final counts;
* ``bare``: the baseline processes (same connections and payload sizes as the
  fleet and the relays, no sealing, no opening, no forwarding, no head-end);
* ``report``: the pure report builder, thresholds, CSV and the summary table;
* ``hdr``: merging the head-end's per-interval HDR latency histograms;
* ``plot``: throughput and latency percentiles over time (matplotlib PNG).

``--payload-size`` runs ``ami meters --pad N`` (readings carry a ``pad`` field).

The report schema is documented in docs/benchmarks.md ("Load tests").
"""
