"""InfoNCE, the one contrastive loss CLIP, LCL and BEiT-3's retrieval fine-tune share."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, keys: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor,
             max_logit_scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE: query i's match is key target[i] among all keys, and key target[i]'s
    match is query i among all queries (keys no query targets only serve as negatives).
    queries (Q, E), keys (K, E) unit vectors; the temperature is exp(-logit_scale), at least
    1/max_logit_scale. Returns (loss, logits (Q, K))."""
    scale = logit_scale.clamp(max=math.log(max_logit_scale)).exp()
    logits = scale * queries.float() @ keys.float().T                                   # (Q, K)
    q = torch.arange(len(queries), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T[target], q)) / 2, logits
