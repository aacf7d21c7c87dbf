"""What the image holds, without a Docker engine: the lock file read, a wheelhouse filled from it, the Dockerfile's
build stage replayed into a fresh virtual environment, and the container's environment and command."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.deploy import dockerfile
from tests.deploy.chart import ROOT

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
TINI = "/usr/bin/tini"

# The image's interpreter: CPython 3.11 on Linux (python:3.11-slim).
IMAGE_MARKERS = {
    "python_version": "3.11",
    "python_full_version": f"3.11.{sys.version_info.micro if sys.version_info[:2] == (3, 11) else 0}",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
}
_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$"
)


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    """Canonical (PEP 503)."""
    version: str
    marker: Marker | None
    hashes: int

    def in_image(self) -> bool:
        return self.marker is None or self.marker.evaluate(dict(IMAGE_MARKERS))


def read_lock(path: Path = LOCK) -> list[Pin]:
    pins: list[Pin] = []
    current: dict[str, str] | None = None
    hashes = 0

    def close() -> None:
        if current is not None:
            marker = Marker(current["marker"]) if current.get("marker") else None
            pins.append(Pin(canonicalize_name(current["name"]), current["version"], marker, hashes))

    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            close()
            current = {key: value for key, value in match.groupdict().items() if value}
            hashes = 0
        elif line.strip().startswith("--hash=sha256:"):
            hashes += 1
    close()
    return pins


def image_pins() -> dict[str, str]:
    """What the image installs from the lock: name to version."""
    return {pin.name: pin.version for pin in read_lock() if pin.in_image()}


def wheelhouse() -> Path:
    """The lock's wheels for this platform, downloaded (hash-checked) once into .cache/wheels/<lock hash>."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    folder = ROOT / ".cache" / "wheels" / digest
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--require-hashes",
         "--no-deps", "--only-binary=:all:", "--dest", str(folder), "-r", str(LOCK)],
        capture_output=True, text=True, check=False, timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"could not fill the wheelhouse from requirements.lock:\n{result.stderr[-3000:]}")
    (folder / ".complete").touch()
    return folder


def build_venv(venv: Path, workdir: Path) -> None:
    """The Dockerfile's build stage, step by step, with its ARGs pointing here; pip takes the wheels from
    :func:`wheelhouse` instead of the index (the same files: the lock's hashes are checked on both)."""
    wheels = wheelhouse()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))},
        "PATH": dockerfile.interpreter_path(),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_CONFIG_FILE": os.devnull,
    }
    dockerfile.replay_build(dockerfile.parse(DOCKERFILE), "build", context=ROOT,
                            args={"VENV": str(venv), "SRC": str(workdir)}, env=env)


def require_tini() -> str:
    found = shutil.which("tini") or (TINI if Path(TINI).exists() else None)
    if found is None:
        raise RuntimeError("tini is not installed: run `make deploy-deps` (Debian package tini)")
    return found
