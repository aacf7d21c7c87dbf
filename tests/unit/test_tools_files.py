"""Workspace paths and the file tools, on real files under tmp_path."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.adapters.tools.files import FileEditTool, FileReadTool, FileWriteTool
from service.adapters.tools.workspace import locate, resolve_in_workspace, workspace_relative
from service.domain.tools import ToolError, ToolRegistry
from tests.unit.tool_helpers import make_context


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "ws"
    folder.mkdir()
    return folder


# resolve_in_workspace


@pytest.mark.parametrize(
    ("relative", "expected"),
    [(".", ""), ("a.txt", "a.txt"), ("./src//b.py", "src/b.py"), ("new/dir/c.txt", "new/dir/c.txt")],
)
def test_paths_inside_the_workspace_resolve(workspace: Path, relative: str, expected: str) -> None:
    assert resolve_in_workspace(workspace, relative) == workspace.resolve() / expected


@pytest.mark.parametrize(
    ("relative", "problem"),
    [
        ("../x", "contains '..'"),
        ("a/../../x", "contains '..'"),
        ("a/..", "contains '..'"),
        ("/etc/passwd", "is an absolute path"),
        ("", "the path is empty"),
        ("  ", "the path is empty"),
        ("a\x00b", "NUL"),
    ],
)
def test_paths_that_leave_the_workspace_are_refused(workspace: Path, relative: str, problem: str) -> None:
    with pytest.raises(ToolError, match=problem):
        resolve_in_workspace(workspace, relative)


def test_a_symlink_out_of_the_workspace_is_refused(workspace: Path, tmp_path: Path) -> None:
    (workspace / "etc").symlink_to("/etc")
    (tmp_path / "secret.txt").write_text("secret")
    (workspace / "secret").symlink_to(tmp_path / "secret.txt")
    (workspace / "dangling").symlink_to(tmp_path / "not-yet")
    for relative in ("etc", "etc/passwd", "etc/new-file", "secret", "dangling", "dangling/x"):
        with pytest.raises(ToolError, match="leads outside the workspace"):
            resolve_in_workspace(workspace, relative)


def test_a_symlink_within_the_workspace_is_followed(workspace: Path) -> None:
    (workspace / "real").mkdir()
    (workspace / "alias").symlink_to("real")
    assert resolve_in_workspace(workspace, "alias/f.txt") == workspace.resolve() / "real" / "f.txt"


def test_a_symlink_loop_is_refused(workspace: Path) -> None:
    (workspace / "loop").symlink_to("loop")
    with pytest.raises(ToolError):
        resolve_in_workspace(workspace, "loop/x")


@pytest.mark.parametrize("relative", [".", "./", "a.txt", "src//b.py", "alias/f.txt", "new/dir/c.txt"])
def test_locate_is_resolve_and_relative_together(workspace: Path, relative: str) -> None:
    (workspace / "real").mkdir()
    (workspace / "alias").symlink_to("real")
    located = locate(workspace, relative)
    assert located.path == resolve_in_workspace(workspace, relative)
    assert located.shown == workspace_relative(workspace, located.path)
    assert located.root == workspace


def test_locate_takes_the_workspace_as_given_and_reads_nothing_above_it(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workspace / "a.txt").write_text("x")
    looked_at: list[str] = []
    real_lstat = os.lstat

    def lstat(path: str | os.PathLike[str], *args: object, **kwargs: object) -> os.stat_result:
        looked_at.append(os.fspath(path))
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", lstat)
    assert locate(workspace, ".").path == workspace
    assert looked_at == []  # the workspace itself: nothing read
    assert locate(workspace, "a.txt").path == workspace / "a.txt"


def test_locate_through_a_linked_workspace_fails_safe(workspace: Path, tmp_path: Path) -> None:
    """A workspace path that is not real (the tools are always given the real one) refuses what lies below it."""
    (workspace / "a.txt").write_text("x")
    (tmp_path / "elsewhere").symlink_to(workspace, target_is_directory=True)
    assert locate(tmp_path / "elsewhere", ".").path == tmp_path / "elsewhere"
    with pytest.raises(ToolError, match="outside the workspace"):
        locate(tmp_path / "elsewhere", "a.txt")


def test_locate_refuses_what_resolve_refuses(workspace: Path) -> None:
    (workspace / "etc").symlink_to("/etc")
    for relative in ("../x", "/etc", "", "etc/passwd"):
        with pytest.raises(ToolError):
            locate(workspace, relative)


def test_a_relative_workspace_is_resolved(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace.parent)
    path = resolve_in_workspace(Path("ws"), "a/b.txt")
    assert path == workspace.resolve() / "a" / "b.txt"
    assert workspace_relative(Path("ws"), path) == "a/b.txt"
    assert workspace_relative(Path("ws"), resolve_in_workspace(Path("ws"), ".")) == "."


# file_read


async def test_read_returns_the_text_exactly(workspace: Path) -> None:
    (workspace / "a.txt").write_bytes(b"one\r\ntwo\nthree")
    assert await FileReadTool(4096).run({"path": "a.txt"}, make_context(workspace)) == "one\r\ntwo\nthree"


async def test_read_offset_and_limit_select_lines(workspace: Path) -> None:
    (workspace / "a.txt").write_text("".join(f"line {n}\n" for n in range(1, 11)))
    tool = FileReadTool(4096)
    result = await tool.run({"path": "a.txt", "offset": 3, "limit": 2}, make_context(workspace))
    assert result == "line 3\nline 4\n[more lines follow; continue with offset=5]"
    assert await tool.run({"path": "a.txt", "offset": 10}, make_context(workspace)) == "line 10\n"
    with pytest.raises(ToolError, match=r"offset 11 is past the end of a\.txt, which has 10 lines"):
        await tool.run({"path": "a.txt", "offset": 11}, make_context(workspace))


async def test_read_is_capped_with_a_note(workspace: Path) -> None:
    (workspace / "big.txt").write_text("x" * 99 + "\n" + "y" * 5000 + "\n" + "z\n")
    result = await FileReadTool(1024).run({"path": "big.txt"}, make_context(workspace))
    assert result.startswith("x" * 99 + "\n" + "y" * 924 + "\n[truncated after 1024 bytes in line 2")
    assert result.endswith("go on with offset=3]")


async def test_read_refuses_binary_and_non_utf8_files(workspace: Path) -> None:
    (workspace / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    (workspace / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ToolError, match="binary file"):
        await FileReadTool(4096).run({"path": "image.bin"}, make_context(workspace))
    with pytest.raises(ToolError, match="not UTF-8 text"):
        await FileReadTool(4096).run({"path": "latin.txt"}, make_context(workspace))


async def test_read_of_missing_files_and_folders_is_an_error(workspace: Path) -> None:
    (workspace / "dir").mkdir()
    with pytest.raises(ToolError, match=r"nope\.txt does not exist"):
        await FileReadTool(4096).run({"path": "nope.txt"}, make_context(workspace))
    with pytest.raises(ToolError, match="dir is a directory"):
        await FileReadTool(4096).run({"path": "dir"}, make_context(workspace))
    (workspace / "empty.txt").write_text("")
    assert await FileReadTool(4096).run({"path": "empty.txt"}, make_context(workspace)) == "[the file is empty]"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
async def test_read_of_an_unreadable_file_is_an_error(workspace: Path) -> None:
    locked = workspace / "locked.txt"
    locked.write_text("x")
    locked.chmod(0)
    with pytest.raises(ToolError, match=r"cannot read locked\.txt"):
        await FileReadTool(4096).run({"path": "locked.txt"}, make_context(workspace))


async def test_read_refuses_paths_out_of_the_workspace(workspace: Path) -> None:
    (workspace / "etc").symlink_to("/etc")
    for path in ("../x", "/etc/passwd", "etc/passwd"):
        with pytest.raises(ToolError):
            await FileReadTool(4096).run({"path": path}, make_context(workspace))


# file_write


async def test_write_creates_parents_and_reports_bytes(workspace: Path) -> None:
    result = await FileWriteTool().run({"path": "src/pkg/é.txt", "content": "héllo\n"}, make_context(workspace))
    assert result == "wrote 7 bytes to src/pkg/é.txt"
    assert (workspace / "src" / "pkg" / "é.txt").read_bytes() == "héllo\n".encode()


async def test_write_replaces_a_file_and_refuses_a_folder(workspace: Path) -> None:
    (workspace / "a.txt").write_text("old content")
    await FileWriteTool().run({"path": "a.txt", "content": "new"}, make_context(workspace))
    assert (workspace / "a.txt").read_text() == "new"
    (workspace / "dir").mkdir()
    with pytest.raises(ToolError, match="dir is a directory"):
        await FileWriteTool().run({"path": "dir", "content": "x"}, make_context(workspace))


async def test_write_refuses_paths_out_of_the_workspace(workspace: Path, tmp_path: Path) -> None:
    (workspace / "out").symlink_to(tmp_path)
    for path in ("../escape.txt", "/tmp/escape.txt", "out/escape.txt"):
        with pytest.raises(ToolError):
            await FileWriteTool().run({"path": path, "content": "x"}, make_context(workspace))
    assert not (tmp_path / "escape.txt").exists()


# file_edit


async def test_edit_replaces_one_exact_occurrence(workspace: Path) -> None:
    (workspace / "a.py").write_bytes(b"def f():\r\n    return 1\r\n")
    arguments = {"path": "a.py", "old_string": "return 1", "new_string": "return 2"}
    assert await FileEditTool().run(arguments, make_context(workspace)) == "replaced 1 occurrence in a.py"
    assert (workspace / "a.py").read_bytes() == b"def f():\r\n    return 2\r\n"


async def test_edit_needs_replace_all_for_several_occurrences(workspace: Path) -> None:
    (workspace / "a.txt").write_text("x = 1\nx = 1\n")
    arguments: dict[str, object] = {"path": "a.txt", "old_string": "x = 1", "new_string": "x = 2"}
    with pytest.raises(ToolError, match="occurs 2 times"):
        await FileEditTool().run(arguments, make_context(workspace))
    assert (workspace / "a.txt").read_text() == "x = 1\nx = 1\n"
    result = await FileEditTool().run({**arguments, "replace_all": True}, make_context(workspace))
    assert result == "replaced 2 occurrences in a.txt"
    assert (workspace / "a.txt").read_text() == "x = 2\nx = 2\n"


async def test_edit_errors(workspace: Path) -> None:
    (workspace / "a.txt").write_text("hello\n")
    (workspace / "b.bin").write_bytes(b"\x00\x01hello")
    cases: list[tuple[dict[str, object], str]] = [
        ({"path": "a.txt", "old_string": "absent", "new_string": "x"}, "was not found in a.txt"),
        ({"path": "a.txt", "old_string": "hello", "new_string": "hello"}, "the same"),
        ({"path": "missing.txt", "old_string": "a", "new_string": "b"}, "does not exist"),
        ({"path": "b.bin", "old_string": "hello", "new_string": "bye"}, "binary file"),
        ({"path": "../a.txt", "old_string": "hello", "new_string": "bye"}, "contains '..'"),
    ]
    for arguments, problem in cases:
        with pytest.raises(ToolError, match=problem):
            await FileEditTool().run(arguments, make_context(workspace))
    assert (workspace / "a.txt").read_text() == "hello\n"


@pytest.mark.parametrize(
    ("name", "arguments", "problem"),
    [
        ("file_read", {}, "arguments.path is required"),
        ("file_read", {"path": 3}, "arguments.path must be of type string"),
        ("file_read", {"path": "a", "offset": 0}, "arguments.offset must be at least 1"),
        ("file_read", {"path": "a", "limit": 1.5}, "arguments.limit must be of type integer"),
        ("file_write", {"path": "a"}, "arguments.content is required"),
        ("file_edit", {"path": "a", "old_string": "", "new_string": "b"}, "old_string must be at least 1"),
        ("file_edit", {"path": "a", "old_string": "a", "new_string": "b", "replace_all": "yes"}, "boolean"),
        ("file_edit", {"path": "a", "old_string": "a", "new_string": "b", "count": 2}, "not a known argument"),
    ],
)
async def test_bad_arguments_are_refused_by_the_registry(
    workspace: Path, name: str, arguments: dict[str, object], problem: str
) -> None:
    registry = ToolRegistry([FileReadTool(4096), FileWriteTool(), FileEditTool()])
    with pytest.raises(ToolError, match=problem):
        await registry.run(name, arguments, make_context(workspace))



async def test_each_file_tool_call_is_one_hand_off_to_a_thread(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path check runs in the same thread call as the file's own work: one wake-up of a thread a call."""
    hand_offs: list[str] = []
    to_thread = asyncio.to_thread

    async def counting(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hand_offs.append(fn.__name__)
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    (workspace / "out").symlink_to("/")
    context = make_context(workspace)
    assert await FileWriteTool().run({"path": "d/a.txt", "content": "one two"}, context) == "wrote 7 bytes to d/a.txt"
    edited = await FileEditTool().run({"path": "d/a.txt", "old_string": "two", "new_string": "2"}, context)
    assert edited == "replaced 1 occurrence in d/a.txt"
    assert await FileReadTool(4096).run({"path": "d/a.txt"}, context) == "one 2"
    with pytest.raises(ToolError, match="leads outside"):
        await FileReadTool(4096).run({"path": "out/etc/passwd"}, context)
    assert len(hand_offs) == 4
