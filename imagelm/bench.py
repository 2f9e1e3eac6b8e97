"""Throughput, achieved FLOP/s and MFU against this machine's measured matmul peak, and in the same
run a timm VisionTransformer of the same width/depth/patch trained with the same head and loss."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imagelm import dist
from imagelm.config import Config
from imagelm.data import sources
from imagelm.data.loader import make_loader
from imagelm.methods import build_method
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
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for i in range(steps + 3):
        batch = batches[i % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = model(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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


class TimmAIM(nn.Module):
    """The peer: timm's VisionTransformer as the trunk (same width, depth, heads, patch, prefix
    mask), with our AIM head and loss, so only the backbone implementation differs."""

    def __init__(self, method, cfg: Config):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        m = cfg.model
        self.aim = method
        self.vit = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                                     num_classes=0, embed_dim=m.dim, depth=m.depth, num_heads=m.heads,
                                     mlp_ratio=m.mlp_ratio, qkv_bias=m.bias, class_token=False,
                                     global_pool="", no_embed_class=True)

    def forward(self, batch):
        from imagelm.methods import Output
        from imagelm.nn.transformer import attention_mask

        images, noise = batch["image"], batch["noise"]
        order, S = self.aim.sample_order(noise), self.aim.sample_prefix(noise)
        mask = attention_mask("prefix", order.shape[1], S, images.device)
        z = self.vit.forward_features(images, attn_mask=mask)
        return Output(self.aim.loss(self.aim.decode(z, order), self.aim.targets(images), S))


# peers: a timm trunk with the method's own head and loss, by method name
PEERS = {"aim": TimmAIM}


def bench(cfg: Config, batch_size: int = 256, steps: int = 10, peer: bool = True) -> dict:
    _, _, device = dist.init()
    bf16 = dist.bf16_supported(device)
    torch.manual_seed(0)
    data = sources.load(cfg.data, cfg.model, "train")
    method = build_method(cfg).to(device)
    loader = make_loader(data, cfg.data, batch_size, seed=0, noise_dim=method.noise_dim, device=device)
    batches = [loader.batch(i) for i in range(5)][1:]
    _sync(device)
    t0 = time.perf_counter()
    loader.batch(5)
    _sync(device)
    data_s = time.perf_counter() - t0
    res = {"recipe_method": cfg.method, "device": str(device), "precision": "bf16" if bf16 else "fp32",
           "batch_size": batch_size, "torch": torch.__version__,
           "peak_matmul_gflops_fp32": matmul_peak(torch.float32, device)}
    res["peak_matmul_gflops"] = matmul_peak(torch.bfloat16, device) if bf16 else res["peak_matmul_gflops_fp32"]
    flops = step_flops(method, batches[0])
    # train.compile=true times the torch.compile'd step, as the trainer would run it (FLOPs: eager)
    if cfg.train.compile:
        check_compiler(device)
    compiled = torch.compile if cfg.train.compile else (lambda m: m)
    res["compiled"] = cfg.train.compile
    sec = time_steps(compiled(method), batches, steps, bf16, device)
    res.update(img_per_s=batch_size / sec, step_s=sec, data_s_per_batch=data_s, flops_per_img=flops / batch_size,
               achieved_gflops=flops / sec / 1e9)
    res["mfu"] = res["achieved_gflops"] / res["peak_matmul_gflops"]
    with torch.inference_mode(), (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                                  else contextlib.nullcontext()):
        x = batches[0]["image"]
        method.encoder.features(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            method.encoder.features(x)
        _sync(device)
        res["features_img_per_s"] = 3 * len(x) / (time.perf_counter() - t0)
    # the method's own ablations (e.g. MAE's full-sequence encoder): speedup = their step time / ours
    for key, changes in getattr(method.Config, "BENCH_ABLATIONS", {}).items():
        torch.manual_seed(0)
        variant = type(method)(cfg.model, dataclasses.replace(cfg.objective, **changes)).to(device)
        res[key] = time_steps(compiled(variant), batches, steps, bf16, device) / sec
        res[key.replace("_speedup", "_flop_ratio")] = step_flops(variant, batches[0]) / flops   # the ideal speedup
    if hasattr(method, "benchmarks"):    # measurements only that method has (e.g. iGPT's KV cache)
        res.update(method.benchmarks(cfg, device))
    res.update(timm_img_per_s=None, ratio_vs_timm=None)
    if peer and cfg.method not in PEERS:
        res["timm_error"] = f"no timm peer is defined for {cfg.method}"
    elif peer:
        try:
            peer_model = PEERS[cfg.method](method, cfg).to(device)
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
