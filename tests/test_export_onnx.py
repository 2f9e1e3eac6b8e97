import json

import numpy as np
import pytest
import torch

import imagelm
from imagelm.cli import main
from runs import METHODS, make_run

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'imagelm[onnx]')")


@pytest.mark.parametrize("name", ["mae", "beit3"])
def test_onnx_export_gives_the_encoders_pooled_features_at_any_batch_size(tmp_path, name):
    run = make_run(tmp_path / "run", *METHODS[name])
    assert main(["export", str(run), "--to", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    cfg = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert cfg["checked"]["max_abs_diff"] <= 1e-4
    enc = imagelm.load(run)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = enc.preprocess(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8))
        got = session.run(None, {"pixels": x.numpy()})[0]
        with torch.inference_mode():
            assert got.shape == (n, 32) and np.abs(got - enc(x).numpy()).max() <= 1e-4
