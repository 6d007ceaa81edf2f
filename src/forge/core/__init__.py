"""The performance core: models, ops, optimizer, schedules, KV cache, sampling,
generation and checkpoints. Torch only; no asyncio, no user-facing I/O beyond
checkpoint files.
"""

from forge.core.checkpoint import Checkpoint, load_checkpoint, read_manifest, save_checkpoint
from forge.core.device import autocast_dtype, resolve_device
from forge.core.generate import generate_tokens
from forge.core.kv_cache import KVCache
from forge.core.optim import build_adamw, param_groups
from forge.core.sampling import SamplingParams, sample
from forge.core.schedule import Schedule
from forge.core.transformer import Transformer

__all__ = [
    "Checkpoint",
    "KVCache",
    "SamplingParams",
    "Schedule",
    "Transformer",
    "autocast_dtype",
    "build_adamw",
    "generate_tokens",
    "load_checkpoint",
    "param_groups",
    "read_manifest",
    "resolve_device",
    "sample",
    "save_checkpoint",
]
