"""Image-text evaluation for models with `encode_image`, `encode_text` and `tokenize`:
zero-shot classification from an ensemble of prompt templates (as open_clip), and image<->text
retrieval R@1/5/10 on held-out scenes (one caption per image)."""
from __future__ import annotations

import torch

from imagelm import dist

# open_clip-style templates; none is a training caption template, so this measures transfer
PROMPTS = ["a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
           "a low contrast photo of a {}.", "a photo of the {}.", "a cropped photo of a {}.",
           "a photo of a small {}.", "a photo of a big {}.", "itap of a {}.", "a good photo of the {}."]


# class names as prompts say them (open_clip keeps such lists per dataset): "a photo of a trouser"
# is not how anyone captions trousers
CLASSNAMES = {"fashion-mnist": ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
                                "sneaker", "bag", "ankle boot"]}


@torch.inference_mode()
def embed_images(model, images: torch.Tensor, batch_size: int = 1024, bf16: bool = True) -> torch.Tensor:
    """(N, E) on the CPU; the batches run where the model is."""
    device = dist.module_device(model)
    with dist.autocast(device, bf16):
        return torch.cat([model.encode_image(b.to(device)).float().cpu() for b in images.split(batch_size)])


@torch.inference_mode()
def embed_texts(model, texts: list[str], batch_size: int = 1024, bf16: bool = True) -> torch.Tensor:
    device = dist.module_device(model)
    tokens = model.tokenize(texts)
    with dist.autocast(device, bf16):
        return torch.cat([model.encode_text(b.to(device)).float().cpu() for b in tokens.split(batch_size)])


def class_embeddings(model, classes: list[str], prompts=PROMPTS, bf16: bool = True) -> torch.Tensor:
    """(classes, E): each class's prompt embeddings averaged, then renormalised."""
    e = embed_texts(model, [p.format(c) for c in classes for p in prompts], bf16=bf16)
    return torch.nn.functional.normalize(e.view(len(classes), len(prompts), -1).mean(1), dim=-1)


def zero_shot(model, images: torch.Tensor, labels: torch.Tensor, classes: list[str], bf16: bool = True) -> dict:
    """images are standardised (N, C, H, W)."""
    pred = (embed_images(model, images, bf16=bf16) @ class_embeddings(model, classes, bf16=bf16).T).argmax(1)
    per_class = {c: (pred[labels == k] == k).float().mean().item() for k, c in enumerate(classes) if (labels == k).any()}
    return {"acc": (pred == labels).float().mean().item(), "prompts": len(PROMPTS), "per_class": per_class}


def recall_at(sim: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """sim (queries, items), query i's match is item i: fraction whose match ranks in the top k."""
    rank = (sim > sim.diagonal()[:, None]).sum(1)            # items scored above the match
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval(model, images: torch.Tensor, captions: list[str], bf16: bool = True) -> dict:
    sim = embed_images(model, images, bf16=bf16) @ embed_texts(model, captions, bf16=bf16).T    # (N, N)
    i2t, t2i = recall_at(sim), recall_at(sim.T)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()},
            "n": len(captions)}
