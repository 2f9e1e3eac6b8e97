"""Methods: (tokens) + (the shared backbone with an attention pattern) + (an objective).

A method is an nn.Module built from (ModelConfig, its own Config dataclass). `forward(batch)`
returns Output(loss, metrics); `encoder` is the part kept downstream. `noise_dim` says how many
uniform numbers per sample the method draws: the data pipeline draws them for the global batch
and shards them with the images, so any number of ranks sees the same random choices."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS: dict[str, type] = {}


@dataclass
class Output:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def register(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def build_method(cfg) -> torch.nn.Module:
    return METHODS[cfg.method](cfg.model, cfg.objective)


from imagelm.methods import aim, beit, beit3, clip, igpt, lcl, mae  # noqa: E402,F401  (registers)
