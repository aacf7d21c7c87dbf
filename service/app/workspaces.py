"""Each session's workspace folder, below one root. Session ids are validated, so an id is one safe segment."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from service.domain.models import is_valid_session_id


class Workspaces:
    """The sessions' workspace folders below ``root``, each named by its session id.

    The root's real path is found once, here; a session's folder is that path and the id, a single checked
    segment, so :meth:`path` reads nothing from the disk and gives the real path the tools expect
    (:class:`service.domain.tools.ToolContext`). The service makes these folders and never moves them.
    """

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        return self._root

    def path(self, session_id: str) -> Path:
        if not is_valid_session_id(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return self._root / session_id

    async def ensure(self, session_id: str) -> Path:
        path = self.path(session_id)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        return path

    async def remove(self, session_id: str) -> None:
        path = self.path(session_id)
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
