"""Forge: train, generate, chat and serve language models from Python.

>>> from forge import Forge, logger, timer
>>> app = Forge(model="tiny").use(logger()).use(timer())
>>> app.info()["middleware"]
['logger_mw', 'timer_mw']
"""

from typing import Any

from forge.app import Forge
from forge.config import PRESETS, ModelConfig, get_preset, preset_names, register_preset
from forge.errors import (
    ChatTemplateError,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    EmbeddingError,
    ForgeError,
    GenerationError,
    PresetNotFoundError,
    QueueFullError,
    RateLimitError,
    StoreError,
)
from forge.events import (
    CheckpointEvent,
    Emitter,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    RequestEvent,
    ResponseEvent,
    StartEvent,
    StepEvent,
    TokenEvent,
)
from forge.generator import AsyncTextStream, Completion, GenerationConfig, Generator, TextStream
from forge.middleware import (
    Context,
    cache,
    content_filter,
    error_handler,
    logger,
    prompt_template,
    rate_limit,
    timer,
)
from forge.models import LoadedModel, create_model, export, load, save
from forge.sync import SyncForge
from forge.tokenizer import Tokenizer
from forge.trainer import TrainConfig, Trainer, TrainResult, train

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``forge.Rag`` (the RAG stack: pypdf, the stores) and ``forge.Agent`` / ``forge.tool`` load on first use."""
    if name == "Rag":
        from forge.rag import Rag

        return Rag
    if name in ("Agent", "tool"):
        import forge.agent

        return getattr(forge.agent, name)
    raise AttributeError(f"module 'forge' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "Agent",
    "AsyncTextStream",
    "ChatTemplateError",
    "CheckpointError",
    "CheckpointEvent",
    "Completion",
    "ConfigError",
    "Context",
    "DataError",
    "DeviceError",
    "EmbeddingError",
    "Emitter",
    "EndEvent",
    "ErrorEvent",
    "EvalEvent",
    "Event",
    "Forge",
    "ForgeError",
    "GenerationConfig",
    "GenerationError",
    "Generator",
    "LoadedModel",
    "ModelConfig",
    "PresetNotFoundError",
    "QueueFullError",
    "Rag",
    "RateLimitError",
    "RequestEvent",
    "ResponseEvent",
    "StartEvent",
    "StepEvent",
    "StoreError",
    "SyncForge",
    "TextStream",
    "TokenEvent",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "cache",
    "content_filter",
    "create_model",
    "error_handler",
    "export",
    "get_preset",
    "load",
    "logger",
    "preset_names",
    "prompt_template",
    "rate_limit",
    "register_preset",
    "save",
    "timer",
    "tool",
    "train",
]
