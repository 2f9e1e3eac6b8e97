import json

import torch

from imagelm.bench import matmul_peak
from imagelm.cli import main


def test_matmul_peak_is_measured():
    assert matmul_peak(torch.float32, torch.device("cpu"), sizes=(128,), reps=2) > 0


def test_bench_json_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "aim-tiny", "data.dataset=synthetic", "model.img_size=8", "model.patch_size=2",
            "model.dim=32", "model.depth=1", "model.heads=2", "--batch-size", "16", "--steps", "2", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("img_per_s", "timm_img_per_s", "ratio_vs_timm", "mfu", "peak_matmul_gflops"):
        assert key in res
    assert res["img_per_s"] > 0 and 0 < res["mfu"] < 1.5
    if res["timm_img_per_s"] is not None:                      # timm importable here
        assert res["ratio_vs_timm"] > 0


def test_bench_times_the_methods_own_ablations(capsys):
    args = ["bench", "mae-tiny", "data.dataset=synthetic", "model.img_size=8", "model.patch_size=2", "model.dim=32",
            "model.depth=1", "model.heads=2", "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2",
            "--batch-size", "16", "--steps", "2", "--json", "--no-peer"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    # the ablation ran (its speed is noise at this size; `imagelm bench` reports it) and costs what it should:
    # encoding all 16 patches instead of the 4 visible ones is more than twice the FLOPs
    assert res["visible_only_speedup"] > 0 and res["visible_only_flop_ratio"] > 2 and res["timm_img_per_s"] is None
