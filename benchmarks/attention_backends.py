"""Why imagelm's Transformer asks SDPA for its math backend when training short sequences on CPU:
forward + backward time of causal SDPA with the flash kernel vs the math path, bf16, at the
sequence lengths of aim-tiny (49), a 14x14 grid (196) and iGPT's 28x28 pixels (784).

    .venv/bin/python benchmarks/attention_backends.py
"""
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def fwd_bwd_ms(backend, q, k, v, mask, reps=5) -> float:
    times = []
    with sdpa_kernel([backend]):
        for i in range(reps + 1):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
            if i:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


for B, heads, N, d in [(256, 3, 49, 64), (64, 3, 196, 64), (16, 4, 784, 32)]:
    q, k, v = (torch.randn(B, heads, N, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    i = torch.arange(N)
    mask = (i[None] <= i[:, None])[None, None].expand(B, 1, N, N)
    flash, math_ = (fwd_bwd_ms(b, q, k, v, mask) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH))
    print(f"N={N:4d} batch {B:3d}: flash {flash:6.1f} ms, math {math_:6.1f} ms, flash/math = {flash / math_:.2f}x")
