"""Why imagelm's Transformer writes attention out when training short sequences on CPU: SDPA's
math backend, its flash kernel and the written-out path (`explicit_attention`), forward +
backward on bf16 q/k/v under autocast, at the shapes imagelm trains. `nn/transformer.py` trains
on the written-out path up to CPU_EXPLICIT_ATTENTION_MAX_LEN tokens and on SDPA (flash) above
it; this prints where the crossover lies on this machine.

    .venv/bin/python benchmarks/attention_backends.py          # ~40 s on 2 cores
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from imagelm.nn.transformer import CPU_EXPLICIT_ATTENTION_MAX_LEN, explicit_attention

SHAPES = [  # (batch, heads, tokens, head dim, causal, what trains at this shape)
    (256, 3, 12, 64, False, "mae-tiny encoder, 12 visible patches"),
    (256, 4, 49, 32, False, "mae-tiny decoder"),
    (256, 3, 49, 64, False, "ViT 192x6 at 49 patches (aim/beit/clip-tiny)"),
    (64, 2, 32, 64, True, "clip-tiny text tower"),
    (32, 2, 160, 64, True, "lcl-tiny document model"),
    (64, 2, 160, 64, True, "lcl-tiny document model, batch 64"),
    (128, 4, 100, 64, True, "igpt-tiny (256x3), 10x10 pixels"),
    (128, 3, 196, 64, True, "iGPT 192x6 at 14x14 pixels"),
    (64, 4, 256, 64, True, "iGPT 256x3 at 16x16 pixels"),
    (16, 4, 784, 32, True, "iGPT at 28x28 pixels"),
]


def step_ms(backend: SDPBackend | None, B: int, h: int, N: int, d: int, causal: bool, reps: int = 7) -> float:
    """Median milliseconds of one forward + backward; backend None = written out."""
    q, k, v = (torch.randn(B, h, N, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if backend is None:
                out = explicit_attention(q, k, v, is_causal=causal)
            else:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.float().sum().backward()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    torch.manual_seed(0)
    print(f"training writes attention out up to {CPU_EXPLICIT_ATTENTION_MAX_LEN} tokens, SDPA (flash) above")
    print(f"{'B':>4}{'heads':>6}{'tokens':>7}{'causal':>7}{'math ms':>9}{'flash ms':>10}{'explicit ms':>12}"
          f"{'math/expl':>10}{'flash/expl':>11}  shape of")
    for B, h, N, d, causal, what in SHAPES:
        math_ms = step_ms(SDPBackend.MATH, B, h, N, d, causal)
        flash_ms = step_ms(SDPBackend.FLASH_ATTENTION, B, h, N, d, causal)
        expl_ms = step_ms(None, B, h, N, d, causal)
        print(f"{B:>4}{h:>6}{N:>7}{causal!s:>7}{math_ms:>9.1f}{flash_ms:>10.1f}{expl_ms:>12.1f}"
              f"{math_ms / expl_ms:>9.2f}x{flash_ms / expl_ms:>10.2f}x  {what}")


if __name__ == "__main__":
    main()
