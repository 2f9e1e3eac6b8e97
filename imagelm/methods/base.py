"""The method contract and the registry (see imagelm/methods/__init__.py); the methods import
this module, the package imports them: no cycle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from imagelm.errors import ConfigError

METHODS: dict[str, type] = {}


@dataclass
class Output:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """What every method has (see the module docstring)."""
    name: ClassVar[str]
    Config: ClassVar[type]
    couples_samples: ClassVar[bool] = False      # the loss pairs samples of the batch (contrastive)
    bench_ablations: ClassVar[dict] = {}         # `imagelm bench`: {key_speedup: config changes} timed against it
    export_leaves_out: ClassVar[str] = ""        # what an export of the vision encoder alone (timm, ONNX) drops
    encoder: nn.Module
    noise_dim: int = 0

    def forward(self, batch: dict) -> Output:
        raise NotImplementedError


# --- capabilities: what some methods offer ------------------------------------------------------
@runtime_checkable
class PreparesData(Protocol):
    """fits something on the training data before step 1 (a tokenizer, a palette)"""
    def prepare(self, data, run_dir, log=print) -> None: ...


@runtime_checkable
class ReadsText(Protocol):
    """has a text tokenizer and a text path"""
    def load_tokenizer(self, run_dir, texts=None, log=print) -> None: ...

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...


@runtime_checkable
class ExportsText(Protocol):
    """keeps its text path in an exported encoder (`imagelm export --to hf`, `imagelm.load`)"""
    def export_parts(self) -> tuple[str, ...]:
        """Its own parts (children, parameters) the text path needs; an export drops the rest."""
        ...

    def tokenizer_setting(self) -> str:
        """The configured text tokenizer folder ("" = the run's text_tokenizer/)."""
        ...

    def get_tokenizer(self): ...

    def set_tokenizer(self, tok) -> None: ...


@runtime_checkable
class TransformsText(Protocol):
    """reads each training sample's text (a caption, or a document's text and image places) as
    tensors the loader makes per sample"""
    def text_transform(self) -> Callable:
        """After prepare(): a picklable callable (text: str | list of parts, u: (2,) uniforms) ->
        {batch key: tensor} for one sample, run in the loader's workers; the loader stacks them."""
        ...


@runtime_checkable
class EmbedsImageText(Protocol):
    """embeds images and texts in one space (zero-shot, retrieval)"""
    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SeparateImageTextPaths(Protocol):
    """has image and text paths without a joint space (fine-tuned into one for retrieval)"""
    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FusesImageText(Protocol):
    """encodes an image and a text together (image-text matching)"""
    def pair_features(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Reconstructs(Protocol):
    """reconstructs masked images (`imagelm sample --reconstruct`)"""
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor): ...


@runtime_checkable
class Completes(Protocol):
    """samples image completions (`imagelm sample --complete`)"""
    def complete(self, images: torch.Tensor, keep_rows: int, temperature: float = 1.0, top_k: int = 0,
                 generator=None) -> torch.Tensor: ...


@runtime_checkable
class ExposesLatent(Protocol):
    """has a latent of its own to check for collapse"""
    def latents(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class HasBenchmarks(Protocol):
    """has measurements of its own for `imagelm bench`"""
    def benchmarks(self, cfg, device) -> dict: ...


@runtime_checkable
class HasTimmPeer(Protocol):
    """can train a timm VisionTransformer trunk with its own head and loss (`imagelm bench`'s peer)"""
    def timm_peer(self, cfg) -> nn.Module: ...


def methods_with(cap: type) -> list[str]:
    return sorted(name for name, cls in METHODS.items() if issubclass(cls, cap))


def require(method, cap: type, what: str):
    """`method` if it has capability `cap`, else a ConfigError naming the methods that have it."""
    if not isinstance(method, cap):
        raise ConfigError(f"{what} needs a method that {cap.__doc__.strip()}; '{method.name}' does not "
                          f"(methods that do: {', '.join(methods_with(cap)) or 'none'})")
    return method


def register(name: str):
    def deco(cls):
        if not issubclass(cls, Method):
            raise TypeError(f"method '{name}' must subclass imagelm.methods.Method")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def build_method(cfg) -> Method:
    return METHODS[cfg.method](cfg.model, cfg.objective)
