"""Fan-out: the same streams, events and load client against the bare reference, the plain sse-starlette hub and
the service, measured side by side in one run.

    .venv/bin/python -m loadtests.fanout                      # 1,000 streams over 100 sessions, 100,000 deliveries
    .venv/bin/python -m loadtests.fanout --sweep 100,500,1000,2000,5000 --json sweep.json   # for the plot

Each server runs in its own process pinned to one core, the load client in another pinned to the other core (the
native client, ``loadtests/native``, unless ``--client python``: see loadtests/README.md); the servers take turns,
``--repeat`` times, and each figure is the median of its turns. It prints the table with the ratios and exits 1
when a target is missed: the service at least 70 % of the bare reference's deliveries/s and 3x the hub's, p99
delivery latency under 10 ms, no event lost or repeated. In a sweep (``--sweep``), stream counts other than
``--streams`` (1,000, the issue's workload) are checked only for lost or repeated events.

Two phases. First each server takes events as fast as it can deliver them (its capacity: the deliveries/s ratios
are measured here). Then the producer keeps to a schedule at 70 % of the bare reference's measured rate, the same
for every server: the latency a server shows at the load the target names. Latency in the first phase is reported
too, but there it measures the queue a producer that never waits builds in front of any server that is not
writing synchronously from inside the producer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from loadtests import native as native_client
from loadtests.client import ClientConfig
from loadtests.common import (
    CLIENT_CPU,
    SERVER_CPU,
    Check,
    Child,
    count_losses,
    data_folder,
    machine,
    module,
    new_secret,
    report,
    scratch,
    service_environment,
    table,
)
from loadtests.pyspy import Profiler, summary
from loadtests.workload import Workload, add_workload_arguments, subject_of

SERVERS = ("bare", "hub", "service")
TITLES = {
    "bare": "bare asyncio (uvloop) protocol, pre-encoded frames",
    "hub": "FastAPI + sse-starlette, a Queue per client",
    "service": "alex-server (log, broker, auth, metrics on)",
}
DEFAULT_STREAM_CAP = 20
"""``ALEX_MAX_STREAMS_PER_CLIENT``'s default."""
MIN_SHARE_OF_BARE = 0.70
MIN_TIMES_HUB = 3.0
MAX_P99_MS = 10.0


def run_once(kind: str, workload: Workload, folder: Path, *, timeout: float, rate: float | None = None,
             server_env: dict[str, str] | None = None, profile: Path | None = None, native: Path | None = None
             ) -> dict[str, Any]:
    """One server, one client, one burst of events; the client's figures plus the server's CPU time (and, with
    ``profile``, a py-spy profile of the server while it delivers). ``rate``: deliveries per second offered (the
    producer keeps to it); None: as fast as the server takes them. ``native``: the native client's binary (None: the
    Python client)."""
    secret = new_secret()
    env = None
    if kind == "service":
        data = data_folder(folder, kind)
        per_subject = -(-workload.streams // workload.sessions)
        # One subject owns each session and opens all its streams: past the default cap of 20 (a sweep to 5,000
        # streams over 100 sessions), the cap is raised to what the workload needs.
        caps = {"ALEX_MAX_STREAMS_PER_CLIENT": str(per_subject)} if per_subject > DEFAULT_STREAM_CAP else {}
        env = service_environment(data, secret, **caps, **(server_env or {}))
    sessions = workload.session_ids
    config = ClientConfig(
        urls=[], session_ids=sessions, subjects=[subject_of(n) for n in range(workload.sessions)],
        streams=workload.streams, expected=workload.events_per_session,
        secret=secret if kind == "service" else None, run_timeout=timeout,
        native=str(native) if native is not None else None)
    with Child(module(f"loadtests.servers.{kind}"), log=folder / f"{kind}-server.log", env=env,
               cpu=SERVER_CPU) as server:
        port = server.expect("listening", 60)["port"]
        config.urls = [f"http://127.0.0.1:{port}"]
        with Child([*module("loadtests.client"), json.dumps(config.__dict__)], log=folder / f"{kind}-client.log",
                   cpu=CLIENT_CPU) as client:
            client.expect("connected", 300)
            profiler = Profiler(server.process.pid, profile) if profile is not None else None
            user_before, system_before = server.cpu_times()
            events_rate = rate * workload.sessions / workload.streams if rate else None
            server.send({"do": "produce", "sessions": sessions, "events": workload.events_per_session,
                         "payload_bytes": workload.payload_bytes, "rate": events_rate})
            result = client.expect("done", timeout + 30)
            user, system = server.cpu_times()
            if profiler is not None:
                profiler.stop()
            server.expect("produced", 60)
    result["server"] = kind
    per_delivery = 1e6 / max(1, result["deliveries"])
    result["server_cpu_us"] = round((user - user_before + system - system_before) * per_delivery, 2)
    result["server_system_us"] = round((system - system_before) * per_delivery, 2)
    return count_losses(result)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the turns of one server (the turns' worst for losses and errors)."""
    merged = dict(runs[-1])
    for key in ("deliveries_per_second", "p50_ms", "p90_ms", "p99_ms", "max_ms", "server_cpu_us",
                "server_system_us", "client_cpu_share", "seconds"):
        merged[key] = round(statistics.median(r[key] for r in runs), 3)
    merged["lost"] = max(r["lost"] for r in runs)
    merged["out_of_order"] = max(r["out_of_order"] for r in runs)
    merged["errors"] = [e for r in runs for e in r["errors"]][:10]
    merged["turns"] = [r["deliveries_per_second"] for r in runs]
    return merged


def measure(workload: Workload, servers: tuple[str, ...], *, repeat: int, timeout: float, keep: bool = False,
            profile: Path | None = None, rate: float | None = None, native: Path | None = None
            ) -> dict[str, dict[str, Any]]:
    """Each server in turn, ``repeat`` times; the median of its turns."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
    with scratch(keep) as folder:
        for turn in range(repeat):
            for kind in servers:
                phase = "paced" if rate else "full"
                recording = profile / f"{kind}-{workload.streams}-{phase}-{turn + 1}.txt" if profile else None
                result = run_once(kind, workload, folder, timeout=timeout, profile=recording, rate=rate,
                                  native=native)
                if recording is not None and recording.exists():
                    print(summary(recording, top=30), file=sys.stderr)
                runs[kind].append(result)
                offered = f" (offered {rate:,.0f})" if rate else ""
                print(f"  turn {turn + 1}/{repeat} {kind:8} {result['deliveries_per_second']:>10,.0f} deliveries/s"
                      f"{offered}"
                      f"  p99 {result['p99_ms']:8.2f} ms  lost {result['lost']}  out of order {result['out_of_order']}"
                      f"  server {result['server_cpu_us']}"
                      f" us/delivery ({result['server_system_us']} in the kernel)"
                      f"  client cpu {result['client_cpu_share']:.0%}", file=sys.stderr, flush=True)
        if keep:
            print(f"  logs kept in {folder}", file=sys.stderr)
    return {kind: median_of(results) for kind, results in runs.items()}


def print_table(title: str, results: dict[str, dict[str, Any]]) -> None:
    bare = results.get("bare", {}).get("deliveries_per_second")
    rows = []
    for kind, r in results.items():
        share = f"{r['deliveries_per_second'] / bare:.0%}" if bare else "-"
        rows.append((TITLES[kind], f"{r['deliveries_per_second']:,.0f}", share, f"{r['p50_ms']:.2f}",
                     f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}", r["lost"], r["out_of_order"],
                     f"{r['server_cpu_us']:.1f}", f"{r['client_cpu_share']:.0%}"))
    print(title)
    print()
    print(table(["server", "deliveries/s", "of bare", "p50 ms", "p99 ms", "max ms", "lost", "out of order",
                 "server CPU us/delivery", "client CPU"], rows))
    print()


def speed_checks(saturated: dict[str, dict[str, Any]], paced: dict[str, dict[str, Any]] | None,
                 offered: float | None) -> list[Check]:
    """The issue's speed targets, for its workload of 1,000 streams."""
    service = saturated["service"]
    found: list[Check] = []
    if "bare" in saturated:
        share = service["deliveries_per_second"] / saturated["bare"]["deliveries_per_second"]
        found.append(Check(f"deliveries/s >= {MIN_SHARE_OF_BARE:.0%} of the bare reference", f"{share:.0%}",
                           share >= MIN_SHARE_OF_BARE))
    if "hub" in saturated:
        times = service["deliveries_per_second"] / saturated["hub"]["deliveries_per_second"]
        found.append(Check(f"deliveries/s >= {MIN_TIMES_HUB:g}x the sse-starlette hub", f"{times:.1f}x",
                           times >= MIN_TIMES_HUB))
    found.append(Check(f"p99 delivery latency < {MAX_P99_MS:g} ms, as fast as it goes",
                       f"{service['p99_ms']:.2f} ms at {service['deliveries_per_second']:,.0f}/s",
                       service["p99_ms"] < MAX_P99_MS))
    if paced is not None and offered is not None:
        kept = paced["service"]
        found.append(Check(f"p99 delivery latency < {MAX_P99_MS:g} ms at {offered:,.0f} deliveries/s offered",
                           f"{kept['p99_ms']:.2f} ms at {kept['deliveries_per_second']:,.0f}/s",
                           kept["p99_ms"] < MAX_P99_MS and kept["deliveries_per_second"] >= 0.97 * offered))
    return found


def checks(saturated: dict[str, dict[str, Any]], paced: dict[str, dict[str, Any]] | None,
           offered: float | None, *, speed: bool = True) -> list[Check]:
    """The targets; ``speed`` false (a sweep's point at another number of streams than the issue's workload): only
    that no event was lost or repeated."""
    service = saturated["service"]
    found = speed_checks(saturated, paced, offered) if speed else []
    phases = [service] if paced is None else [service, paced["service"]]
    lost = sum(phase["lost"] for phase in phases)
    disordered = sum(phase["out_of_order"] for phase in phases)
    errors = [error for phase in phases for error in phase["errors"]]
    found.append(Check("no event lost or repeated", f"{lost} lost, {disordered} out of order, errors: "
                                                    f"{errors or 'none'}",
                       lost == 0 and disordered == 0 and not errors))
    return found


def load_client(choice: str) -> Path | None:
    """The native client's binary for ``choice`` "native", built when needed; None for the Python client (chosen,
    or the native one cannot be built here, which is said)."""
    if choice != "native":
        return None
    try:
        return native_client.build()
    except native_client.Unavailable as exc:
        print(f"the native load client cannot be built ({exc}); the Python one measures instead", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, turns_of="server")
    parser.add_argument("--servers", default=",".join(SERVERS), help="a subset of bare,hub,service")
    parser.add_argument("--paced", type=float, default=None,
                        help="deliveries/s offered in the second phase (default: 70%% of the bare reference's "
                             "measured rate; 0 skips the phase)")
    parser.add_argument("--sweep", default=None, help="stream counts to measure in turn (e.g. 100,1000,5000); "
                                                      "the first phase only, at least 100 events per stream")
    parser.add_argument("--client", choices=("native", "python"), default="native",
                        help="the load client: native (loadtests/native, built with the machine's C compiler; the "
                             "Python one when it cannot be built) or python (loadtests/client.py)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder with the servers' logs")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record each server with py-spy while it delivers, in both phases; raw profiles go "
                             "to this folder")
    args = parser.parse_args(argv)
    servers = tuple(s for s in args.servers.split(",") if s)
    if "service" not in servers or not set(servers) <= set(SERVERS):
        parser.error("--servers must name service and any of bare, hub")
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.streams]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    native = load_client(args.client)
    status = 0
    everything: list[dict[str, Any]] = []
    for streams in counts:
        # A sweep keeps at least 100 events per stream, so that a point is not just the first burst.
        deliveries = max(args.deliveries, streams * 100) if args.sweep else args.deliveries
        workload = Workload(sessions=min(args.sessions, streams), streams=streams, deliveries=deliveries,
                            payload_bytes=args.payload_bytes)
        shape = (f"{workload.streams:,} streams over {workload.sessions} sessions, {workload.events_per_session} "
                 f"events of {workload.payload_bytes}-byte payloads per session ({workload.total_deliveries:,} "
                 f"deliveries), {'native' if native else 'Python'} load client; {machine()}")
        saturated = measure(workload, servers, repeat=args.repeat, timeout=args.timeout, keep=args.keep,
                            profile=args.profile, native=native)
        print_table(f"As fast as each server goes: {shape}", saturated)
        paced: dict[str, dict[str, Any]] | None = None
        offered: float | None = None
        if not args.sweep and args.paced != 0:
            offered = args.paced or (MIN_SHARE_OF_BARE * saturated["bare"]["deliveries_per_second"]
                                     if "bare" in saturated else None)
        if offered:
            paced = measure(workload, servers, repeat=args.repeat, timeout=args.timeout, keep=args.keep,
                            profile=args.profile, rate=offered, native=native)
            print_table(f"At {offered:,.0f} deliveries/s offered (the producer keeps to a schedule)", paced)
        if streams != args.streams:
            print(f"(the speed targets are for {args.streams:,} streams; at {streams:,} only losses are checked)")
        status |= report(checks(saturated, paced, offered, speed=streams == args.streams))
        everything.append({"streams": streams, "sessions": workload.sessions, "saturated": saturated,
                           "paced": paced, "offered": offered})
        print()
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "runs": everything}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
