"""The tools the agent calls, adapters of :class:`service.domain.tools.Tool`; :func:`build_tools` makes them."""

from __future__ import annotations

from service.adapters.tools.bash import BashTool
from service.adapters.tools.files import FileEditTool, FileReadTool, FileWriteTool
from service.adapters.tools.sandbox import Sandbox, sandbox_from_settings
from service.adapters.tools.search import GrepTool, ListFilesTool
from service.adapters.tools.todo import TodoReadTool, TodoWriteTool
from service.config import Settings
from service.domain.tools import Tool

__all__ = [
    "BashTool",
    "FileEditTool",
    "FileReadTool",
    "FileWriteTool",
    "GrepTool",
    "ListFilesTool",
    "Sandbox",
    "TodoReadTool",
    "TodoWriteTool",
    "build_tools",
]


def build_tools(settings: Settings, sandbox: Sandbox | None = None) -> list[Tool]:
    """Every tool, configured from ``settings``, minus those named in ``settings.disabled_tools``.

    Names there that no tool has are ignored, so a stale entry does not stop the server. ``sandbox`` defaults to
    the one the settings describe.
    """
    sandbox = sandbox if sandbox is not None else sandbox_from_settings(settings)
    tools: list[Tool] = [
        BashTool(timeout_seconds=settings.bash_timeout_seconds, output_limit_bytes=settings.tool_output_limit_bytes,
                 sandbox=sandbox),
        FileReadTool(output_limit_bytes=settings.tool_output_limit_bytes),
        FileWriteTool(give=sandbox.give),
        FileEditTool(),
        ListFilesTool(),
        GrepTool(),
        TodoWriteTool(),
        TodoReadTool(),
    ]
    disabled = {name.strip().lower() for name in settings.disabled_tools}
    return [tool for tool in tools if tool.name not in disabled]
