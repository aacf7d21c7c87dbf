"""Paths the model names, held inside the session's workspace folder.

This is a guard against the model wandering off by mistake (``../``, ``/etc``, a symlink to elsewhere), not
a sandbox: the bash tool can reach anything the server's user can, and a path checked here could be
re-pointed by a command before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.domain.tools import ToolError


def resolve_in_workspace(workspace: Path, relative: str) -> Path:
    """The real path of ``relative`` inside ``workspace``; ``"."`` is the workspace itself.

    Raises :class:`ToolError`, with a message the model can act on, for an empty path, an absolute one, one
    with a ``..`` component, and one whose real path (symbolic links followed, through the nearest existing
    parent for a file not yet created) is outside the workspace. The path need not exist. The result is
    absolute with every symbolic link resolved, so it can be shown with :func:`workspace_relative`.
    """
    return _resolve(workspace.resolve(), relative)[1]


def _resolve(root: Path, relative: str) -> tuple[Path, Path]:
    """``root`` (the workspace's real path) and the real path of ``relative`` in it (see
    :func:`resolve_in_workspace`)."""
    if not relative.strip():
        raise ToolError("the path is empty; use '.' for the workspace itself")
    if "\x00" in relative:
        raise ToolError("the path contains a NUL character")
    candidate = PurePosixPath(relative)
    if candidate.is_absolute():
        raise ToolError(f"{relative!r} is an absolute path; give a path relative to the workspace")
    if ".." in candidate.parts:
        raise ToolError(f"{relative!r} contains '..'; paths must stay inside the workspace")
    try:
        # resolve() follows every link that exists along the way, dangling ones included, and keeps the
        # not-yet-existing rest as written: that is the parent-chain check for files about to be created.
        # "." is the workspace itself, whose real path is already known.
        target = root.joinpath(*candidate.parts).resolve() if candidate.parts else root
    except RuntimeError:  # pathlib's report of a symbolic link loop
        raise ToolError(f"{relative!r} goes through a symbolic link loop") from None
    except OSError as exc:
        raise ToolError(f"cannot resolve {relative!r}: {exc.strerror or exc}") from None
    if target != root and root not in target.parents:
        raise ToolError(f"{relative!r} leads outside the workspace (through a symbolic link)")
    return root, target


def workspace_relative(workspace: Path, path: Path) -> str:
    """``path`` (a result of :func:`resolve_in_workspace`) as the model would write it: relative, ``"."`` for
    the workspace itself."""
    relative = path.relative_to(workspace.resolve()).as_posix()
    return relative or "."


@dataclass(frozen=True, slots=True)
class Located:
    """A path the model named, checked: its real path, how to show it, and the workspace's real path."""

    path: Path
    shown: str
    root: Path


def locate(workspace: Path, relative: str) -> Located:
    """:func:`resolve_in_workspace` and :func:`workspace_relative` together, for a workspace given by its real path.

    ``workspace`` must be the real path (absolute, no symbolic link on the way), as :class:`ToolContext` holds it:
    it is used as it is, not resolved again. Resolving it would read every folder on its way, and in a thread each
    of those reads hands the GIL back and forth with a busy event loop. A workspace path that is not real fails
    safe: what the model names below it resolves to a real path that is not below it, refused as leading outside.

    It reads the disk: call it from a thread, as part of the tool's own work there (one hand-off, not two).
    """
    root, path = _resolve(workspace, relative)
    return Located(path, path.relative_to(root).as_posix() or ".", root)
