"""Checkpoints: weights in safetensors, trainer state loaded with weights_only=True, each written
to a temporary folder and renamed, so a crash never leaves a half-written checkpoint as the latest.

Reading checks before it loads: a checkpoint whose files are cut short, are not what their name
says, or do not fit the model is a CheckpointError naming the file and the first mismatch; when
the latest one is unreadable, `latest` falls back to the newest readable one and says so."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imagelm import parallel
from imagelm.errors import CheckpointError

log = logging.getLogger(__name__)

WEIGHTS, STATE, LATEST = "model.safetensors", "trainer.pt", "latest"
STEP_DIR = re.compile(r"step_(\d+)")
STATE_KEYS = {"step": int, "total": int, "optimizer": dict, "rng_cpu": torch.Tensor}   # what trainer.pt holds


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def save(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write step_NNNNNNNN (weights + trainer state) and point `latest` at it; keep the newest
    `keep`. A write that fails (a full disk) removes what it wrote and raises CheckpointError;
    the previous checkpoint stays the latest."""
    tmp = begin(ckpt_root, step)
    with _writing(ckpt_root, step):
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    return commit(ckpt_root, step, state, keep)


def tmp_folder(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp_step_{step:08d}"


def begin(ckpt_root: Path, step: int) -> Path:
    """An empty temporary folder for step's checkpoint (sharded runs: every rank writes into it)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_folder(ckpt_root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    with _writing(ckpt_root, step):
        tmp.mkdir()
    return tmp


def commit(ckpt_root: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Add the trainer state to the complete temporary folder, flush it to disk, rename it to
    step_N, point `latest` at it, and drop all but the `keep` newest checkpoints."""
    final, tmp = ckpt_root / f"step_{step:08d}", tmp_folder(ckpt_root, step)
    with _writing(ckpt_root, step):
        torch.save(state, tmp / STATE)
        for f in [f for f in tmp.rglob("*") if f.is_file()]:    # on disk before the rename makes them the latest
            _fsync(f)
    old = None
    if final.exists():                   # the same step again: swap, never a moment with neither
        old = ckpt_root / f".old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _write_atomic(ckpt_root / LATEST, final.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    old = [p for p in steps(ckpt_root) if p != final]
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


@contextlib.contextmanager
def _writing(ckpt_root: Path, step: int):
    """A failed write (a full disk) removes the temporary folder and raises CheckpointError."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:    # torch and safetensors wrap the OS error
        shutil.rmtree(tmp_folder(ckpt_root, step), ignore_errors=True)
        try:
            prev = latest(ckpt_root)
        except CheckpointError:
            prev = None
        free = shutil.disk_usage(ckpt_root).free / 2**20
        raise CheckpointError(f"cannot write checkpoint {ckpt_root / f'step_{step:08d}'} "
                              f"({' '.join(str(e).split())[:200]}; {free:.0f} MiB free there); "
                              + (f"the previous checkpoint {prev} is kept: free space and continue with --resume"
                                 if prev else "no checkpoint was written")) from e


def _step(p: Path) -> int:
    return int(STEP_DIR.fullmatch(p.name).group(1))


def steps(ckpt_root: Path) -> list[Path]:
    """The step_N folders under ckpt_root, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()), key=_step)


def problem(ckpt: Path, state: bool = False) -> str | None:
    """Why `ckpt` cannot be read (its weights; with `state`, its trainer state too), or None.
    Cheap: file headers and sizes, not the tensors."""
    f = ckpt / WEIGHTS
    if not f.is_file() and parallel.has_sharded(ckpt):
        pass                                       # a sharded run's: its shards' metadata is there
    elif not f.is_file():
        return f"{f} is missing"
    else:
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except (SafetensorError, OSError) as e:
            return f"{f} is not a complete safetensors file ({e})"
    if state:
        s = ckpt / STATE
        if not s.is_file():
            return f"{s} is missing"
        try:
            with zipfile.ZipFile(s) as z:          # torch.save's format: a zip holding data.pkl
                if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                    return f"{s} is not a torch.save archive (no data.pkl)"
        except (zipfile.BadZipFile, OSError) as e:
            return f"{s} is not a complete torch.save archive ({e})"
    return None


def latest(ckpt_root: Path, state: bool = False) -> Path | None:
    """The checkpoint `latest` names, or when it (or the pointer) is unreadable, the newest
    readable one before it, with a warning naming both; None when there is no checkpoint.
    Raises CheckpointError when checkpoints exist but none can be read."""
    ckpt_root = Path(ckpt_root)
    candidates = steps(ckpt_root)[::-1]           # newest first
    pointer, named = ckpt_root / LATEST, None
    if pointer.exists():
        try:
            name = pointer.read_bytes().decode("utf-8").strip()
            named = ckpt_root / name if STEP_DIR.fullmatch(name) else None
        except (UnicodeDecodeError, OSError):
            pass
        if named is None:
            log.warning("warning: %s does not name a checkpoint; using the newest readable one", pointer)
        else:                                     # what it names, then what came before it
            candidates = [named] + [p for p in candidates if _step(p) < _step(named)]
    first = None
    for ckpt in candidates:
        why = problem(ckpt, state)
        if why is None:
            if first is not None:
                log.warning("warning: the latest checkpoint is unreadable (%s); falling back to %s", first, ckpt)
            return ckpt
        first = first or why
    if first is not None:
        raise CheckpointError(f"no readable checkpoint under {ckpt_root}: {first}")
    return None


def load_weights(ckpt: Path, like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights of `ckpt`, checked to be finite and, given `like` (a model's state_dict), to
    have its keys and shapes. Errors name the file and the first mismatch."""
    f = Path(ckpt) / WEIGHTS
    why = problem(Path(ckpt))
    if why:
        raise CheckpointError(why)
    sharded = not f.is_file()          # problem() let it through: its full weights come from the shards
    if sharded:
        try:
            weights = parallel.consolidate(Path(ckpt))
        except Exception as e:     # noqa: BLE001 - DCP raises its own types for cut or foreign shards
            raise CheckpointError(f"cannot read the shards under {Path(ckpt) / parallel.MODEL_DIR}: {e}") from e
    if like is not None:
        if sharded:
            shapes = {k: tuple(v.shape) for k, v in weights.items()}
        else:
            with safe_open(str(f), "pt") as st:
                shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        missing, extra = sorted(set(like) - set(shapes)), sorted(set(shapes) - set(like))
        if missing or extra:
            raise CheckpointError(f"{f} does not fit this model: " + "; ".join(
                part for part in (f"{len(missing)} tensors missing (first: {missing[0]})" if missing else "",
                                  f"{len(extra)} unexpected (first: {extra[0]})" if extra else "") if part)
                + " (was it saved by another method or version of the config?)")
        for k, v in like.items():
            if shapes[k] != tuple(v.shape):
                raise CheckpointError(f"{f}: tensor {k} has shape {list(shapes[k])}, the model's is {list(v.shape)} "
                                      f"(the run's config.yaml does not match these weights)")
    try:
        weights = weights if sharded else load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{f}: tensor {k} holds NaN or infinite values (the run diverged before this "
                                  f"checkpoint): evaluate or resume an earlier one")
    return weights


def load_into(module: torch.nn.Module, ckpt: Path) -> None:
    """Load `ckpt`'s weights into `module` after checking every key and shape."""
    module.load_state_dict(load_weights(ckpt, like=module.state_dict()))


def consolidate(ckpt: Path) -> Path:
    """Write a sharded checkpoint's full weights as model.safetensors beside its shards."""
    path = ckpt / WEIGHTS
    if not path.exists():
        tmp = ckpt / f".{WEIGHTS}.tmp"
        save_file({k: v.contiguous() for k, v in parallel.consolidate(ckpt).items()}, str(tmp))
        os.replace(tmp, path)
    return path


def load_state(ckpt: Path) -> dict:
    """The trainer state: step, total, optimizer state, RNG. Checked for its structure."""
    f = Path(ckpt) / STATE
    try:
        # weights_only: tensors and plain containers only; nothing in the file is executed
        state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing: the checkpoint has weights only and cannot be resumed") from None
    except Exception as e:       # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        why = " ".join(str(e).split())
        if "weights_only" in why or "Unpickl" in type(e).__name__:
            why = "it holds Python objects other than tensors and plain containers, refused unread (weights_only)"
        raise CheckpointError(f"cannot read {f}: {why[:300]}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{f} holds a {type(state).__name__}, not a trainer state")
    for key, tp in STATE_KEYS.items():
        if key == "optimizer" and parallel.has_sharded(Path(ckpt)):
            continue                             # a sharded run keeps it in DCP shards
        if not isinstance(state.get(key), tp) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{f}: '{key}' is {'missing' if key not in state else type(state[key]).__name__}, "
                                  f"expected {tp.__name__}")
    if "optimizer" in state and not {"state", "param_groups"} <= set(state["optimizer"]):
        raise CheckpointError(f"{f}: the optimizer state lacks 'state' or 'param_groups'")
    if state["rng_cpu"].dtype != torch.uint8 or not 0 <= state["step"] <= state["total"]:
        raise CheckpointError(f"{f}: step {state['step']} of {state['total']} or its RNG state is not a trainer's")
    return state
