"""The fan-out's native load client (``sseclient.c``): built here with the machine's C compiler, once per version of
its source, into ``.cache/loadtests/`` at the top of the checkout.

:mod:`loadtests.client` runs it in its own place when ``ClientConfig.native`` names the binary, so the benchmarks
start and read it exactly as they do the Python client.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("sseclient.c")
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "loadtests"


class Unavailable(RuntimeError):
    """The native client cannot be built here (no C compiler, or it failed)."""


def build(cache: Path = CACHE) -> Path:
    """The binary of the current source, compiled now unless an earlier run left it."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = cache / f"sseclient-{digest}"
    if binary.exists():
        return binary
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise Unavailable("no C compiler (cc or gcc) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
    done = subprocess.run([compiler, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-o", str(partial), str(SOURCE), "-lm"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise Unavailable(f"{compiler} failed:\n{done.stderr[-2000:]}")
    partial.replace(binary)  # whole or not at all, should two runs build at once
    return binary
