"""The language-model adapters, and the one place that picks between them."""

from __future__ import annotations

from typing import Protocol

from service.adapters.llm.mock import MockChatModel
from service.adapters.llm.openai_chat import OpenAIChatModel
from service.config import Settings
from service.domain.llm import ChatModel

__all__ = ["ChatModelAdapter", "MockChatModel", "OpenAIChatModel", "build_chat_model"]


class ChatModelAdapter(ChatModel, Protocol):
    """A :class:`~service.domain.llm.ChatModel` the composition root owns: it closes it once, at shutdown."""

    async def aclose(self) -> None: ...


def build_chat_model(settings: Settings) -> ChatModelAdapter:
    """The model ``settings.provider`` names.

    Raises :class:`ValueError` when the mock's script file is missing or bad: a bad file stops the start.
    """
    if settings.provider == "mock":
        return MockChatModel.from_settings(settings)
    return OpenAIChatModel.from_settings(settings)
