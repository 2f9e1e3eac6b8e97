"""Plots for a run directory: loss curve, probe accuracy per layer."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(run: Path) -> Path | None:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss", title=f"{run.name}: pretraining loss")
    ax.grid(alpha=0.3)
    return _save(fig, run / "plots" / "loss.png")


def plot_layers(run: Path, results: dict) -> Path | None:
    """Linear (solid) and k-NN (dashed) val accuracy per layer (what each probe chose its layer
    by), pretrained and random init."""
    if "linear" not in results and "knn" not in results:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for probe, style in (("linear", "-"), ("knn", "--")):
        for name, r, colour in [("pretrained", results, "C0"), ("random init", results.get("random_init", {}), "C1")]:
            if "per_layer" in r.get(probe, {}):   # results merged from older evaluations may lack it
                per = r[probe]["per_layer"]
                ax.plot([int(l) for l in per], [100 * a for a in per.values()], style, color=colour, marker="o",
                        label=f"{probe}, {name}")
        raw = results.get("raw_pixels", {}).get(probe)
        if raw and "val_acc" in raw:
            ax.axhline(100 * raw["val_acc"], color="gray", ls=style, label=f"{probe}, raw pixels")
    ax.set(xlabel="layer (0 = patch embeddings)", ylabel="val top-1 (%)", title="probes per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, run / "plots" / "probe_layers.png")


def plot_run(run: Path, results: dict | None = None) -> None:
    plot_loss(run)
    if results:
        plot_layers(run, results)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def image_grid(columns: list, path: Path, scale: int = 4, pad: int = 2) -> Path:
    """Save a PNG whose column j shows columns[j] (N, C, H, W) in [0, 1], one image per row."""
    import numpy as np
    import torch
    from PIL import Image

    n, c, h, w = columns[0].shape
    canvas = torch.ones(c, n * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, col in enumerate(columns):
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y:y + h, x:x + w] = col[i].clamp(0, 1)
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
