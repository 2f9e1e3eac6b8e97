"""torch.distributed helpers: the same code runs as one process or under torchrun."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, torch.device]:
    """(rank, world, device); starts the process group when launched by torchrun (also with one
    process, so that `torchrun --nproc_per_node=1` runs the same sharded code as N ranks)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def close() -> None:
    """End of a torchrun job: release the process group, as PyTorch asks (NCCL warns without it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def mean(x: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over ranks (no gradient)."""
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off: CUDA with bf16, or a CPU with AVX-512 BF16 / AMX instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device | str, bf16: bool):
    """The one autocast every training and evaluation path uses: bf16 on the run's device type."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its inputs go there)."""
    p = next(module.parameters(), None)
    if p is None:
        p = next(module.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice. Each rank then
    holds the global loss and DDP's gradient mean divides the world-size factor back out, so the
    gradients are those of one process with the global batch (the bug to avoid: keeping only
    the local gradient, which is off by 1/world_size)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)                     # gloo has no reduce_scatter; this is its equivalent
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (world * n, ...) in rank order, differentiable; identity on one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_varying(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows that differ in number per rank (e.g. images per document batch): (n_r, ...) ->
    ((sum n_r, ...) in rank order, differentiable; offset of this rank's rows). Padded to the
    largest n_r for the gather, the padding dropped after."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    if m == 0:
        return x, 0
    full = gather_with_grad(torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])]))
    keep = torch.cat([torch.arange(r * m, r * m + s, device=x.device) for r, s in enumerate(sizes)])
    return full[keep], sum(sizes[:dist.get_rank()])
