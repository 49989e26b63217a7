"""Operations: the one place capabilities are defined (see ``registry``)."""

from __future__ import annotations

from tabagent.ops import (
    chat,
    conversations,
    embeddings,
    hardware,
    memory,
    models,
    system,
    vision,
    webrtc,
)
from tabagent.ops.registry import Registry


def default_registry() -> Registry:
    """Every operation the server offers."""
    return Registry(
        system.group,
        hardware.group,
        models.group,
        chat.group,
        embeddings.group,
        vision.group,
        conversations.group,
        memory.group,
        webrtc.group,
    )
