"""The public API: `imagelm.load(path)` -> the pretrained encoder of a run (or of an exported
folder) as an nn.Module that carries its own preprocessing.

    enc = imagelm.load("runs/mae-tiny")
    x = enc.preprocess(images)          # uint8 or [0, 1] float, any size, or PIL -> standardised (B, C, S, S)
    z = enc(x)                          # (B, D): the last block's tokens, mean-pooled (eval's probe features)
    hs = enc.features(x, [2, 4])        # per-layer tokens (B, K, D), 0 = embeddings

Image-text runs with a text tower (clip; beit3's language path) also have `encode_text` and
`encode_image`; clip, whose towers share an embedding space, `zero_shot(images, class_names)`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from imagelm import __version__, checkpoint
from imagelm.config import Config, ConfigError, drop_retired, from_dict
from imagelm.methods import EmbedsImageText, ExportsText, build_method, methods_with

FORMAT = "imagelm-encoder"          # config.json["format"] of an exported folder
STATS = "preprocess.json"           # in a run dir: the training data's per-channel mean/std
TOKENIZER_DIR = "text_tokenizer"


class Encoder(nn.Module, PyTorchModelHubMixin, library_name="imagelm", tags=["image-feature-extraction"]):
    """A run's encoder (and text path, for image-text runs) with its preprocessing. `config` is
    the exported folder's config.json: the run's config, the standardisation statistics, the source."""

    def __init__(self, config: dict):
        super().__init__()
        if config.get("format") != FORMAT:
            raise ConfigError(f"not an imagelm export (config.json has format {config.get('format')!r}, "
                              f"expected {FORMAT!r})")
        self.config = config
        self.run_config: Config = from_dict(drop_retired(config["run"]))
        self.method_name = self.run_config.method
        self.img_size, self.in_chans = self.run_config.model.img_size, self.run_config.model.in_chans
        method = build_method(self.run_config)
        if not isinstance(method, ExportsText):     # image only: the encoder alone
            self.model = method.encoder
        else:                   # the parts the text path needs; training heads and tokenizers are dropped
            own = [n for n, _ in method.named_children()] + [n for n, _ in method.named_parameters(recurse=False)]
            for name in set(own) - set(method.export_parts()):
                delattr(method, name)
            self.model = method
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, -1, 1, 1), persistent=False)
        self.eval()

    # --- the image encoder --------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        """The backbone: the ViT (PixelGPT for igpt) with `features(images, layers)`."""
        return self.model.encoder if self.has_text else self.model

    @property
    def has_text(self) -> bool:
        return isinstance(self.model, ExportsText)

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def num_features(self) -> int:
        return self.run_config.model.dim

    def preprocess(self, images) -> torch.Tensor:
        """Images -> the standardised input the encoder expects, (B, C, S, S) float on this
        module's device, S = model.img_size. Takes uint8 tensors (0..255), float tensors in [0, 1],
        (C, H, W) or (B, C, H, W), any H x W (resized bilinearly, antialiased when shrinking, as
        the training data was), or a PIL image or a list of them (converted to grey or RGB as the
        model's channels ask)."""
        from imagelm.data.sources import resize

        if not isinstance(images, torch.Tensor):
            images = self._from_pil(images)
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ValueError(f"images must be (C, H, W) or (B, C, H, W); got shape {tuple(images.shape)}")
        if images.shape[1] != self.in_chans:
            if images.shape[1] == 1:
                images = images.expand(-1, self.in_chans, -1, -1)
            else:
                raise ValueError(f"images have {images.shape[1]} channels; the model takes {self.in_chans}")
        if images.dtype == torch.uint8:
            x = resize(images, self.img_size).float() / 255
        else:
            x = images.float()
            if x.shape[-2:] != (self.img_size, self.img_size):
                x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                                  antialias=x.shape[-1] > self.img_size)
        return (x.to(self.mean.device) - self.mean) / self.std

    def _from_pil(self, images) -> torch.Tensor:
        import numpy as np
        from imagelm.data.sources import resize

        mode = "L" if self.in_chans == 1 else "RGB"
        out = []
        for im in images if isinstance(images, (list, tuple)) else [images]:
            if not hasattr(im, "convert"):
                raise TypeError(f"preprocess takes tensors or PIL images, not {type(im).__name__}")
            a = torch.from_numpy(np.array(im.convert(mode), dtype=np.uint8))
            a = a[None] if a.dim() == 2 else a.permute(2, 0, 1)                       # (C, H, W)
            out.append(resize(a[None], self.img_size))
        return torch.cat(out)

    def features(self, x: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Standardised images -> per-layer tokens [(B, K, D)]; 0 = embeddings, i = block i
        (default: the last), before the final norm, as `imagelm eval` reads them."""
        return self.encoder.features(x, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised images (B, C, S, S) -> (B, D): the last block's tokens, mean-pooled, as
        `imagelm eval`'s linear probe and k-NN read the last layer."""
        return self.features(x)[0].mean(1)

    # --- the text path (image-text runs) ------------------------------------------------------
    def _need_text(self, what: str) -> None:
        if not self.has_text:
            raise ConfigError(f"a {self.method_name} encoder has no text path: {what} needs a run of "
                              f"{' or '.join(methods_with(ExportsText))}")

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        self._need_text("tokenize")
        return self.model.tokenize([texts] if isinstance(texts, str) else list(texts)).to(self.mean.device)

    def encode_text(self, texts: str | list[str] | torch.Tensor) -> torch.Tensor:
        """Texts (or their tokens (B, L)) -> (B, E): clip's unit vectors in the joint space;
        beit3's language path, mean over the text's tokens (no space shared with images)."""
        self._need_text("encode_text")
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        if isinstance(self.model, EmbedsImageText):
            return self.model.encode_text(tokens)
        return self.model.text_features(tokens)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised images -> (B, E): clip's unit vectors in the joint space; beit3's vision
        path, mean-pooled after the final norm."""
        self._need_text("encode_image")
        if isinstance(self.model, EmbedsImageText):
            return self.model.encode_image(x)
        return self.model.image_features(x)

    @torch.inference_mode()
    def zero_shot(self, images, class_names: list[str], prompts: list[str] | None = None) -> torch.Tensor:
        """Images (anything `preprocess` takes) -> class probabilities (B, len(class_names)), each
        class's text embedding the mean over a prompt ensemble (open_clip's templates, as
        `imagelm eval --zero-shot`)."""
        from imagelm.eval import zeroshot as Z

        self._need_text("zero_shot")
        if not isinstance(self.model, EmbedsImageText):
            joint = sorted(set(methods_with(EmbedsImageText)) & set(methods_with(ExportsText)))
            raise ConfigError(f"{self.method_name}'s image and text paths share no embedding space: zero-shot "
                              f"needs a run of {' or '.join(joint)} (`imagelm eval --zero-shot` fine-tunes one "
                              f"for {self.method_name} first)")
        text = Z.class_embeddings(self, list(class_names), prompts or Z.PROMPTS, bf16=False)      # (classes, E)
        scale = self.model.logit_scale.clamp(max=math.log(self.model.cfg.max_logit_scale)).exp()
        return (scale * self.encode_image(self.preprocess(images)) @ text.T).softmax(-1)

    def _load_tokenizer(self, folder: Path) -> None:
        """The text tokenizer: an export's own copy, else the run's configured or trained one."""
        if not self.has_text:
            return
        from imagelm.tokenizers.text import TextTokenizer

        path = folder / TOKENIZER_DIR
        if not path.joinpath("tokenizer.json").exists():
            path = self.model.tokenizer_setting() or path
        self.model.set_tokenizer(TextTokenizer.load(path))

    # --- Hugging Face layout --------------------------------------------------------------------
    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, config=None,
                         **kwargs):
        """PyTorchModelHubMixin's loader for a local folder: strict (every weight present), with the
        text tokenizer; nothing is downloaded."""
        from safetensors.torch import load_model

        folder = Path(model_id)
        if not (folder / "model.safetensors").exists():
            raise FileNotFoundError(f"{folder} has no model.safetensors (`imagelm export RUN --to hf` writes one)")
        model = cls(config)
        load_model(model, str(folder / "model.safetensors"), strict=strict, device=map_location)
        model._load_tokenizer(folder)
        return model.eval()

    def save_pretrained(self, save_directory, **kwargs):
        """The Hugging Face layout (config.json, model.safetensors) plus the text tokenizer."""
        out = super().save_pretrained(save_directory, **kwargs)
        tok = self.model.get_tokenizer() if self.has_text else None
        if tok is not None:
            tok.save(Path(save_directory) / TOKENIZER_DIR)
        return out


# --- loading ------------------------------------------------------------------------------------
def run_stats(run: Path, cfg: Config) -> tuple[list[float], list[float]]:
    """The training data's per-channel mean and std, which standardise every input (as `imagelm
    eval` computes them); cached in RUN/preprocess.json so a later load does not read the data."""
    path = run / STATS
    if path.exists():
        s = json.loads(path.read_text())
        return s["mean"], s["std"]
    from imagelm.data import sources

    train = sources.load(cfg.data, cfg.model, "train")
    try:
        path.write_text(json.dumps({"mean": train.mean, "std": train.std, "data": cfg.data.dataset}))
    except OSError:     # a read-only run: recomputed next time
        pass
    return train.mean, train.std


def from_run(run: str | Path) -> Encoder:
    """A run directory's latest checkpoint as an Encoder."""
    from imagelm.train import load_run_config

    run = Path(run)
    cfg = load_run_config(run)
    ckpt = checkpoint.latest(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint: train it first (`imagelm pretrain ... --out {run}`)")
    mean, std = run_stats(run, cfg)
    config = {"format": FORMAT, "imagelm_version": __version__, "run": cfg.to_dict(), "mean": mean, "std": std,
              "source": {"run": run.name, "checkpoint": ckpt.name}}
    enc = Encoder(config)
    weights = checkpoint.load_weights(ckpt)
    sd = enc.model.state_dict()
    prefix = "" if enc.has_text else "encoder."
    enc.model.load_state_dict({k: weights[prefix + k] for k in sd})
    enc._load_tokenizer(run)
    return enc.eval()


def load(path: str | Path) -> Encoder:
    """A run directory (config.yaml + checkpoints/) or a folder written by `imagelm export --to hf`
    -> its Encoder, in eval mode on the CPU (`.to(device)` moves it)."""
    path = Path(path)
    if (path / "config.yaml").exists():
        return from_run(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is neither an imagelm run (no config.yaml) nor an exported folder "
                                f"(no config.json)")
    config = json.loads(cfg_file.read_text())
    if config.get("format") != FORMAT:
        hint = " (a timm export: load it with timm.create_model, see its README)" if "architecture" in config else ""
        raise ConfigError(f"{cfg_file} is not an imagelm export{hint}; `imagelm export RUN --to hf` writes one")
    return Encoder.from_pretrained(path)
