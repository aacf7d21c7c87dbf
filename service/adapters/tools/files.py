"""The file tools: read, write and edit UTF-8 text files in the workspace.

Every path goes through :func:`locate`; each call's disk work, the path check included, runs in a thread (one
hand-off a call), so the event loop never waits on it. Files are handled as bytes, so line endings are kept
exactly as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from service.adapters.tools.workspace import locate
from service.domain.tools import ToolContext, ToolError

# A NUL byte in the first block marks a binary file, as git and grep decide.
_BINARY_SNIFF_BYTES = 8192

_READ_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "The file, relative to the workspace."},
        "offset": {"type": "integer", "minimum": 1, "description": "The first line to return (1-based)."},
        "limit": {"type": "integer", "minimum": 1, "description": "How many lines to return at most."},
    },
    "required": ["path"],
    "additionalProperties": False,
}

_WRITE_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "The file, relative to the workspace."},
        "content": {"type": "string", "description": "The whole new content of the file."},
    },
    "required": ["path", "content"],
    "additionalProperties": False,
}

_EDIT_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "The file, relative to the workspace."},
        "old_string": {"type": "string", "minLength": 1, "description": "The exact text to replace."},
        "new_string": {"type": "string", "description": "The text to put in its place."},
        "replace_all": {"type": "boolean", "description": "Replace every occurrence (default: exactly one)."},
    },
    "required": ["path", "old_string", "new_string"],
    "additionalProperties": False,
}


class FileReadTool:
    """Returns a text file's lines from ``offset``, ``limit`` of them, at most ``output_limit_bytes`` in all.

    A cut is marked with a note saying where to go on. Binary or non-UTF-8 files, directories and missing
    files raise :class:`ToolError`.
    """

    name = "file_read"
    parameters = _READ_PARAMETERS

    def __init__(self, output_limit_bytes: int) -> None:
        self._limit = output_limit_bytes

    @property
    def description(self) -> str:
        return (
            "Read a UTF-8 text file in the workspace. Returns its text exactly (no line numbers); use offset "
            "(1-based line) and limit (line count) to read part of a long file. "
            f"At most {self._limit} bytes are returned, with a note saying where to continue."
        )

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        offset = int(arguments.get("offset", 1))
        limit = arguments.get("limit")
        return await asyncio.to_thread(_read, context.workspace, str(arguments["path"]), offset,
                                       None if limit is None else int(limit), self._limit)


class FileWriteTool:
    """Writes ``content`` (UTF-8) to a file, replacing it or creating it and its missing parent folders."""

    name = "file_write"
    description = (
        "Create or overwrite a text file in the workspace with the given content (UTF-8); missing parent "
        "folders are created. To change part of an existing file, prefer file_edit."
    )
    parameters = _WRITE_PARAMETERS

    def __init__(self, give: Callable[[Path], None] | None = None) -> None:
        # Hands what the tool creates to the bash sandbox's user, so that commands can change it too.
        self._give = give

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        data = str(arguments["content"]).encode("utf-8")
        shown = await asyncio.to_thread(_write, context.workspace, str(arguments["path"]), data, self._give)
        return f"wrote {len(data)} bytes to {shown}"


class FileEditTool:
    """Replaces the exact text ``old_string`` with ``new_string`` in a text file; says how many it replaced.

    Without ``replace_all`` the text must occur exactly once. Raises :class:`ToolError` when it is not found,
    occurs more than once without ``replace_all``, or equals ``new_string``.
    """

    name = "file_edit"
    description = (
        "Replace exact text in a UTF-8 text file in the workspace. old_string must match the file exactly, "
        "whitespace and indentation included, and occur exactly once (include surrounding lines to make it "
        "unique) unless replace_all is true. Read the file first."
    )
    parameters = _EDIT_PARAMETERS

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        old = str(arguments["old_string"])
        new = str(arguments["new_string"])
        if not old:
            raise ToolError("old_string is empty; to write a whole file use file_write")
        if old == new:
            raise ToolError("old_string and new_string are the same; there is nothing to change")
        replace_all = bool(arguments.get("replace_all", False))
        shown, count = await asyncio.to_thread(_edit, context.workspace, str(arguments["path"]), old, new,
                                               replace_all)
        return f"replaced {count} occurrence{'s' if count != 1 else ''} in {shown}"


def _read(workspace: Path, relative: str, offset: int, limit: int | None, max_bytes: int) -> str:
    located = locate(workspace, relative)
    try:
        return _read_lines(located.path, located.shown, offset, limit, max_bytes)
    except OSError as exc:
        raise ToolError(f"cannot read {located.shown}: {exc.strerror or exc}") from None


def _read_lines(path: Path, shown: str, offset: int, limit: int | None, max_bytes: int) -> str:
    _check_file(path, shown)
    parts: list[str] = []
    size = 0
    number = 0
    note = ""
    with path.open("rb") as file:
        if b"\x00" in file.read(_BINARY_SNIFF_BYTES):
            raise ToolError(f"{shown} is a binary file")
        file.seek(0)
        for number, raw in enumerate(file, start=1):
            if number < offset:
                continue
            if limit is not None and number >= offset + limit:
                note = f"[more lines follow; continue with offset={number}]"
                break
            line = _decode(raw, shown, number)
            if size + len(raw) > max_bytes:
                # A line too long for what is left is cut, so even one huge line shows its beginning.
                cut = line.encode("utf-8")[: max_bytes - size].decode("utf-8", errors="ignore")
                parts.append(cut)
                note = f"[truncated after {max_bytes} bytes in line {number}; go on with offset={number + 1}]"
                break
            parts.append(line)
            size += len(raw)
    if number == 0:
        return "[the file is empty]"
    if offset > number:
        raise ToolError(f"offset {offset} is past the end of {shown}, which has {number} lines")
    text = "".join(parts)
    if note:
        text += ("" if not text or text.endswith("\n") else "\n") + note
    return text


def _write(workspace: Path, relative: str, data: bytes, give: Callable[[Path], None] | None) -> str:
    """Write ``data`` to the file; returns how the model names it."""
    located = locate(workspace, relative)
    path, shown = located.path, located.shown
    if path.is_dir():
        raise ToolError(f"{shown} is a directory")
    try:
        missing = [folder for folder in path.parents if not folder.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if give is not None:
            for created in [*missing, path]:
                give(created)
    except OSError as exc:
        raise ToolError(f"cannot write {shown}: {exc.strerror or exc}") from None
    return shown


def _edit(workspace: Path, relative: str, old: str, new: str, replace_all: bool) -> tuple[str, int]:
    """Replace ``old`` with ``new`` in the file; returns how the model names it and how many were replaced."""
    located = locate(workspace, relative)
    try:
        return located.shown, _replace(located.path, located.shown, old, new, replace_all)
    except OSError as exc:
        raise ToolError(f"cannot edit {located.shown}: {exc.strerror or exc}") from None


def _replace(path: Path, shown: str, old: str, new: str, replace_all: bool) -> int:
    _check_file(path, shown)
    data = path.read_bytes()
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        raise ToolError(f"{shown} is a binary file")
    text = _decode(data, shown, None)
    count = text.count(old)
    if count == 0:
        raise ToolError(f"old_string was not found in {shown}; it must match exactly, whitespace included")
    if count > 1 and not replace_all:
        raise ToolError(
            f"old_string occurs {count} times in {shown}; include more surrounding text to make it unique, "
            "or set replace_all"
        )
    path.write_bytes(text.replace(old, new).encode("utf-8"))
    return count


def _check_file(path: Path, shown: str) -> None:
    if path.is_dir():
        raise ToolError(f"{shown} is a directory; use list_files to see what it holds")
    if not path.is_file():
        raise ToolError(f"{shown} does not exist")


def _decode(data: bytes, shown: str, line: int | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        where = f" (line {line})" if line is not None else ""
        raise ToolError(f"{shown} is not UTF-8 text{where}; it may be a binary file") from None
