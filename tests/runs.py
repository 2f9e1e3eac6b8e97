"""Tiny run directories for the export/API tests: a config, one checkpoint of perturbed weights
(so zero biases or unit norms cannot hide a mapping error) and, for image-text runs, a text
tokenizer. Built in a second, without training."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from conftest import tiny_cfg
from imagelm import checkpoint
from imagelm.methods import build_method

# the ViT-based methods' tiny configs (test_*.py use the same shapes)
METHODS = {
    "aim": (),
    "aim-rgb-bias": ("model.bias=true", "model.in_chans=3", "model.img_size=12", "model.patch_size=3"),
    "mae": ("method=mae", "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2", "model.bias=true"),
    "beit": ("method=beit", "beit.vocab=16", "beit.tokenizer_kind=kmeans"),
    "clip": ("method=clip", "clip.embed_dim=16", "clip.context_length=12", "clip.text_vocab=300", "clip.text_dim=32",
             "clip.text_depth=2", "clip.text_heads=2"),
    "lcl": ("method=lcl", "lcl.embed_dim=16", "lcl.image_tokens=4", "lcl.context_length=40", "lcl.text_vocab=300",
            "lcl.text_dim=32", "lcl.text_depth=1", "lcl.text_heads=2"),
    "beit3": ("method=beit3", "beit3.vocab=32", "beit3.context_length=12", "beit3.text_vocab=400",
              "beit3.vl_layers=1", "model.depth=3"),
}
CAPTIONS = ["a photo of a sneaker", "a bag on the left", "an ankle boot", "a dress and a coat", "a pair of trousers",
            "a shirt next to a sandal", "a pullover", "a t-shirt"] * 4


def make_run(root: Path, *overrides: str, step: int = 3, seed: int = 0) -> Path:
    from imagelm.tokenizers.text import train_text_tokenizer

    cfg = tiny_cfg(*overrides)
    torch.manual_seed(seed)
    method = build_method(cfg)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.1 * torch.randn_like(p))
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    checkpoint.save(root / "checkpoints", step, method.state_dict(), {"step": step})
    if cfg.method in ("clip", "beit3", "lcl"):
        train_text_tokenizer(CAPTIONS, 290).save(root / "text_tokenizer")
    return root
