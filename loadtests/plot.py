"""The fan-out sweep as a picture: deliveries per second and p99 delivery latency against the number of streams,
one line per server.

    .venv/bin/python -m loadtests.fanout --sweep 100,500,1000,2000,5000 --repeat 1 --json sweep.json
    .venv/bin/python -m loadtests.plot sweep.json loadtests/fanout.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt

from loadtests.fanout import SERVERS, TITLES


def plot(figures: dict[str, Any], output: Path) -> None:
    mpl.use("Agg")  # files only, no display
    runs = sorted(figures["runs"], key=lambda run: run["streams"])
    figure, (rate, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in SERVERS:
        points = [(run["streams"], run["saturated"][kind]) for run in runs if kind in run["saturated"]]
        if not points:
            continue
        streams = [n for n, _ in points]
        rate.plot(streams, [r["deliveries_per_second"] for _, r in points], marker="o", label=TITLES[kind])
        latency.plot(streams, [r["p99_ms"] for _, r in points], marker="o", label=TITLES[kind])
    rate.set(xscale="log", xlabel="streams", ylabel="deliveries/s", title="Throughput, as fast as each goes")
    latency.set(xscale="log", yscale="log", xlabel="streams", ylabel="p99 delivery latency (ms)",
                title="p99 delivery latency at that throughput")
    for axes in (rate, latency):
        axes.grid(True, which="both", alpha=0.3)
    rate.set_ylim(bottom=0)
    latency.legend(fontsize=8)
    figure.suptitle(f"Fan-out, 100-byte payloads, 100 sessions (fewer below 100 streams); {figures['machine']}",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
