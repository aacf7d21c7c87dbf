"""JSON for the stores and the event logs: orjson where it can, the domain's reference encoder where it cannot.

The domain encodes with the standard library (it imports nothing else). Encoding is on the hot path of every
event, and of every session update, which writes the whole conversation: orjson does it about fifteen times
faster. The two agree on every JSON value; orjson spells a few floats differently (``1e16`` for ``1e+16``) and
writes NaN and the infinities as ``null`` where the standard library writes invalid JSON. What orjson refuses
(integers beyond 64 bits, keys that are not strings, lone surrogates) is left to the reference encoder, which keeps
its own answer for it.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.domain.events import encode_json, encode_json_bytes

_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
"""Dataclasses and datetimes go to ``default=str``, as in the reference, rather than to orjson's own forms."""


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON; anything JSON cannot hold as ``str(it)``."""
    try:
        return orjson.dumps(value, default=str, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return encode_json_bytes(value)


def dumps_text(value: Any) -> str:
    """:func:`dumps` as text."""
    try:
        return orjson.dumps(value, default=str, option=_OPTIONS).decode()
    except TypeError:
        return encode_json(value)
