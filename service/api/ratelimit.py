"""Per-client rate limits on ``/api``: ``ALEX_RATE_LIMIT_TASKS`` on task creation, ``ALEX_RATE_LIMIT_DEFAULT`` on
every other route, keyed by the token's subject (by the client's address when there is no valid token).

The window strategy is ``limits``' fixed window. Its counters are in Redis when ``ALEX_REDIS_URL`` is set, so that
replicas share them (through slowapi's :class:`~slowapi.Limiter`), else in this process (:class:`WindowCounters`:
what ``limits``' own in-memory storage does for this strategy, without the timer thread that storage starts again
after every quiet 10 ms to sweep expired keys, which under load meant a new thread every few requests).

The limits are applied through a route dependency rather than slowapi's middlewares: ``SlowAPIMiddleware`` is a
``BaseHTTPMiddleware`` (it breaks streaming and disconnect detection) and ``SlowAPIASGIMiddleware`` sends
``http.response.start`` again with every body chunk of a streaming response once it adds headers, which would break
every event stream. Health, readiness and metrics carry no dependency, so they are never limited.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import structlog
from fastapi import Request
from limits import RateLimitItem, parse
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter, RateLimiter
from slowapi import Limiter
from slowapi.util import get_remote_address
from starlette.types import Scope

from service.api.headers import ResponseHeaders
from service.api.problems import ApiError
from service.api.telemetry import route_template
from service.config import Settings

log = structlog.get_logger("service.api.ratelimit")

HEADERS_STATE_KEY = "rate_limit_headers"
_REDIS_TIMEOUTS = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_at: float
    """Epoch seconds at which the window resets."""

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.reset_at - time.time())))
        return headers


SWEEP_SECONDS = 1.0
"""How often (at most) :class:`WindowCounters` drops the counters of windows that have ended."""


class WindowCounters(Storage):
    """Fixed-window counters in this process, for ``limits``' :class:`~limits.strategies.FixedWindowRateLimiter`.

    A key's window opens with its first hit and lasts the limit's period; a hit after it ended opens a new one.
    That is what ``limits``' ``MemoryStorage`` does for this strategy; here the counters of ended windows are
    dropped in passing, at most once per :data:`SWEEP_SECONDS`, instead of by a timer thread. Used from the event
    loop only (no lock).
    """

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}
        self._expiries: dict[str, float] = {}
        self._next_sweep = 0.0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        if now >= self._next_sweep:
            self._sweep(now)
        count = self.get(key) + amount
        self._counts[key] = count
        if count == amount:
            self._expiries[key] = now + expiry
        return count

    def get(self, key: str) -> int:
        if self._expiries.get(key, 0.0) <= time.time():
            self._counts.pop(key, None)
            self._expiries.pop(key, None)
        return self._counts.get(key, 0)

    def get_expiry(self, key: str) -> float:
        return self._expiries.get(key, time.time())

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        count = len(self._counts)
        self._counts.clear()
        self._expiries.clear()
        return count

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)
        self._expiries.pop(key, None)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_SECONDS
        for key in [key for key, expires in self._expiries.items() if expires <= now]:
            del self._expiries[key]
            self._counts.pop(key, None)


class RateLimits:
    """The two limits of the API and their counters."""

    def __init__(self, settings: Settings) -> None:
        self._remote = settings.redis_url is not None
        self._strategy: RateLimiter
        if self._remote:
            # slowapi's storages are synchronous: a remote one is called from a worker thread, with short socket
            # timeouts, so that a slow or unreachable Redis never stalls the event loop.
            self._strategy = Limiter(
                key_func=get_remote_address,
                storage_uri=settings.redis_url or "",
                # Passed to redis-py as keyword arguments; slowapi annotates them as strings.
                storage_options=cast(dict[str, str], _REDIS_TIMEOUTS),
                strategy="fixed-window",
                key_prefix="alex:ratelimit",
                headers_enabled=True,
            ).limiter
        else:
            self._strategy = FixedWindowRateLimiter(WindowCounters())
        self.tasks: RateLimitItem = parse(settings.rate_limit_tasks)
        self.default: RateLimitItem = parse(settings.rate_limit_default)

    async def hit(self, item: RateLimitItem, scope: str, key: str) -> Verdict:
        """Count one request of ``key`` against ``item`` in ``scope``.

        A storage that does not answer lets the request through (logged): a limiter outage must not become an
        API outage.
        """
        if self._remote:
            return await asyncio.to_thread(self._hit, item, scope, key)
        return self._hit(item, scope, key)

    def _hit(self, item: RateLimitItem, scope: str, key: str) -> Verdict:
        limiter = self._strategy
        try:
            allowed = limiter.hit(item, "alex:ratelimit", scope, key)
            reset_at, remaining = limiter.get_window_stats(item, "alex:ratelimit", scope, key)
        except Exception as exc:
            log.warning("rate_limit_storage_failed", error=type(exc).__name__)
            return Verdict(True, item.amount, item.amount, time.time() + item.get_expiry())
        return Verdict(allowed, item.amount, max(0, remaining), reset_at)


def client_key(request: Request, subject: str | None) -> str:
    return f"sub:{subject}" if subject else f"ip:{get_remote_address(request)}"


def limit(kind: str, identify: Callable[[Request], str | None]) -> Callable[[Request], Awaitable[None]]:
    """A dependency that counts the request against the ``tasks`` or ``default`` limit.

    ``identify`` returns the subject of a valid token (or None); it runs before authentication, so requests
    without a valid token are limited by address.
    """

    async def check(request: Request) -> None:
        limits: RateLimits = request.app.state.rate_limits
        item = limits.tasks if kind == "tasks" else limits.default
        verdict = await limits.hit(item, kind, client_key(request, identify(request)))
        headers = verdict.headers()
        request.state.rate_limit_headers = headers
        if not verdict.allowed:
            request.state.rate_limited = kind
            request.app.state.container.metrics.rate_limit_rejections.labels(route_template(request.scope)).inc()
            raise ApiError(429, f"rate limit of {item} exceeded; retry after {headers['Retry-After']} s",
                           headers=headers, title="Too Many Requests")

    return check


class RateLimitHeaders(ResponseHeaders):
    """Adds the ``X-RateLimit-*`` headers a limit dependency recorded to the response (streams included)."""

    def headers_for(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        recorded: dict[str, str] | None = (scope.get("state") or {}).get(HEADERS_STATE_KEY)
        return [(k.lower().encode(), v.encode()) for k, v in (recorded or {}).items()]
