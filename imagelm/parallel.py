"""How a method is spread over ranks, and how a sharded run is checkpointed.

- `ddp`: every rank holds the whole model, optimizer and gradients (DistributedDataParallel).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) per Transformer block, then the rest of
  the method as the root unit: each rank holds 1/N of the parameters, gradients and AdamW state,
  and gathers one block's weights at a time (bf16 gathers and fp32 gradient reduce-scatter under
  bf16 precision, as torchtitan and open_clip's FSDP do).
- activation checkpointing (any mode): each block's activations are recomputed in backward.

Sharded runs save with `torch.distributed.checkpoint` (DCP): every rank writes its own shards of
the model and of the optimizer, which load back onto any number of ranks (the plan reshards them).
The full weights are consolidated from those shards on first use (eval, export; see
`consolidate`), so no rank ever holds the whole model while training."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from imagelm import dist
from imagelm.nn.heads import ResidualMLPHead
from imagelm.nn.transformer import Block

MODEL_DIR, OPTIM_DIR = "model", "optim"     # DCP checkpoint folders inside a step folder


def set_activation_checkpointing(model: nn.Module, on: bool = True) -> int:
    """Recompute every Transformer block's activations in backward; the number of blocks."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for b in blocks:
        b.checkpointing = on
    return len(blocks)


def wrap(method: nn.Module, train_cfg, bf16: bool) -> nn.Module:
    """The module the training step calls. Under fsdp the method's parameters become sharded
    DTensors in place, so build the optimizer after this."""
    if train_cfg.activation_checkpointing:
        set_activation_checkpointing(method)
    if not dist.is_distributed():
        return method
    if train_cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(method)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 gathers on GPUs (CPU autocast leaves layer norms to meet bf16 weights with fp32 inputs)
    cuda = dist.module_device(method).type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and cuda \
        else MixedPrecisionPolicy()
    for unit in shard_units(method):
        fully_shard(unit, mp_policy=mp)
    # frozen parts (a fitted visual tokenizer) stay whole, in their own dtype, on every rank:
    # nothing to reduce, and they compute in fp32 by design
    frozen = {p for p in method.parameters() if not p.requires_grad}
    fully_shard(method, mp_policy=mp, ignored_params=frozen or None)   # embeddings, norms, heads: the root unit
    return method


def shard_units(method: nn.Module) -> list[nn.Module]:
    """The modules gathered one at a time under fsdp: every Transformer block and every block of
    AIM's MLP head (at AIM-3B its 12 blocks hold 150M parameters)."""
    units = []
    for m in method.modules():
        if isinstance(m, Block):
            units.append(m)
        elif isinstance(m, ResidualMLPHead):
            units.extend(m.blocks)
    return units


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def no_sync(model: nn.Module, sync: bool):
    """Gradient accumulation: no gradient reduction on micro-batches but the last."""
    if sync or not dist.is_distributed():
        return contextlib.nullcontext()
    if is_sharded(model):
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def resync():
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return resync()
    return model.no_sync()


def grad_norm_clip(params, max_norm: float) -> float:
    """Clip the global gradient norm (over every rank's shard under fsdp); the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)    # a DTensor under fsdp
    return float(full() if full else norm)


# --- sharded checkpoints --------------------------------------------------------------------------
def save_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and the optimizer state under `folder`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save(get_model_state_dict(model), checkpoint_id=str(folder / MODEL_DIR))
    dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=str(folder / OPTIM_DIR))


def load_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint written on any number of ranks into this run's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    msd = get_model_state_dict(model)
    dcp.load(msd, checkpoint_id=str(folder / MODEL_DIR))
    set_model_state_dict(model, msd)
    osd = get_optimizer_state_dict(model, opt)
    dcp.load(osd, checkpoint_id=str(folder / OPTIM_DIR))
    set_optimizer_state_dict(model, opt, osd)


def has_sharded(folder: Path) -> bool:
    return (folder / MODEL_DIR / ".metadata").exists()


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """The full weights of a sharded checkpoint, read in this one process (no process group):
    a full-size tensor per entry of the checkpoint's metadata, which DCP fills from the shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder / MODEL_DIR))
    entries = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
          if isinstance(m, TensorStorageMetadata)}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


# --- planning memory ------------------------------------------------------------------------------
def memory_plan(params: int, activations_gb: float, ranks=(1, 2, 8, 64)) -> dict:
    """Per-GPU memory estimate (GB) for training with AdamW on fp32 weights: DDP holds weights,
    gradients and two moments (16 bytes a parameter) on every rank, FSDP 1/N of them; both add the
    activations measured at this per-GPU batch (which include the one gathered block under FSDP)."""
    state = 16 * params / 1e9
    return {"state_gb": state, "activations_gb": activations_gb,
            "ddp_gb": state + activations_gb,
            "fsdp_gb": {str(n): state / n + activations_gb for n in ranks}}
