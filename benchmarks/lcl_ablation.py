"""LCL's ablation at equal compute: contrastive only, generation only, and both, each trained for
the same wall time on the same documents, plus CLIP on captions of the same Fashion-MNIST images;
every vision encoder probed by `imagelm eval`. Prints one table (probe accuracies, and the
effective rank of the pooled features and of LCL's latent z as the collapse indicator) and saves
benchmarks/results/lcl_ablation.{json,png}.

    .venv/bin/python benchmarks/lcl_ablation.py --minutes 3          # ~22 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RUNS = {   # name -> pretrain arguments
    "lcl-both": ["lcl-tiny", "lcl.objective=both"],
    "lcl-contrastive": ["lcl-tiny", "lcl.objective=contrastive"],
    "lcl-generation": ["lcl-tiny", "lcl.objective=generation"],
    "clip-same-images": ["clip-tiny", "data.dataset=captions"],     # the same ViT, 56 px patch 8
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="pretraining wall time per run")
    ap.add_argument("--root", default="runs/lcl-ablation")
    ap.add_argument("--only", nargs="*", help="a subset of: " + ", ".join(RUNS))
    args = ap.parse_args()
    imagelm = [sys.executable, "-m", "imagelm.cli"]
    rows = {}
    for name, pre in RUNS.items():
        if args.only and name not in args.only:
            continue
        out = Path(args.root) / name
        if not (out / "checkpoints").exists():
            subprocess.run(imagelm + ["pretrain", *pre, "--out", str(out), "--minutes", str(args.minutes),
                                      "--no-progress"], check=True)
        if not (out / "eval" / "probes.json").exists():     # (delete RUN/eval to probe a trained run again)
            subprocess.run(imagelm + ["eval", str(out), "--json"], check=True, stdout=subprocess.DEVNULL)
        rows[name] = json.loads((out / "eval" / "probes.json").read_text())
    print(table(rows))
    results = Path("benchmarks/results")
    results.mkdir(parents=True, exist_ok=True)
    (results / "lcl_ablation.json").write_text(json.dumps({"minutes": args.minutes, "runs": rows}, indent=2))
    plot(rows, results / "lcl_ablation.png")


def table(rows: dict) -> str:
    head = f"{'run':<18}{'linear':>10}{'attentive':>11}{'k-NN':>8}{'feat. eff. rank':>17}{'z eff. rank':>13}{'z std':>8}"
    lines = [head]
    for name, r in rows.items():
        z = r.get("latent", {})
        lines.append(f"{name:<18}{100 * r['linear']['acc']:>9.2f}%{100 * r['attentive']['acc']:>10.2f}%"
                     f"{100 * r['knn']['acc']:>7.2f}%{r['features']['effective_rank']:>17.1f}"
                     + (f"{z['effective_rank']:>13.1f}{z['mean_std']:>8.3f}" if z else f"{'-':>13}{'-':>8}"))
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(rows)
    for i, probe in enumerate(("linear", "attentive", "knn")):
        a.bar([j + 0.27 * (i - 1) for j in range(len(names))], [100 * rows[n][probe]["acc"] for n in names],
              width=0.27, label=probe)
    a.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    a.set_ylim(60, 95)
    a.set_ylabel("Fashion-MNIST test accuracy (%)")
    a.legend(fontsize=8)
    b.bar(names, [rows[n]["features"]["effective_rank"] for n in names])
    b.set_ylabel("effective rank of pooled features")
    b.tick_params(axis="x", rotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
