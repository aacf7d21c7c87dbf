"""Which sandbox the settings give on this machine: bubblewrap is used only when it can build its namespaces."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import structlog

from service.adapters.tools.sandbox import SandboxUnavailable, bwrap_failure, sandbox_from_settings
from service.config import Settings


def fake_bwrap(folder: Path, *, works: bool) -> Path:
    """A ``bwrap`` on PATH that succeeds, or fails the way it does in a pod without user namespaces."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "bwrap"
    body = "exit 0" if works else 'echo "bwrap: No permissions to create new namespace" >&2; exit 1'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def settings(tmp_path: Path, bwrap: str) -> Settings:
    return Settings(sandbox_bwrap=bwrap, sandbox_user="none", data_dir=tmp_path / "data")


@pytest.fixture
def path_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder put first on PATH (with the tools the sandbox also looks for still found after it)."""
    folder = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    return folder


def test_a_bwrap_that_cannot_make_namespaces_is_reported_with_its_reason(tmp_path: Path) -> None:
    assert bwrap_failure(str(fake_bwrap(tmp_path, works=False))) == "bwrap: No permissions to create new namespace"
    assert bwrap_failure(str(fake_bwrap(tmp_path / "ok", works=True))) is None


def test_auto_runs_without_namespaces_and_says_why_when_bwrap_cannot_work(tmp_path: Path, path_with: Path) -> None:
    fake_bwrap(path_with, works=False)
    with structlog.testing.capture_logs() as logs:
        sandbox = sandbox_from_settings(settings(tmp_path, "auto"))
    assert sandbox.bwrap is None
    assert [entry["reason"] for entry in logs if entry["event"] == "bash_sandbox_weak"] == [
        "bwrap: No permissions to create new namespace"]


def test_on_refuses_to_start_when_bwrap_cannot_work(tmp_path: Path, path_with: Path) -> None:
    fake_bwrap(path_with, works=False)
    with pytest.raises(SandboxUnavailable, match="cannot make its namespaces here: bwrap: No permissions"):
        sandbox_from_settings(settings(tmp_path, "on"))


def test_a_working_bwrap_is_used(tmp_path: Path, path_with: Path) -> None:
    script = fake_bwrap(path_with, works=True)
    assert sandbox_from_settings(settings(tmp_path, "auto")).bwrap == str(script)
    assert sandbox_from_settings(settings(tmp_path, "off")).bwrap is None


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_this_machines_bwrap_passes_the_probe() -> None:
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    assert bwrap_failure(bwrap) is None
