"""Forge: train, generate, chat and serve language models from Python.

>>> import forge
>>> forge.get_preset("tiny").n_layer
4
"""

from forge.config import PRESETS, ModelConfig, get_preset, preset_names
from forge.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    ForgeError,
    GenerationError,
    PresetNotFoundError,
)
from forge.events import CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StepEvent
from forge.generator import Completion, GenerationConfig, Generator
from forge.models import LoadedModel, create_model, load, save
from forge.tokenizer import Tokenizer
from forge.trainer import TrainConfig, Trainer, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "CheckpointEvent",
    "Completion",
    "ConfigError",
    "DataError",
    "DeviceError",
    "EndEvent",
    "EvalEvent",
    "Event",
    "ForgeError",
    "GenerationConfig",
    "GenerationError",
    "Generator",
    "LoadedModel",
    "ModelConfig",
    "PresetNotFoundError",
    "StartEvent",
    "StepEvent",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "create_model",
    "get_preset",
    "load",
    "preset_names",
    "save",
    "train",
]
