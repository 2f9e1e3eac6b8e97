"""Checkpoints: weights in safetensors, trainer state loaded with weights_only=True, each written
to a temporary folder and renamed, so a crash never leaves a half-written checkpoint as the latest."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from imagelm import parallel

WEIGHTS, STATE, LATEST = "model.safetensors", "trainer.pt", "latest"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    tmp = begin(ckpt_root, step)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    return commit(ckpt_root, step, state, keep)


def tmp_folder(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp_step_{step:08d}"


def begin(ckpt_root: Path, step: int) -> Path:
    """An empty temporary folder for step's checkpoint (sharded runs: every rank writes into it)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_folder(ckpt_root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(ckpt_root: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Add the trainer state to the complete temporary folder, rename it to step_N, point
    `latest` at it, and drop all but the `keep` newest checkpoints."""
    final, tmp = ckpt_root / f"step_{step:08d}", tmp_folder(ckpt_root, step)
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(ckpt_root / LATEST, final.name)
    old = sorted(p for p in ckpt_root.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest(ckpt_root: Path) -> Path | None:
    f = ckpt_root / LATEST
    if not f.exists():
        return None
    path = ckpt_root / f.read_text().strip()
    return path if (path / WEIGHTS).exists() or parallel.has_sharded(path) else None


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full weights: the safetensors file, or those consolidated from a sharded checkpoint's
    shards (`imagelm consolidate RUN` writes them once as model.safetensors)."""
    if not (ckpt / WEIGHTS).exists() and parallel.has_sharded(ckpt):
        return parallel.consolidate(ckpt)
    return load_file(str(ckpt / WEIGHTS))


def consolidate(ckpt: Path) -> Path:
    """Write a sharded checkpoint's full weights as model.safetensors beside its shards."""
    path = ckpt / WEIGHTS
    if not path.exists():
        tmp = ckpt / f".{WEIGHTS}.tmp"
        save_file({k: v.contiguous() for k, v in parallel.consolidate(ckpt).items()}, str(tmp))
        os.replace(tmp, path)
    return path


def load_state(ckpt: Path) -> dict:
    # weights_only: tensors and plain containers only; nothing in the file is executed
    return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
