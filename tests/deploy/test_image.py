"""The image, checked without a Docker engine: hadolint on the Dockerfile, the build context's allowlist, the lock
file against pyproject.toml, then the build stage replayed in a fresh virtual environment (from the lock, hashes
checked) and the image's entry point started from it: tini forwards SIGTERM, and the server drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy import dockerfile
from tests.deploy.chart import ROOT
from tests.deploy.image import DOCKERFILE, IMAGE_MARKERS, LOCK, build_venv, image_pins, read_lock, require_tini
from tests.integration.server import ServerProcess, data_folder, free_port

pytestmark = pytest.mark.deploy

HADOLINT = Path(sys.executable).parent / "hadolint"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(path)],
                          capture_output=True, text=True, check=False, cwd=ROOT, timeout=60)


# --- the Dockerfile and its context ----------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_floating_base_image(tmp_path: Path) -> None:
    """The configuration fails on findings; it is not a list of everything ignored."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text(encoding="utf-8").replace("python:3.11-slim-bookworm", "python:latest"),
                   encoding="utf-8")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_both_stages_share_one_base() -> None:
    """The virtual environment is copied whole from the build stage: its interpreter must be where it was."""
    stages = dockerfile.parse(DOCKERFILE).stages
    assert [stage.name for stage in stages] == ["build", "runtime"]
    assert len({stage.base for stage in stages}) == 1
    assert stages[0].base.startswith("python:3.11-slim")


def test_the_image_runs_tini_as_a_numeric_non_root_user() -> None:
    image = dockerfile.image_config(dockerfile.parse(DOCKERFILE), args={}, base_env={})
    assert image.entrypoint[:2] == ["/usr/bin/tini", "--"]
    assert image.user is not None
    uid, gid = (int(part) for part in image.user.split(":"))
    assert uid != 0
    assert gid != 0
    assert image.env["ALEX_HOST"] == "0.0.0.0"  # noqa: S104 -- a container listens on its pod's address
    assert image.healthcheck is not None


def test_build_context_lets_in_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the context is an allowlist: it starts by excluding everything"
    allowed = {pattern.removeprefix("!").rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied: set[str] = set()
    for stage in dockerfile.parse(DOCKERFILE).stages:
        for step in stage.instructions:
            if step.keyword == "COPY" and "--from" not in step.value:
                copied.update(word.rstrip("/") for word in step.value.split()[:-1])
    assert copied == allowed
    assert not allowed & {".alex", ".git", ".venv", ".cache", ".env", "tests"}


# --- the lock file ---------------------------------------------------------------------------------------------


def test_lock_pins_every_package_with_hashes() -> None:
    pins = read_lock()
    assert pins
    assert all(pin.hashes >= 1 for pin in pins)
    assert "make lock" in LOCK.read_text(encoding="utf-8").splitlines()[1], "the header says how to refresh it"


def test_lock_satisfies_pyproject() -> None:
    """Every runtime dependency (with the dependencies of the extras it asks for) and the build backend are pinned,
    at a version pyproject allows; `make lock` refreshes the file when this fails."""
    pins = image_pins()
    wanted = [Requirement(text) for text in [*PYPROJECT["project"]["dependencies"],
                                             *PYPROJECT["build-system"]["requires"]]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {requirement}: run `make lock`")
        for extra in requirement.extras:
            for text in metadata.requires(requirement.name) or []:
                needed = Requirement(text)
                if needed.marker is not None and needed.marker.evaluate({**IMAGE_MARKERS, "extra": extra}) and \
                        not needed.marker.evaluate({**IMAGE_MARKERS, "extra": ""}):
                    assert canonicalize_name(needed.name) in pins, (
                        f"{needed.name} (for {requirement.name}[{extra}]) is not in requirements.lock")


# --- the build, replayed, and the entry point --------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image")
    venv = root / "opt-alex"
    build_venv(venv, root / "src")
    return venv


def test_the_build_installs_exactly_the_lock(image_venv: Path) -> None:
    listing = subprocess.run([str(image_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                             capture_output=True, text=True, check=True, env={"PATH": os.defpath})
    installed = {canonicalize_name(item["name"]): item["version"] for item in json.loads(listing.stdout)}
    expected = {**image_pins(), "alex-server": PYPROJECT["project"]["version"]}
    # pip comes with every virtual environment; the image keeps it (the base image has it anyway).
    installed.pop(canonicalize_name("pip"))
    assert installed == expected
    assert (image_venv / "bin" / "alex-server").exists()


def test_the_entry_point_serves_and_drains_on_sigterm(image_venv: Path) -> None:
    require_tini()
    parsed = dockerfile.parse(DOCKERFILE)
    image = dockerfile.image_config(parsed, args={"VENV": str(image_venv)},
                                    base_env={"PATH": dockerfile.interpreter_path()})
    port = free_port()
    with data_folder() as data:
        # As `docker run -e PORT=… -v data:/data IMAGE` would: the image's environment, a port and a volume.
        # Here tini is not PID 1, which reaps orphans by itself: TINI_SUBREAPER gives it that job all the same.
        env = {**image.env, "PORT": str(port), "ALEX_DATA_DIR": str(data), "TINI_SUBREAPER": "1"}
        server = ServerProcess(data, env, command=[*image.entrypoint, *image.cmd], cwd=data.parent, secret=None)
        server.start()
        try:
            assert server.port == port
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {"status": "ok"}
            assert image.healthcheck is not None
            check = subprocess.run(image.healthcheck, env=server.env, capture_output=True, text=True, check=False,
                                   timeout=30)
            assert check.returncode == 0, check.stderr
            assert server.command[0] == "/usr/bin/tini"
            seconds = server.stop(signal.SIGTERM)
        finally:
            server.kill()
    # tini passed SIGTERM on and handed back the server's exit: uvicorn, once it has shut down cleanly, re-raises the
    # signal it handled, which tini reports as 128 + 15 (Kubernetes shows the same for a drained pod).
    assert server.process.returncode in (0, 128 + signal.SIGTERM), "\n".join(server.raw_logs[-20:])
    assert server.events_logged("drain_started")
    assert server.events_logged("server_stopped")
    assert seconds < 10
