"""Event fan-out on one replica with SQLite against two replicas sharing Redis, measured side by side in one run.

The same load client and workload as :mod:`loadtests.fanout` (its streams dealt over the replicas' URLs in turn);
the events are produced on the first replica through the real sink, so with Redis half of the streams receive
them through the other replica: producer → Redis stream → that replica's one reader → its broker → its streams.
A redis-server is started on a free port for the run (append-only file on, as in production).

Nothing is pinned here: two servers, Redis and the client share the machine's two cores, so the figures say what
the Redis path costs next to the in-process one on the same hardware, not what either does on a core of its own.

Run: ``python -m loadtests.replicas`` (``--help`` for the sizes). It prints the table and exits non-zero when a
stream loses or repeats an event in either setup (it sets no speed target: issue 7's targets are for one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtests.client import ClientConfig
from loadtests.common import (
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
from loadtests.workload import Workload, add_workload_arguments, subject_of
from tests.redis_server import RedisServer

SETUPS = ("sqlite-1", "redis-2")
TITLES = {
    "sqlite-1": "1 replica, SQLite + in-process broker",
    "redis-2": "2 replicas, Redis (streams dealt over both)",
}


def run_once(setup: str, workload: Workload, folder: Path, *, timeout: float) -> dict[str, Any]:
    secret = new_secret()
    with ExitStack() as stack:
        env_extra: dict[str, str] = {}
        replicas = 1
        if setup == "redis-2":
            redis_folder = folder / f"redis-{time.monotonic_ns()}"
            redis_folder.mkdir()
            redis = RedisServer(redis_folder, persistent=True).start()
            stack.callback(redis.kill)
            env_extra = {"ALEX_REDIS_URL": redis.url}
            replicas = 2
        servers = []
        for n in range(replicas):
            env = service_environment(data_folder(folder, f"{setup}-{n}"), secret, ALEX_REPLICA_ID=f"r{n}",
                                      **env_extra)
            server = stack.enter_context(Child(module("loadtests.servers.replica"),
                                               log=folder / f"{setup}-{n}.log", env=env))
            servers.append(server)
        urls = [f"http://127.0.0.1:{server.expect('listening', 60)['port']}" for server in servers]
        sessions = workload.session_ids
        config = ClientConfig(urls=urls, session_ids=sessions,
                              subjects=[subject_of(n) for n in range(workload.sessions)],
                              streams=workload.streams, expected=workload.events_per_session, secret=secret,
                              run_timeout=timeout)
        client = stack.enter_context(Child([*module("loadtests.client"), json.dumps(config.__dict__)],
                                           log=folder / f"{setup}-client.log"))
        client.expect("connected", 300)
        cpu_before = sum(server.cpu_seconds() for server in servers)
        servers[0].send({"do": "produce", "sessions": sessions, "events": workload.events_per_session,
                         "payload_bytes": workload.payload_bytes})
        result = client.expect("done", timeout + 30)
        cpu_used = sum(server.cpu_seconds() for server in servers) - cpu_before
        servers[0].expect("produced", 60)
    result["setup"] = setup
    result["server_cpu_us"] = round(cpu_used / max(1, result["deliveries"]) * 1e6, 2)
    return count_losses(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, turns_of="setup")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed (make test installs it: apt-get install redis-server)")
    workload = Workload(sessions=min(args.sessions, args.streams), streams=args.streams, deliveries=args.deliveries,
                        payload_bytes=args.payload_bytes)
    runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
    with scratch() as folder:
        for turn in range(args.repeat):
            for setup in SETUPS:
                result = run_once(setup, workload, folder, timeout=args.timeout)
                runs[setup].append(result)
                print(f"  turn {turn + 1}/{args.repeat} {setup:9} {result['deliveries_per_second']:>10,.0f} "
                      f"deliveries/s  p99 {result['p99_ms']:8.2f} ms  lost {result['lost']}"
                      f"  out of order {result['out_of_order']}", file=sys.stderr,
                      flush=True)
    medians = {setup: {key: statistics.median(r[key] for r in results)
                       for key in ("deliveries_per_second", "p50_ms", "p99_ms", "server_cpu_us")}
               for setup, results in runs.items()}
    base = medians["sqlite-1"]["deliveries_per_second"]
    rows = [[TITLES[setup], f"{m['deliveries_per_second']:,.0f}", f"{m['deliveries_per_second'] / base:.2f}",
             f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}", f"{m['server_cpu_us']:.1f}",
             max(r["lost"] for r in runs[setup]), max(r["out_of_order"] for r in runs[setup])]
            for setup, m in medians.items()]
    print(f"{workload.streams} streams over {workload.sessions} sessions, {workload.total_deliveries:,} deliveries "
          f"of {workload.payload_bytes}-byte payloads, median of {args.repeat}; {machine()}")
    print(table(["setup", "deliveries/s", "ratio", "p50 ms", "p99 ms", "server CPU us/delivery", "lost",
                 "out of order"], rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "workload": dataclasses.asdict(workload),
                                         "runs": runs}, indent=1, default=str))
    checks = [Check(f"{setup}: no event lost or repeated",
                    f"lost {max(r['lost'] for r in runs[setup])}, "
                    f"out of order {max(r['out_of_order'] for r in runs[setup])}, "
                    f"errors: {[e for r in runs[setup] for e in r['errors']][:2] or 'none'}",
                    all(r["lost"] == 0 and r["out_of_order"] == 0 and not r["errors"] for r in runs[setup]))
              for setup in SETUPS]
    return report(checks)


if __name__ == "__main__":
    sys.exit(main())
