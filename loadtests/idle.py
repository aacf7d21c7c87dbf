"""Idle streams: how much resident memory each open stream costs, and whether heartbeats keep time, at 10,000
authenticated streams on one process.

    .venv/bin/python -m loadtests.idle                        # 10,000 streams over 1,000 sessions, 2 s heartbeats
    .venv/bin/python -m loadtests.idle --servers service      # the service alone

The server runs pinned to one core and the client to the other. A first client opens and closes a few streams
(so that what every stream shares is loaded), then the server's resident set is read; a second client opens every
stream, holds them for ``--hold`` seconds and counts each stream's heartbeats. Memory per stream is the growth of
the resident set divided by the streams; heartbeat lateness is how much longer than the interval a stream waited
between two pings. Exits 1 when the service misses a target: every stream open, at most 20 KB per stream, every
stream's heartbeats on time (no interval more than 10 % or 0.5 s longer than the setting).

The heartbeat is set to ``--heartbeat`` seconds (2 by default, so that a short run sees several); the plain
sse-starlette hub is measured alongside for comparison (``--servers service,hub``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadtests.client import ClientConfig
from loadtests.common import (
    CLIENT_CPU,
    SERVER_CPU,
    Check,
    Child,
    data_folder,
    machine,
    module,
    new_secret,
    report,
    scratch,
    service_environment,
    table,
)
from loadtests.workload import subject_of

MAX_BYTES_PER_STREAM = 20 * 1024
WARM_UP_STREAMS = 200
TITLES = {
    "service": "alex-server (auth, metrics on)",
    "hub": "FastAPI + sse-starlette, a Queue per client",
}


def client_config(urls: list[str], streams: int, sessions: int, secret: str | None, hold: float) -> ClientConfig:
    return ClientConfig(urls=urls, session_ids=[f"idle-{n:05d}" for n in range(sessions)],
                        subjects=[subject_of(n) for n in range(sessions)], streams=streams, expected=0,
                        secret=secret, hold_seconds=hold, connect_timeout=600.0)


def run_once(kind: str, folder: Path, *, streams: int, sessions: int, heartbeat: float, hold: float
             ) -> dict[str, Any]:
    secret = new_secret()
    env = None
    if kind == "service":
        data = data_folder(folder, "idle")
        env = service_environment(data, secret, ALEX_SSE_HEARTBEAT_SECONDS=str(heartbeat))
    command = module(f"loadtests.servers.{kind}") + (["--ping", str(heartbeat)] if kind == "hub" else [])
    with Child(command, log=folder / f"idle-{kind}-server.log", env=env, cpu=SERVER_CPU) as server:
        port = server.expect("listening", 60)["port"]
        urls = [f"http://127.0.0.1:{port}"]
        warm = client_config(urls, WARM_UP_STREAMS, min(sessions, WARM_UP_STREAMS), secret if kind == "service"
                             else None, 0.5)
        with Child([*module("loadtests.client"), json.dumps(warm.__dict__)], log=folder / f"idle-{kind}-warm.log",
                   cpu=CLIENT_CPU) as client:
            client.expect("done", 120)
        time.sleep(1.0)
        before = server.rss_bytes()
        config = client_config(urls, streams, sessions, secret if kind == "service" else None, hold)
        with Child([*module("loadtests.client"), json.dumps(config.__dict__)], log=folder / f"idle-{kind}-client.log",
                   cpu=CLIENT_CPU) as client:
            connected = client.expect("connected", 600)
            time.sleep(min(2.0, hold / 2))
            after = server.rss_bytes()
            cpu_before = server.cpu_seconds()
            result = client.expect("done", hold + 120)
            cpu_used = server.cpu_seconds() - cpu_before
    opened = connected["streams"]
    result.update(server=kind, opened=opened, connect_seconds=connected["seconds"],
                  rss_before=before, rss_after=after,
                  bytes_per_stream=round((after - before) / max(1, opened)),
                  server_cpu_share=round(cpu_used / max(1e-9, result["hold_seconds"]), 3))
    return result


def lateness_ok(heartbeats: dict[str, Any], heartbeat: float) -> bool:
    allowed = max(heartbeat * 0.1, 0.5)
    return bool(heartbeats["streams_without_ping"] == 0 and heartbeats["interval_max_s"] <= heartbeat + allowed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.idle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="ALEX_SSE_HEARTBEAT_SECONDS (default 2)")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds to hold the streams open (default 20)")
    parser.add_argument("--servers", default="service,hub", help="any of service, hub (default both)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder with the servers' logs")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    if "service" not in servers or not set(servers) <= set(TITLES):
        parser.error("--servers must name service and may add hub")
    results: dict[str, dict[str, Any]] = {}
    with scratch(args.keep) as folder:
        for kind in servers:
            result = run_once(kind, folder, streams=args.streams, sessions=args.sessions, heartbeat=args.heartbeat,
                              hold=args.hold)
            results[kind] = result
            print(f"  {kind}: {result['opened']} streams open in {result['connect_seconds']} s, "
                  f"{result['bytes_per_stream'] / 1024:.1f} KB/stream", file=sys.stderr, flush=True)
    print(f"{args.streams:,} streams over {args.sessions:,} sessions, heartbeat {args.heartbeat:g} s, held "
          f"{args.hold:g} s; {machine()}")
    print()
    rows = []
    for kind, r in results.items():
        beats = r["heartbeats"]
        rows.append((TITLES[kind], f"{r['opened']:,}", f"{r['connect_seconds']:.1f}",
                     f"{r['rss_before'] / 2**20:.0f} -> {r['rss_after'] / 2**20:.0f}",
                     f"{r['bytes_per_stream'] / 1024:.1f}", beats["pings"], beats["streams_without_ping"],
                     f"{beats['interval_p50_s']:.3f}", f"{beats['interval_p99_s']:.3f}",
                     f"{beats['interval_max_s']:.3f}", f"{r['server_cpu_share']:.0%}"))
    print(table(["server", "streams", "open in s", "RSS MiB", "KB/stream", "pings", "streams without ping",
                 "ping interval p50 s", "p99 s", "max s", "server CPU idle"], rows))
    service = results["service"]
    beats = service["heartbeats"]
    checks = [
        Check(f"{args.streams:,} concurrent authenticated streams", f"{service['opened']:,} open, errors: "
              f"{service['errors'] or 'none'}", service["opened"] == args.streams and not service["errors"]),
        Check(f"at most {MAX_BYTES_PER_STREAM // 1024} KB resident memory per stream",
              f"{service['bytes_per_stream'] / 1024:.1f} KB", service["bytes_per_stream"] <= MAX_BYTES_PER_STREAM),
        Check(f"heartbeats on time (every {args.heartbeat:g} s, none later than {max(args.heartbeat * 0.1, 0.5):g} s)",
              f"max interval {beats['interval_max_s']:.3f} s, {beats['streams_without_ping']} streams without",
              lateness_ok(beats, args.heartbeat)),
    ]
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return report(checks)


if __name__ == "__main__":
    sys.exit(main())
