"""The fan-out workload every server runs: sessions, the streams spread over them, and the events' payloads.

Each event carries a payload of ``payload_bytes`` characters, ``@<seq>@<sent>@`` padded with ``x``: ``seq`` counts
the session's events from 0 (the client checks that each stream sees 0, 1, 2... with no gap and no repeat) and
``sent`` is ``time.monotonic()`` when the producer made the event, before the server touched it. Every process on
one Linux host reads the same monotonic clock, so the client's receive time minus ``sent`` is the delivery latency.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

MARK = "@"


@dataclass(frozen=True, slots=True)
class Workload:
    sessions: int = 100
    streams: int = 1000
    deliveries: int = 100_000
    payload_bytes: int = 100

    @property
    def session_ids(self) -> list[str]:
        return [f"bench-{n:05d}" for n in range(self.sessions)]

    @property
    def events_per_session(self) -> int:
        """Events each session gets so that all streams together receive about ``deliveries`` events."""
        return max(1, round(self.deliveries / self.streams))

    @property
    def total_deliveries(self) -> int:
        return self.events_per_session * self.streams

    def session_of(self, stream: int) -> int:
        """Streams are dealt to sessions in turn: stream ``n`` follows session ``n % sessions``."""
        return stream % self.sessions


def payload(seq: int, payload_bytes: int) -> str:
    head = f"{MARK}{seq}{MARK}{time.monotonic():.6f}{MARK}"
    return head + "x" * max(0, payload_bytes - len(head))


def subject_of(session: int) -> str:
    """The token subject that owns a benchmark session (one each, so no subject nears its stream cap)."""
    return f"bench-user-{session:05d}"


def add_workload_arguments(parser: argparse.ArgumentParser, *, turns_of: str) -> None:
    """The options of a fan-out benchmark: the workload's sizes, turns, a turn's time limit and ``--json``."""
    defaults = Workload()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--sessions", type=int, default=defaults.sessions)
    parser.add_argument("--deliveries", type=int, default=defaults.deliveries)
    parser.add_argument("--payload-bytes", type=int, default=defaults.payload_bytes)
    parser.add_argument("--repeat", type=int, default=3, help=f"turns per {turns_of}; figures are medians (default 3)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a turn may take")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
