"""Sampling profiles of a benchmark server with py-spy, summarised as the functions that take the most time.

``Profiler(pid, path)`` records while a benchmark turn runs (``py-spy record --format raw``: one line per distinct
stack with its sample count); :func:`summary` reads the file back as "self" time (the sampled frame itself) and
"total" time (the frame anywhere on the stack), in shares of all samples. ``python -m loadtests.pyspy FILE``
prints it for a file recorded earlier.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class Profiler:
    """``py-spy record`` attached to ``pid`` until :meth:`stop`; does nothing when py-spy is not installed."""

    def __init__(self, pid: int, output: Path, rate: int = 250, native: bool = False, gil: bool = True) -> None:
        """``gil``: sample only the thread holding the GIL, so that threads waiting for work or for the GIL do not
        count as busy."""
        self.output = output
        self._process: subprocess.Popen[bytes] | None = None
        binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(binary).exists():
            return
        command = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output",
                   str(output), "--nonblocking"]
        if native:
            command.append("--native")
        if gil:
            command.append("--gil")
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match.group('name')} ({file})"


def summary(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return f"{path}: no samples"
    lines = [f"{path.name}: {samples} samples", "", "self %  function (the sampled frame)"]
    lines += [f"{100 * n / samples:6.1f}  {name}" for name, n in own.most_common(top)]
    lines += ["", "total %  function (anywhere on the stack)"]
    lines += [f"{100 * n / samples:6.1f}  {name}" for name, n in total.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(summary(Path(argument)))
