"""The sessions' workspace folders: real paths, found without reading the disk per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.app.workspaces import Workspaces


def test_a_session_folder_is_the_real_root_and_the_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    workspaces = Workspaces(tmp_path / "linked")
    assert workspaces.root == tmp_path / "real"

    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("path() read the disk")

    monkeypatch.setattr(os, "lstat", no_disk)
    monkeypatch.setattr(os, "stat", no_disk)
    assert workspaces.path("s_1.a-b") == tmp_path / "real" / "s_1.a-b"


@pytest.mark.parametrize("session_id", ["..", ".", "a/b", "", "a\x00", "x" * 129])
def test_an_id_that_is_not_one_safe_segment_is_refused(tmp_path: Path, session_id: str) -> None:
    with pytest.raises(ValueError, match="invalid session id"):
        Workspaces(tmp_path).path(session_id)


async def test_ensure_makes_the_folder_and_remove_takes_it_away(tmp_path: Path) -> None:
    workspaces = Workspaces(tmp_path / "workspaces")
    path = await workspaces.ensure("s_1")
    assert path == (tmp_path / "workspaces" / "s_1").resolve()
    assert path.is_dir()
    (path / "f.txt").write_text("x")
    await workspaces.remove("s_1")
    assert not path.exists()
