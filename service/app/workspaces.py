"""Each session's workspace folder, below one root. Session ids are validated, so an id is one safe segment."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from service.domain.models import is_valid_session_id


class Workspaces:
    def __init__(self, root: Path) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        return self._root

    def path(self, session_id: str) -> Path:
        if not is_valid_session_id(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        path = (self._root / session_id).resolve()
        if path.parent != self._root.resolve():
            raise ValueError(f"invalid session id {session_id!r}")
        return path

    async def ensure(self, session_id: str) -> Path:
        path = self.path(session_id)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        return path

    async def remove(self, session_id: str) -> None:
        path = self.path(session_id)
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
