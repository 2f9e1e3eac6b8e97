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
    if "linear" not in results:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in [("pretrained", results), ("random init", results.get("random_init", {}))]:
        if "linear" in r:
            per = r["linear"]["per_layer"]
            ax.plot([int(l) for l in per], [100 * a for a in per.values()], marker="o", label=name)
    raw = results.get("raw_pixels", {}).get("linear")
    if raw:
        ax.axhline(100 * raw["acc"], color="gray", ls="--", label="raw pixels")
    ax.set(xlabel="layer (0 = patch embeddings)", ylabel="linear probe top-1 (%)", title="linear probe per layer")
    ax.grid(alpha=0.3)
    ax.legend()
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
