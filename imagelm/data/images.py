"""Decoding and per-sample augmentation of one image file, the work streamed datasets do in
DataLoader workers: open (regular files only), convert to 8-bit L/RGB (16-bit scaled, not
saturated), RandomResizedCrop from the full-resolution image, flip, optional colour jitter.

The randomness of a sample is 5 uniforms (+3 for jitter) the loader draws for the whole global
batch from a generator seeded by the step, the same draws the in-memory loader turns into crop
matrices: a sample's crop depends on (seed, step, position in the global batch) only, never on
which worker or rank decoded it."""
from __future__ import annotations

import io
import math
import os
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagelm.errors import DataError  # noqa: F401 - raised here, importable from here

MODES = {1: "L", 3: "RGB"}


def open_image(src: str | Path | bytes, mode: str, draft=None) -> Image.Image:
    """A path or encoded bytes -> a fully decoded PIL image in `mode` ("L" or "RGB"). A path that
    is not a regular file (a FIFO, a device) is refused without being opened, so it cannot block.
    16-bit and float greyscale are scaled to 8 bit; `draft` lets JPEG decode at a reduced scale
    that still covers that size (DCT scaling: much less work for big photos); a callable
    draft(width, height) -> size decides from the header."""
    if isinstance(src, bytes):
        fp = io.BytesIO(src)
    else:
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{src} is not a regular file")
        fp = src
    with Image.open(fp) as im:
        if draft is not None and im.format == "JPEG":
            im.draft(mode, draft(*im.size) if callable(draft) else draft)
        im.load()
        return to_mode(im, mode)


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float32)
        if im.mode != "F" and (im.mode.startswith("I;16") or a.max(initial=0) > 255):
            a = a / 257.0                                   # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode in ("P", "PA") or (im.mode in ("LA", "RGBA") and mode == "RGB"):
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
    if im.mode != mode:
        im = im.convert(mode)
    return im


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL L/RGB -> (C, H, W) uint8."""
    return torch.from_numpy(chw(im))


def chw(im: Image.Image) -> np.ndarray:
    """PIL L/RGB -> (C, H, W) uint8, one band at a time: Pillow packs a band as a plane in C, half
    the time of np.asarray's (H, W, C) copy followed by a transposing one."""
    W, H = im.size
    bands = im.getbands()
    out = np.empty((len(bands), H, W), np.uint8)
    for c, b in enumerate(bands):
        out[c] = np.frombuffer(im.tobytes("raw", b), np.uint8).reshape(H, W)
    return out


def crop_box(u: np.ndarray | torch.Tensor, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box (x0, y0, x1, y1) in pixels from uniforms u[0..3]: an area fraction in
    `scale`, a log-uniform aspect ratio in `ratio`, placed uniformly inside. On a square image this
    is the box of transforms.crop_params for the same uniforms."""
    u0, u1, u2, u3 = (float(v) for v in u[:4])
    area = (scale[0] + (scale[1] - scale[0]) * u0) * width * height
    r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u1)
    w, h = min(width, math.sqrt(area * r)), min(height, math.sqrt(area / r))
    x0, y0 = (width - w) * u2, (height - h) * u3
    return x0, y0, x0 + w, y0 + h


def jitter(im: Image.Image, u: np.ndarray, strength: float) -> Image.Image:
    """Colour jitter (brightness, contrast, saturation each by a factor in [1-s, 1+s]), torchvision
    ColorJitter's operations in a fixed order, from 3 uniforms."""
    from PIL import ImageEnhance

    for op, v in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), u[:3]):
        if op is ImageEnhance.Color and im.mode != "RGB":
            continue
        im = op(im).enhance(1 + strength * (2 * float(v) - 1))
    return im


def train_view(src: str | Path | bytes, channels: int, size: int, u: np.ndarray, scale: tuple[float, float],
               ratio: tuple[float, float], flip: bool, color_jitter: float = 0.0) -> np.ndarray:
    """Decode + RandomResizedCrop(size) + flip (+ jitter) -> (C, size, size) uint8. u: 8 uniforms."""
    full: list[tuple[int, int]] = []

    def draft(W: int, H: int) -> tuple[int, int]:            # decode at the scale the crop needs
        full.append((W, H))
        x0, y0, x1, y1 = crop_box(u, W, H, scale, ratio)
        return max(1, math.ceil(size * W / max(x1 - x0, 1e-6))), max(1, math.ceil(size * H / max(y1 - y0, 1e-6)))

    im = open_image(src, MODES[channels], draft=draft)
    W, H = full[0] if full else im.size
    box = crop_box(u, W, H, scale, ratio)
    if im.size != (W, H):                                   # decoded at a reduced scale: scale the box too
        sx, sy = im.size[0] / W, im.size[1] / H
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    im = im.resize((size, size), Image.BICUBIC, box=box)
    if flip and float(u[4]) < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if color_jitter > 0:
        im = jitter(im, u[5:8], color_jitter)
    return chw(im)


def eval_view(src: str | Path | bytes, channels: int, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """Decode, resize the short side to size / crop_pct, centre crop size x size -> (C, size, size)
    uint8. crop_pct=1 on a square image is a plain resize (what the in-memory sources do)."""
    im = open_image(src, MODES[channels], draft=(size, size))
    W, H = im.size
    short = size / crop_pct
    s = short / min(W, H)
    w, h = size / s, size / s                               # the centre box in source pixels
    box = ((W - w) / 2, (H - h) / 2, (W + w) / 2, (H + h) / 2)
    return chw(im.resize((size, size), Image.BICUBIC, box=box))
