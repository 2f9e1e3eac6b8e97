"""The Trainer: the one loop for every method. It knows batches, losses and optimisers, never a
method's insides: `method(batch) -> Output(loss, metrics)`."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
import yaml

from imagelm import checkpoint, dist, parallel
from imagelm.config import Config, ConfigError, diff, drop_retired, from_dict, read_yaml
from imagelm.errors import CheckpointError, TrainingDiverged  # noqa: F401 - importable from here
from imagelm.data import sources
from imagelm.data.loader import make_loader
from imagelm.methods import PreparesData, TransformsText, build_method


REFIT = 100     # steps between refits of the schedule to a --minutes budget


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with ($CXX, c++, g++, clang++), or None."""
    return next(filter(None, map(shutil.which, filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")))),
                None)


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: without a compiler, say so now, not in the first step."""
    if device.type == "cpu" and cpp_compiler() is None:
        raise ConfigError("train.compile=true on CPU needs a C++ compiler (install g++ or set CXX), "
                          "or pass train.compile=false")


def on_sigterm(flag: list):
    """Until the returned undo is called, SIGTERM (a cluster's preemption) appends to `flag`
    instead of killing the process. Only the main thread may set handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, lambda *_: flag.append(signal.SIGTERM))
    return lambda: signal.signal(signal.SIGTERM, old)


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup over cfg.warmup of the steps, then cosine to cfg.min_lr."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """No weight decay on gains, biases and learned queries/embeddings (1-D or scalar tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def load_run_config(run: Path) -> Config:
    path = Path(run) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    return from_dict(drop_retired(read_yaml(path, "run config")))


class Trainer:
    def __init__(self, cfg: Config, out: Path, minutes: float | None = None, resume: bool = False,
                 progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.deadline = time.time() + minutes * 60 if minutes else None   # the budget counts from here
        self.rank, self.world, self.device = dist.init()
        t = cfg.train
        if t.batch_size % (self.world * t.accum_steps):
            raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by ranks x train.accum_steps "
                              f"= {self.world} x {t.accum_steps}")
        self.ckpt_root = self.out / "checkpoints"
        self._check_resume(resume)

        torch.manual_seed(t.seed)
        self.method = build_method(cfg)
        self.data = sources.load(cfg.data, cfg.model, "train")
        if self.data.skipped and self.rank == 0:
            print(f"skipped {self.data.skipped} unreadable images")
        if t.accum_steps > 1 and self.method.couples_samples:
            raise ConfigError(f"train.accum_steps={t.accum_steps}: {cfg.method}'s loss pairs the samples of a batch "
                              f"(contrastive), so micro-batches would shrink its negatives to "
                              f"{t.batch_size // t.accum_steps}; use train.accum_steps=1 (and more ranks or memory "
                              f"for a large batch)")
        if isinstance(self.method, PreparesData):   # fit (or, on resume, load) a tokenizer, a palette
            # on the CPU, beside the data, before the method moves: what it fits lands on the device with it;
            # streamed data hands it a bounded sample
            self.method.prepare(sources.preview(self.data), self.out,
                                log=print if self.rank == 0 else lambda *a: None)
        # a method that reads text tokenizes (lays out) each sample's text as the loader reads it
        text = self.method.text_transform() if isinstance(self.method, TransformsText) else None
        self.method.to(self.device)
        self.loader = make_loader(self.data, cfg.data, t.batch_size, t.seed, self.method.noise_dim,
                                  self.rank, self.world, self.device, text)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and dist.bf16_supported(self.device))
        self.autocast = lambda: dist.autocast(self.device, use_bf16)
        self.precision = "bf16" if use_bf16 else "fp32"
        # ddp or fsdp (+ activation checkpointing); fsdp shards the parameters in place, so the
        # optimizer is built on what wrap() leaves
        self.model = parallel.wrap(self.method, t, use_bf16)
        self.sharded = t.parallel == "fsdp"
        self.opt = torch.optim.AdamW(param_groups(self.method, t.weight_decay), lr=t.lr, betas=t.betas,
                                     fused=True)
        self.step, self.total = 0, t.steps or max(1, round(t.epochs * self.loader.steps_per_epoch))
        self.planned = self.total    # what the config asks; --minutes fits the total below it
        if self.resume_from is not None:
            self._load(self.resume_from)
        if t.compile:
            check_compiler(self.device)
            self.model = torch.compile(self.model)

    # --- run directory ----------------------------------------------------------------------------
    def _check_resume(self, resume: bool) -> None:
        cfg_path = self.out / "config.yaml"
        self.resume_from = checkpoint.latest(self.ckpt_root, state=True) if resume else None
        if resume and self.resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_root}")
        if self.resume_from is not None:
            old = load_run_config(self.out).to_dict()     # keys added since the run started: their defaults
            changed = diff(old, self.cfg.to_dict())
            if changed:
                raise ConfigError(f"refusing to resume {self.out}: the config differs in {', '.join(changed)} "
                                  f"(resume with the run's own config, or start a new --out)")
        elif checkpoint.latest(self.ckpt_root) is not None:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                                  f"another --out")
        if self.rank == 0 and not self.resume_from:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _state(self) -> dict:
        state = {"step": self.step, "total": self.total, "rng_cpu": torch.get_rng_state()}
        if not self.sharded:    # sharded runs keep the optimizer in DCP shards beside the weights
            state["optimizer"] = self.opt.state_dict()
        return state

    def _load(self, ckpt: Path) -> None:
        if self.sharded:
            if not parallel.has_sharded(ckpt):
                raise CheckpointError(f"{ckpt} is not a sharded (train.parallel=fsdp) checkpoint")
            try:
                parallel.load_sharded(ckpt, self.method, self.opt)
            except Exception as e:     # noqa: BLE001 - DCP raises its own types for cut or foreign shards
                raise CheckpointError(f"cannot load the shards of {ckpt}: {' '.join(str(e).split())[:300]}") from e
        else:
            checkpoint.load_into(self.method, ckpt)
        state = checkpoint.load_state(ckpt)
        if not self.sharded:
            try:
                self.opt.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:   # groups or sizes of another model
                raise CheckpointError(f"{ckpt / checkpoint.STATE}: its optimizer state does not fit this model "
                                      f"({e})") from e
        self.step, self.total = state["step"], state["total"]
        torch.set_rng_state(state["rng_cpu"])

    def save(self) -> Path | None:
        """Write the checkpoint of this step: one safetensors file from rank 0, or under fsdp every
        rank's shards; either way in a temporary folder that becomes `latest` only when complete."""
        t = self.cfg.train
        if not self.sharded:
            path = None
            if self.rank == 0:
                path = checkpoint.save(self.ckpt_root, self.step, self.method.state_dict(), self._state(), t.keep_ckpts)
            dist.barrier()
            return path
        if self.rank == 0:
            checkpoint.begin(self.ckpt_root, self.step)
        dist.barrier()
        parallel.save_sharded(checkpoint.tmp_folder(self.ckpt_root, self.step), self.method, self.opt)
        dist.barrier()
        path = checkpoint.commit(self.ckpt_root, self.step, self._state(), t.keep_ckpts) if self.rank == 0 else None
        dist.barrier()
        return path

    # --- the loop ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        t = self.cfg.train
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.total, t)
        batch = self.loader.batch(step)
        micro = self.loader.local // t.accum_steps
        loss_sum, metrics = torch.zeros((), device=self.device), {}
        for i in range(t.accum_steps):
            mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
            with parallel.no_sync(self.method if self.sharded else self.model, i == t.accum_steps - 1), \
                    self.autocast():
                out = self.model(mb)
            (out.loss / t.accum_steps).backward()
            loss_sum += out.loss.detach() / t.accum_steps
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / t.accum_steps
        loss = dist.mean(loss_sum).item()
        if not math.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            last = checkpoint.latest(self.ckpt_root)
            raise TrainingDiverged(f"loss is {loss} at step {step}; stopped before the update. The last good "
                                   f"checkpoint is {last or 'none (no checkpoint was written yet)'}")
        gnorm = parallel.grad_norm_clip(self.method.parameters(), t.grad_clip) if t.grad_clip > 0 else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        row = {"loss": loss, "lr": self.opt.param_groups[0]["lr"], **metrics}
        if gnorm is not None:
            row["grad_norm"] = float(gnorm)
        return row

    def _fit_total(self, deadline: float, per_step: float) -> None:
        """Under --minutes: shorten the schedule to the steps that fit the time left, so the cosine
        decay ends when the budget does (measured on real steps; the total is saved with the run)."""
        fits = int(dist.mean(torch.tensor((deadline - time.time()) / per_step)).item())
        self.total = max(self.step + 1, min(self.planned, self.step + fits))

    def fit(self, until: int | None = None) -> Path | None:
        """Train to the end of the schedule, or until the time budget or step `until` (an
        interruption: the run can be resumed) is reached; checkpoint and return its path."""
        t0, deadline = time.time(), self.deadline
        writer = log_file = bar = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm
            writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step)
            log_file = open(self.out / "metrics.jsonl", "a")
            bar = tqdm(total=self.total, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                       desc=f"{self.cfg.method} {self.precision}")
            print(f"{self.cfg.method}: {sum(p.numel() for p in self.method.parameters()) / 1e6:.2f}M params, "
                  f"{self.total} steps of {self.cfg.train.batch_size} images "
                  f"({self.total / self.loader.steps_per_epoch:.2f} epochs), {self.world} rank(s), {self.precision}"
                  + (" (the steps are fitted to --minutes from step 20 on)" if deadline and self.step == 0 else ""))
        self.method.train()
        imgs, tick = 0, time.time()
        # under --minutes the schedule is fitted to the budget from the speed of steps 5-20 (the
        # first steps pay for allocation), then refitted every REFIT steps from the speed of the
        # last REFIT: steps can slow down as a run goes on, and a schedule that outlives the budget
        # stops before its learning rate has decayed
        fitting = bool(deadline) and self.step == 0
        mark = (self.step, time.time())
        preempted: list = []          # SIGTERM: stop after this step, checkpoint, return (exit 0)
        undo = on_sigterm(preempted)
        try:
            while self.step < min(self.total, until or self.total):
                if fitting and (self.step == 5 or self.step == 20 or (self.step > 20 and self.step % REFIT == 0)):
                    if self.step > 5:
                        self._fit_total(deadline, (time.time() - mark[1]) / (self.step - mark[0]))
                        if bar is not None:
                            bar.total = self.total
                            bar.refresh()
                    mark = (self.step, time.time())
                stop = bool(preempted) or (deadline is not None and time.time() > deadline)
                if self.world > 1:   # every rank stops at the same step
                    stop = bool(dist.mean(torch.tensor(float(stop))).item() > 0)
                if stop:
                    break
                row = self.train_step(self.step)
                self.step += 1
                imgs += self.cfg.train.batch_size
                if self.rank == 0:
                    now = time.time()
                    row.update(step=self.step, epoch=self.step / self.loader.steps_per_epoch,
                               img_per_s=imgs / max(now - tick, 1e-9), time=now - t0)
                    if self.loader.skipped:   # unreadable samples replaced in this epoch (this rank)
                        row["data_skipped"] = self.loader.skipped.get((self.step - 1) // self.loader.steps_per_epoch, 0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}",
                                    **({"skipped": row["data_skipped"]} if "data_skipped" in row else {}))
                    if self.step % self.cfg.train.log_every == 0 or self.step == self.total:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                        for k, v in row.items():
                            writer.add_scalar(f"train/{k}", v, self.step)
                        imgs, tick = 0, now
                if self.step % self.cfg.train.ckpt_every == 0 and self.step < self.total:
                    self.save()
        except BaseException:
            undo()
            raise
        finally:
            self.loader.close()
            if self.rank == 0:
                bar.close()
                writer.close()
                log_file.close()
        try:
            path = self.save()        # a SIGTERM now still waits for it
        finally:
            undo()
        if self.rank == 0:
            done = "finished" if self.step >= self.total else \
                "stopped by SIGTERM (continue with --resume)" if preempted else "stopped at the time budget"
            print(f"{done}: step {self.step}/{self.total}, checkpoint {path}")
        return path
