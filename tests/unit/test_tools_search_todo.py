"""list_files, grep and the todo tools, plus build_tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.adapters.tools import build_tools
from service.adapters.tools.search import GrepTool, ListFilesTool
from service.adapters.tools.todo import TodoReadTool, TodoWriteTool
from service.config import Settings
from service.domain.models import Todo, TodoStatus
from service.domain.tools import ToolError, ToolRegistry
from tests.unit.tool_helpers import MemoryTodoList, make_context


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small project: two folders, text files, a binary file, and a link to a folder outside."""
    folder = tmp_path / "ws"
    (folder / "src" / "pkg").mkdir(parents=True)
    (folder / "docs").mkdir()
    (folder / "src" / "main.py").write_text("import os\n\ndef main():\n    return os.getcwd()\n")
    (folder / "src" / "pkg" / "util.py").write_text("def helper():\n    return 'Main'\n")
    (folder / "docs" / "notes.md").write_text("main ideas\r\nnothing else\n")
    (folder / "image.bin").write_bytes(b"main\x00\x01\x02")
    (folder / "README").write_text("see src/main.py\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "leak.py").write_text("def main(): pass\n")
    (folder / "elsewhere").symlink_to(outside)
    return folder


# list_files


async def test_list_files_shows_one_level_sorted(workspace: Path) -> None:
    result = await ListFilesTool().run({}, make_context(workspace))
    assert result.splitlines() == ["README", "docs/", "elsewhere", "image.bin", "src/"]


async def test_list_files_recursive_does_not_enter_links(workspace: Path) -> None:
    result = await ListFilesTool().run({"recursive": True}, make_context(workspace))
    assert result.splitlines() == [
        "README",
        "docs/",
        "docs/notes.md",
        "elsewhere",
        "image.bin",
        "src/",
        "src/main.py",
        "src/pkg/",
        "src/pkg/util.py",
    ]


async def test_list_files_of_a_subfolder_keeps_workspace_paths(workspace: Path) -> None:
    result = await ListFilesTool().run({"path": "src", "recursive": True}, make_context(workspace))
    assert result.splitlines() == ["src/main.py", "src/pkg/", "src/pkg/util.py"]


async def test_list_files_is_capped_with_a_note(workspace: Path) -> None:
    result = await ListFilesTool(max_entries=3).run({"recursive": True}, make_context(workspace))
    assert result.splitlines() == [
        "README",
        "docs/",
        "docs/notes.md",
        "[stopped after 3 entries; list a subfolder to see more]",
    ]


async def test_list_files_errors(workspace: Path) -> None:
    (workspace / "empty").mkdir()
    assert await ListFilesTool().run({"path": "empty"}, make_context(workspace)) == "[empty is empty]"
    for path, problem in [
        ("README", "README is not a folder"),
        ("missing", "missing does not exist"),
        ("elsewhere", "leads outside the workspace"),
        ("..", "contains '..'"),
        ("/", "absolute path"),
    ]:
        with pytest.raises(ToolError, match=problem):
            await ListFilesTool().run({"path": path}, make_context(workspace))


# grep


async def test_grep_finds_matching_lines_in_text_files(workspace: Path) -> None:
    result = await GrepTool().run({"pattern": r"\bmain\b"}, make_context(workspace))
    assert result.splitlines() == [
        "README:1: see src/main.py",
        "docs/notes.md:1: main ideas",
        "src/main.py:3: def main():",
    ]


async def test_grep_options(workspace: Path) -> None:
    context = make_context(workspace)
    tool = GrepTool()
    assert await tool.run({"pattern": "main", "glob": "*.py", "ignore_case": True}, context) == (
        "src/main.py:3: def main():\nsrc/pkg/util.py:2:     return 'Main'"
    )
    assert await tool.run({"pattern": "return", "path": "src/pkg"}, context) == "src/pkg/util.py:2:     return 'Main'"
    assert await tool.run({"pattern": "return", "path": "src/main.py"}, context) == (
        "src/main.py:4:     return os.getcwd()"
    )
    assert await tool.run({"pattern": "main", "glob": "src/*/*.py", "ignore_case": True}, context) == (
        "src/pkg/util.py:2:     return 'Main'"
    )
    assert await tool.run({"pattern": "no such text"}, context) == "no matches"


async def test_grep_skips_big_files_and_caps_matches(workspace: Path) -> None:
    (workspace / "big.txt").write_text("main\n" * 300)
    assert "big.txt" not in await GrepTool(max_file_bytes=1000).run({"pattern": "main"}, make_context(workspace))
    result = await GrepTool(max_matches=5).run({"pattern": "main", "path": "big.txt"}, make_context(workspace))
    assert result.splitlines() == [
        *(f"big.txt:{n}: main" for n in range(1, 6)),
        "[stopped after 5 matches; narrow the pattern, path or glob]",
    ]


async def test_grep_clips_long_lines(workspace: Path) -> None:
    (workspace / "min.js").write_text("x" * 1000 + "needle" + "\n")
    result = await GrepTool().run({"pattern": "needle"}, make_context(workspace))
    assert result == "min.js:1: " + "x" * 300 + "…"


async def test_grep_errors(workspace: Path) -> None:
    with pytest.raises(ToolError, match="invalid regular expression"):
        await GrepTool().run({"pattern": "(unclosed"}, make_context(workspace))
    with pytest.raises(ToolError, match="missing does not exist"):
        await GrepTool().run({"pattern": "x", "path": "missing"}, make_context(workspace))
    with pytest.raises(ToolError, match="leads outside the workspace"):
        await GrepTool().run({"pattern": "main", "path": "elsewhere"}, make_context(workspace))


# todo_write and todo_read


async def test_todo_round_trip(tmp_path: Path) -> None:
    todos = MemoryTodoList()
    context = make_context(tmp_path, todos=todos)
    assert await TodoReadTool().run({}, context) == "no todos"
    items = [
        {"id": "1", "content": "read the code", "status": "completed"},
        {"id": "2", "content": "fix the bug", "status": "in_progress"},
        {"id": "3", "content": "run the tests", "status": "pending"},
    ]
    written = await TodoWriteTool().run({"todos": items}, context)
    assert todos.todos == [
        Todo("1", "read the code", TodoStatus.COMPLETED),
        Todo("2", "fix the bug", TodoStatus.IN_PROGRESS),
        Todo("3", "run the tests", TodoStatus.PENDING),
    ]
    expected = "[x] 1. read the code\n[~] 2. fix the bug\n[ ] 3. run the tests"
    assert written == expected
    assert await TodoReadTool().run({}, context) == expected
    assert await TodoWriteTool().run({"todos": []}, context) == "no todos"
    assert todos.todos == []


async def test_todo_write_refuses_duplicate_ids(tmp_path: Path) -> None:
    todos = MemoryTodoList([Todo("keep", "untouched")])
    items = [
        {"id": "a", "content": "one", "status": "pending"},
        {"id": "a", "content": "two", "status": "pending"},
    ]
    with pytest.raises(ToolError, match="repeated: a"):
        await TodoWriteTool().run({"todos": items}, make_context(tmp_path, todos=todos))
    assert todos.todos == [Todo("keep", "untouched")]
    assert todos.writes == 0


@pytest.mark.parametrize(
    ("name", "arguments", "problem"),
    [
        ("todo_write", {}, "arguments.todos is required"),
        ("todo_write", {"todos": [{"id": "1", "content": "x"}]}, r"arguments.todos\[0\].status is required"),
        ("todo_write", {"todos": [{"id": "1", "content": "x", "status": "done"}]}, "must be one of pending"),
        ("todo_read", {"verbose": True}, "arguments.verbose is not a known argument"),
        ("grep", {}, "arguments.pattern is required"),
        ("grep", {"pattern": "x", "ignore_case": "yes"}, "must be of type boolean"),
        ("list_files", {"recursive": 1}, "must be of type boolean"),
    ],
)
async def test_bad_arguments_are_refused_by_the_registry(
    tmp_path: Path, name: str, arguments: dict[str, object], problem: str
) -> None:
    registry = ToolRegistry([TodoWriteTool(), TodoReadTool(), GrepTool(), ListFilesTool()])
    with pytest.raises(ToolError, match=problem):
        await registry.run(name, arguments, make_context(tmp_path))


# build_tools


def test_build_tools_makes_every_tool_with_an_object_schema() -> None:
    tools = build_tools(Settings(disabled_tools=[]))
    assert sorted(tool.name for tool in tools) == [
        "bash",
        "file_edit",
        "file_read",
        "file_write",
        "grep",
        "list_files",
        "todo_read",
        "todo_write",
    ]
    for tool in tools:
        assert tool.description
        assert tool.parameters["type"] == "object"
        assert tool.parameters["additionalProperties"] is False
        assert set(tool.parameters["required"]) <= set(tool.parameters["properties"])
    assert len(ToolRegistry(tools)) == 8


def test_build_tools_leaves_out_disabled_tools_and_ignores_unknown_names() -> None:
    tools = build_tools(Settings(disabled_tools=["bash", "no_such_tool", "grep"]))
    assert "bash" not in [tool.name for tool in tools]
    assert "grep" not in [tool.name for tool in tools]
    assert len(tools) == 6
