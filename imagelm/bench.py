"""Throughput, achieved FLOP/s and MFU against this machine's measured matmul peak, and in the same
run a timm VisionTransformer of the same width/depth/patch trained with the same head and loss."""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imagelm import dist, parallel
from imagelm.config import Config
from imagelm.data import sources
from imagelm.data.loader import make_loader
from imagelm.methods import (METHODS, HasBenchmarks, HasTimmPeer, PreparesData, TransformsText, build_method,
                             methods_with)
from imagelm.train import check_compiler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes=None, reps: int = 5) -> float:
    """Best median GFLOP/s of square matmuls: the roof MFU is measured against."""
    sizes = sizes or ((2048, 4096, 8192) if device.type == "cuda" else (1024, 2048, 4096))
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / statistics.median(times) / 1e9)
    return best


def step_flops(model: nn.Module, batch: dict) -> float:
    """FLOPs of one forward + backward, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_steps(model: nn.Module, batches: list[dict], steps: int, bf16: bool, device: torch.device) -> float:
    """Median seconds of a full training step (forward, backward, AdamW) after warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=True)
    times = []
    for i in range(steps + 3):
        batch = batches[i % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        with dist.autocast(device, bf16):
            loss = model(batch).loss
        loss.backward()
        parallel.grad_norm_clip(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _profile_child(cfg: Config, batch_size: int, steps: int, device: str, threads: int, queue) -> None:
    import ctypes

    torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    loader = make_loader(sources.load(cfg.data, cfg.model, "train"), cfg.data, batch_size, seed=0,
                         noise_dim=method.noise_dim, device=device)
    batches = [loader.batch(i) for i in range(2)]
    bf16 = dist.bf16_supported(device)
    sec = time_steps(method, batches, steps, bf16, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:   # glibc: hand freed blocks >= 128 KiB back to the OS, so the resident set follows the tensors
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)        # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")       # reset the peak-RSS mark (Linux >= 4.0)
        before = _rss_mb("VmRSS")
    time_steps(method, batches, 1, bf16, device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else _rss_mb("VmHWM")
    queue.put({"step_s": sec, "peak_mem_mb": peak - before})


def profile_step(cfg: Config, batch_size: int, device: torch.device, steps: int = 3) -> dict:
    """Median step time, then the memory a training step adds at its peak above the resident
    model (activations, gradients, optimizer state), in a fresh process."""
    import multiprocessing as mp
    import queue as Q

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_profile_child, args=(cfg, batch_size, steps, str(device), torch.get_num_threads(), q))
    p.start()
    try:
        while True:
            try:
                return q.get(timeout=5)
            except Q.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"the profiling process died (exit code {p.exitcode})") from None
    finally:
        p.join()


def bench(cfg: Config, batch_size: int = 256, steps: int = 10, peer: bool = True) -> dict:
    """One process's (one GPU's) training step at `batch_size`, as the trainer runs it: under
    torchrun with train.parallel=fsdp the method is sharded (FSDP2) and with
    train.activation_checkpointing=true its blocks recompute; FLOPs and MFU count the model's
    FLOPs (recomputation is not useful work), memory is the step's peak."""
    _, world, device = dist.init()
    bf16 = dist.bf16_supported(device)
    torch.manual_seed(0)
    data = sources.load(cfg.data, cfg.model, "train")
    # as the trainer: a method that fits tokenizers is built and prepared beside the data (untimed),
    # then moved; any other is built in place (a multi-billion-parameter model inits in seconds, not minutes)
    prepares = issubclass(METHODS[cfg.method], PreparesData)
    with torch.device("cpu" if prepares else device):
        method = build_method(cfg)
    if prepares:
        with tempfile.TemporaryDirectory(prefix="imagelm-bench-") as tmp:
            method.prepare(sources.preview(data), Path(tmp), log=lambda *a: None)
        method.to(device)
    text = method.text_transform() if isinstance(method, TransformsText) else None
    loader = make_loader(data, cfg.data, batch_size, seed=0, noise_dim=method.noise_dim, device=device, text=text)
    batches = [loader.batch(i) for i in range(5)][1:]
    _sync(device)
    t0 = time.perf_counter()
    loader.batch(5)
    _sync(device)
    data_s = time.perf_counter() - t0
    params = sum(p.numel() for p in method.parameters())
    res = {"recipe_method": cfg.method, "device": str(device), "precision": "bf16" if bf16 else "fp32",
           "batch_size": batch_size, "torch": torch.__version__, "param_count": params,
           "parallel": cfg.train.parallel if dist.is_distributed() else "none", "ranks": world,
           "activation_checkpointing": cfg.train.activation_checkpointing,
           "peak_matmul_gflops_fp32": matmul_peak(torch.float32, device)}
    res["peak_matmul_gflops"] = matmul_peak(torch.bfloat16, device) if bf16 else res["peak_matmul_gflops_fp32"]
    # counted on two samples and scaled (FLOPs per image do not depend on the batch): counting the
    # whole batch would hold every block's activations, which a model that needs recomputation can't
    flops = step_flops(method, {k: v[:2] for k, v in batches[0].items()}) * batch_size / 2
    with torch.inference_mode(), dist.autocast(device, bf16):
        x = batches[0]["image"]
        method.encoder.features(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            method.encoder.features(x)
        _sync(device)
        res["features_img_per_s"] = 3 * len(x) / (time.perf_counter() - t0)
    # train.compile=true times the torch.compile'd step, as the trainer would run it (FLOPs: eager)
    if cfg.train.compile:
        check_compiler(device)
    compiled = torch.compile if cfg.train.compile else (lambda m: m)
    res["compiled"] = cfg.train.compile
    model = parallel.wrap(method, cfg.train, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = time_steps(compiled(model), batches, steps, bf16, device)
    res.update(img_per_s=batch_size / sec, step_s=sec, data_s_per_batch=data_s, flops_per_img=flops / batch_size,
               achieved_gflops=flops / sec / 1e9)
    res["mfu"] = res["achieved_gflops"] / res["peak_matmul_gflops"]
    # memory: the step's peak (CUDA: allocated; CPU: the process's peak resident set), and what it
    # implies per GPU for DDP and FSDP: the training state (16 bytes a parameter) replicated or
    # sharded, plus the activations measured here (the peak less this rank's training state)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else _rss_mb("VmHWM") / 1e3
    state_gb = 16 * params / (world if parallel.is_sharded(model) else 1) / 1e9
    res["peak_mem_gb" if device.type == "cuda" else "peak_rss_gb"] = peak_gb
    res["memory_plan"] = parallel.memory_plan(params, max(0.0, peak_gb - state_gb))
    sharded = parallel.is_sharded(model)
    # the method's own ablations (e.g. MAE's full-sequence encoder): speedup = their step time / ours
    for key, changes in ({} if sharded else method.bench_ablations).items():
        torch.manual_seed(0)
        variant = type(method)(cfg.model, dataclasses.replace(cfg.objective, **changes)).to(device)
        res[key] = time_steps(compiled(variant), batches, steps, bf16, device) / sec
        res[key.replace("_speedup", "_flop_ratio")] = step_flops(variant, batches[0]) / flops   # the ideal speedup
    if isinstance(method, HasBenchmarks):    # measurements only that method has (e.g. iGPT's KV cache)
        res.update(method.benchmarks(cfg, device, profile_step))
    res.update(timm_img_per_s=None, ratio_vs_timm=None)
    if peer and sharded:
        res["timm_error"] = "no timm peer under fsdp (the peer shares the method's head, which fsdp shards)"
    elif peer and not isinstance(method, HasTimmPeer):
        res["timm_error"] = (f"no timm peer for {cfg.method}: methods with one: "
                             f"{', '.join(methods_with(HasTimmPeer))}")
    elif peer:
        try:
            peer_model = method.timm_peer(cfg).to(device)
        except ImportError as e:
            res["timm_error"] = (f"timm is not importable ({e}); `make peers` builds .venv-peers with torch 2.14.1, "
                                 f"torchvision and timm, then run .venv-peers/bin/imagelm bench")
        else:
            peer_flops = step_flops(peer_model, batches[0])
            peer_sec = time_steps(peer_model, batches, steps, bf16, device)
            res.update(timm_img_per_s=batch_size / peer_sec, timm_mfu=peer_flops / peer_sec / 1e9 /
                       res["peak_matmul_gflops"], ratio_vs_timm=peer_sec / sec)
    return res


def report(res: dict) -> str:
    lines = [f"device {res['device']} ({res['precision']}{', compiled' if res.get('compiled') else ''}), "
             f"torch {res['torch']}, batch {res['batch_size']}",
             f"matmul peak: {res['peak_matmul_gflops_fp32']:.0f} GFLOP/s fp32, {res['peak_matmul_gflops']:.0f} "
             f"GFLOP/s {res['precision']}",
             f"imagelm {res['recipe_method']}: {res['img_per_s']:.0f} img/s, {res['achieved_gflops']:.0f} GFLOP/s, "
             f"MFU {100 * res['mfu']:.1f}% ({res['flops_per_img'] / 1e6:.0f} MFLOP/img per step)",
             f"feature extraction: {res['features_img_per_s']:.0f} img/s; data pipeline "
             f"{1000 * res['data_s_per_batch']:.0f} ms/batch"]
    plan, peak = res["memory_plan"], res.get("peak_mem_gb", res.get("peak_rss_gb"))
    lines.append(f"{res['param_count'] / 1e6:.1f}M parameters ({res['parallel']}, {res['ranks']} rank(s)"
                 f"{', activation checkpointing' if res['activation_checkpointing'] else ''}): peak memory "
                 f"{peak:.2f} GB; per GPU with AdamW: DDP {plan['ddp_gb']:.1f} GB, FSDP "
                 + ", ".join(f"{v:.1f} GB at {n}" for n, v in plan["fsdp_gb"].items()))
    for key in [k for k in res if k.endswith("_speedup")]:
        ideal = res.get(key.replace("_speedup", "_flop_ratio"))
        lines.append(f"{key}: {res[key]:.2f}x" + (f" (FLOP ratio {ideal:.2f}x)" if ideal else ""))
    lines += res.get("notes", [])
    if res.get("timm_img_per_s"):
        lines.append(f"timm VisionTransformer, same shape/head/loss: {res['timm_img_per_s']:.0f} img/s, "
                     f"MFU {100 * res['timm_mfu']:.1f}%; ratio imagelm/timm = {res['ratio_vs_timm']:.2f}x")
    else:
        lines.append(res.get("timm_error", "timm peer skipped"))
    return "\n".join(lines)
