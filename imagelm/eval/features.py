"""Features for evaluation, in one pass over the data: mean-pooled tokens of every requested
layer (for linear probes and k-NN) and the patch tokens averaged over a band of layers (for the
attentive probe). Inference mode, bf16 where supported, large batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imagelm import dist
from imagelm.data.sources import ImageData, is_streamed
from imagelm.data.transforms import normalize
from imagelm.nn.embed import patchify


# On CPU, large batches run slower: the elementwise ops (GELU, adds, norms, dtype copies) of a
# 512 x 196-token batch fall out of cache (iGPT 192x6 at 14 px: 207 img/s at 512 images, 498 at
# 16). There the model runs on chunks of about this many tokens; accelerators keep the whole batch.
CPU_CHUNK_TOKENS = 4096


@dataclass
class Features:
    pooled: dict[int, torch.Tensor]      # layer -> (N, D) float32
    tokens: torch.Tensor | None          # (N, K, D) bf16, mean over the token layers
    labels: torch.Tensor | None = None   # (N,) the images' labels, in feature order


def batches(data, size: int, device: torch.device | str = "cpu"):
    """(uint8 images, labels) in chunks of `size`: slices of an in-memory set, or one streamed pass
    over a folder / shards (decoded in worker processes, so a set larger than memory works)."""
    if not is_streamed(data):
        for i in range(0, len(data), size):
            yield data.images[i:i + size], data.labels[i:i + size]
        return
    from imagelm.data.stream import eval_batches
    yield from eval_batches(data, size, data.workers, pin=torch.device(device).type == "cuda")


@torch.inference_mode()
def extract(encoder, data: ImageData, layers: list[int], token_layers: list[int], batch_size: int = 1024,
            bf16: bool = True, device: torch.device | str = "cpu") -> Features:
    encoder.eval().to(device)
    want = sorted(set(layers) | set(token_layers))
    pooled = {l: [] for l in layers}
    tokens = []
    amp = dist.autocast(device, bf16)
    chunk, labels = batch_size, []
    if torch.device(device).type == "cpu" and want and len(data):
        with amp:      # tokens per image, from an image of the encoder's size
            one = torch.zeros(1, data.channels, data.size, data.size, dtype=torch.uint8) if is_streamed(data) \
                else data.images[:1]
            n = encoder.features(normalize(one, data.mean, data.std), want[:1])[0].shape[1]
        chunk = max(1, min(batch_size, CPU_CHUNK_TOKENS // n))
    for images, y in batches(data, chunk, device):
        labels.append(y.tolist())      # plain ints: a tensor made here would be an inference tensor
        x = normalize(images.to(device, non_blocking=True), data.mean, data.std)
        with amp:
            outs = dict(zip(want, encoder.features(x, want)))
        for l in layers:
            pooled[l].append(outs[l].mean(dim=1, dtype=torch.float32).cpu())
        if token_layers:     # summed in fp32 in place: no stacked copy of the band
            band = outs[token_layers[0]].to(torch.float32, copy=True)
            for l in token_layers[1:]:
                band += outs[l]
            tokens.append(band.div_(len(token_layers)).to(torch.bfloat16).cpu())
    return Features({l: torch.cat(v) for l, v in pooled.items()}, torch.cat(tokens) if tokens else None,
                    _labels(labels))


@torch.inference_mode(False)
def _labels(chunks: list[list[int]]) -> torch.Tensor:
    return torch.tensor([y for c in chunks for y in c], dtype=torch.int64)


def raw_pixels(data: ImageData, patch_size: int) -> Features:
    """The no-learning baseline: flattened standardised pixels for the linear probe and k-NN, and
    for the attentive probe the pixel patches with a one-hot position appended (pooling over
    bare patches would throw the layout away)."""
    x = normalize(data.images, data.mean, data.std)
    patches = patchify(x, patch_size)                                    # (N, K, p*p*C)
    N, K, _ = patches.shape
    pos = torch.eye(K).expand(N, K, K)
    return Features({0: x.flatten(1)}, torch.cat([patches, pos], dim=-1).to(torch.bfloat16), data.labels)
