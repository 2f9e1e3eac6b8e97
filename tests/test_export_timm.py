"""timm parity: a run exported with `imagelm export --to timm` loads in timm and gives the features
imagelm gives, pooled and per block. timm needs torchvision (torch 2.14.1 here): these tests run in
.venv-peers (`make peers`; `make test` runs them there) and skip where timm is absent."""
import json

import pytest
import torch

import imagelm
from imagelm.cli import main
from runs import METHODS, make_run

timm = pytest.importorskip("timm", reason="timm is a peer dependency: run in .venv-peers (make peers)")
pytestmark = pytest.mark.timm


@pytest.mark.parametrize("name", [m for m in METHODS])
def test_timm_export_gives_imagelms_features_at_every_layer(tmp_path, name):
    run = make_run(tmp_path / "run", *METHODS[name])
    out = tmp_path / "timm"
    assert main(["export", str(run), "--to", "timm", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    enc = imagelm.load(run)
    # the call the issue and README give, and timm's own loader for a local folder in the hub layout
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **cfg["model_args"])
    local = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    overlay = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, **cfg["model_args"],
                                pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors")))
    for m in (local, overlay):     # the preprocessing travels: timm.data.resolve_data_config reads these
        assert m.pretrained_cfg["mean"] == enc.config["mean"] and m.pretrained_cfg["std"] == enc.config["std"]
    assert cfg["num_features"] == model.num_features == enc.num_features
    m = enc.run_config.model
    x = torch.randn(4, m.in_chans, m.img_size, m.img_size, generator=torch.Generator().manual_seed(0))   # standardised
    with torch.inference_mode():
        ours = enc(x)
        for tm in (model.eval(), local.eval(), overlay.eval()):
            assert (tm(x) - ours).abs().max() <= 1e-4
        layers = list(range(1, enc.num_layers + 1))
        inter = model.forward_intermediates(x, indices=[l - 1 for l in layers], output_fmt="NLC",
                                            intermediates_only=True)
        assert len(inter) == enc.num_layers
        for got, want in zip(inter, enc.features(x, layers)):
            assert (got - want).abs().max() <= 1e-4
    if name == "beit3":
        assert any("Multiway" in s for s in cfg["imagelm"]["left_out"])
