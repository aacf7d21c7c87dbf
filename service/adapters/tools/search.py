"""The search tools: list a folder of the workspace, and grep its text files.

Both check the path and walk the tree in a thread (one hand-off per call), children sorted by name, without
following symbolic links (a link is listed, never entered or read, so none leads out of the workspace). Cancelling
a search stops the walk at the next entry.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from service.adapters.tools.workspace import locate
from service.domain.tools import ToolContext, ToolError

_T = TypeVar("_T")
_BINARY_SNIFF_BYTES = 8192
# Minified files have lines of megabytes; a match shows this much of its line.
_MATCH_LINE_CHARS = 300

_LIST_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "The folder, relative to the workspace (default '.')."},
        "recursive": {"type": "boolean", "description": "List everything below too (default false)."},
    },
    "required": [],
    "additionalProperties": False,
}

_GREP_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "pattern": {"type": "string", "minLength": 1, "description": "A Python regular expression."},
        "path": {"type": "string", "description": "A file or folder relative to the workspace (default '.')."},
        "glob": {"type": "string", "description": "Only files whose name matches, such as '*.py'."},
        "ignore_case": {"type": "boolean", "description": "Match case-insensitively (default false)."},
    },
    "required": ["pattern"],
    "additionalProperties": False,
}


class ListFilesTool:
    """Lists a folder's entries as workspace-relative paths, folders with a trailing ``/``, in tree order.

    Stops after ``max_entries`` with a note. A symbolic link is listed as a plain entry and never entered.
    """

    name = "list_files"
    parameters = _LIST_PARAMETERS

    def __init__(self, max_entries: int = 1000) -> None:
        self._max = max_entries

    @property
    def description(self) -> str:
        return (
            "List the files and folders in a workspace folder (default: the workspace itself), as paths "
            "relative to the workspace, folders ending in '/'. Set recursive to list everything below. "
            f"At most {self._max} entries are returned."
        )

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        relative = str(arguments.get("path", "."))
        recursive = bool(arguments.get("recursive", False))

        def collect(stop: threading.Event) -> tuple[str, list[str], bool]:
            located = locate(context.workspace, relative)
            folder, shown, root = located.path, located.shown, located.root
            if not folder.is_dir():
                raise ToolError(f"{shown} is not a folder" if folder.exists() else f"{shown} does not exist")
            entries: list[str] = []
            for entry in _walk(folder, recursive, stop):
                if len(entries) == self._max:
                    return shown, entries, True
                suffix = "/" if entry.is_dir(follow_symlinks=False) else ""
                entries.append(Path(entry.path).relative_to(root).as_posix() + suffix)
            return shown, entries, False

        shown, entries, capped = await _in_thread(collect)
        if not entries:
            return f"[{shown} is empty]"
        text = "\n".join(entries)
        if capped:
            text += f"\n[stopped after {self._max} entries; list a subfolder to see more]"
        return text


class GrepTool:
    """Finds the lines matching a Python regular expression, as ``path:line: text``, in tree order.

    Skips binary files (a NUL byte near the start), files over ``max_file_bytes`` and symbolic links; stops
    after ``max_matches`` with a note. An invalid expression raises :class:`ToolError`.
    """

    name = "grep"
    parameters = _GREP_PARAMETERS

    def __init__(self, max_matches: int = 200, max_file_bytes: int = 1024 * 1024) -> None:
        self._max_matches = max_matches
        self._max_file_bytes = max_file_bytes

    @property
    def description(self) -> str:
        return (
            "Search text files in the workspace for a Python regular expression; returns matching lines as "
            "'path:line: text'. Limit the search with path (a file or folder) and glob (a file name pattern "
            f"such as '*.py'). Binary files and files over {self._max_file_bytes // 1024} KiB are skipped; "
            f"at most {self._max_matches} matches are returned."
        )

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        flags = re.IGNORECASE if arguments.get("ignore_case", False) else 0
        try:
            pattern = re.compile(str(arguments["pattern"]), flags)
        except re.error as exc:
            raise ToolError(f"invalid regular expression: {exc}") from None
        named = str(arguments.get("path", "."))
        glob = arguments.get("glob")

        def search(stop: threading.Event) -> tuple[list[str], bool]:
            located = locate(context.workspace, named)
            start, shown, root = located.path, located.shown, located.root
            if not start.exists():
                raise ToolError(f"{shown} does not exist")
            matches: list[str] = []
            for path in _files(start, stop):
                relative = path.relative_to(root).as_posix()
                # A glob with a '/' is matched against the whole relative path, otherwise against the name.
                if glob and not fnmatch.fnmatchcase(relative if "/" in glob else path.name, glob):
                    continue
                for number, line in _text_lines(path, self._max_file_bytes):
                    if pattern.search(line):
                        if len(matches) == self._max_matches:
                            return matches, True
                        matches.append(f"{relative}:{number}: {_clip(line)}")
            return matches, False

        matches, capped = await _in_thread(search)
        if not matches:
            return "no matches"
        text = "\n".join(matches)
        if capped:
            text += f"\n[stopped after {self._max_matches} matches; narrow the pattern, path or glob]"
        return text


async def _in_thread(work: Callable[[threading.Event], _T]) -> _T:
    """Run ``work`` in a thread; if we are cancelled, tell it to stop (a thread cannot be killed)."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(work, stop)
    except asyncio.CancelledError:
        stop.set()
        raise


def _walk(folder: Path, recursive: bool, stop: threading.Event) -> Iterator[os.DirEntry[str]]:
    """The entries below ``folder``, depth first, each folder's children sorted by name; links not entered."""
    # An explicit stack rather than recursion: a deep tree must not hit Python's recursion limit.
    stack = [iter(_sorted_children(folder))]
    while stack and not stop.is_set():
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if recursive and entry.is_dir(follow_symlinks=False):
            stack.append(iter(_sorted_children(Path(entry.path))))


def _sorted_children(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError:  # unreadable, or removed while we walk: skipped like grep -s does
        return []


def _files(start: Path, stop: threading.Event) -> Iterator[Path]:
    if start.is_file():
        yield start
        return
    for entry in _walk(start, True, stop):
        if entry.is_file(follow_symlinks=False):
            yield Path(entry.path)


def _text_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str]]:
    """The numbered lines of a text file; nothing for a binary, oversized or unreadable one."""
    try:
        if path.stat().st_size > max_bytes:
            return
        data = path.read_bytes()
    except OSError:
        return
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        return
    # errors="replace": a Latin-1 file is still searched, its odd bytes shown as U+FFFD. Split on "\n" only,
    # as editors number lines (str.splitlines also breaks at form feeds and other separators).
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    yield from enumerate((line.removesuffix("\r") for line in lines), start=1)


def _clip(line: str) -> str:
    line = line.rstrip()
    return line if len(line) <= _MATCH_LINE_CHARS else line[:_MATCH_LINE_CHARS] + "…"
