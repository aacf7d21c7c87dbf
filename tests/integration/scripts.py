"""Servers whose mock model plays a script (``ALEX_MOCK_SCRIPT``, docs/operations.md "Scripted turns")."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tests.integration.server import ServerProcess, data_folder, running


@contextlib.contextmanager
def scripted(turns: Sequence[Mapping[str, Any]], **env: str) -> Iterator[ServerProcess]:
    """A started server whose every task plays ``turns`` (then answers ``Done.``), with ``env`` on top."""
    with data_folder() as folder:
        # Next to the data folder, in the same removed-afterwards root.
        script = folder.parent / "mock-script.json"
        script.write_text(json.dumps({"turns": list(turns)}), encoding="utf-8")
        with running(folder, ALEX_MOCK_SCRIPT=str(script), **env) as process:
            yield process
