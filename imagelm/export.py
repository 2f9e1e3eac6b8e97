"""`imagelm export RUN --to timm|hf --out DIR`: a run's encoder in the layouts other tools load.

timm: model.safetensors + config.json in timm's hub layout; the encoder as a timm
VisionTransformer with no class token, learned (here: the sin-cos values) positions, average
pooling and no final norm, so `model(x)` is what `imagelm.load(RUN)(x)` gives (the last block's
tokens, mean-pooled) and `forward_intermediates` returns the blocks' outputs `features` returns.
hf: the Hugging Face layout (config.json, model.safetensors, README.md model card), loadable
offline with `imagelm.load(DIR)` or `imagelm.api.Encoder.from_pretrained(DIR)`.
onnx: model.onnx (standardised pixels -> pooled features, any batch size) for serving, checked
against the encoder with onnxruntime when it is installed.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagelm import api
from imagelm.config import ConfigError
from imagelm.methods import METHODS, EmbedsImageText
from imagelm.nn.vit import ViT

# any registered timm VisionTransformer entry point: every shape argument is overridden by model_args
TIMM_ARCHITECTURE = "vit_base_patch16_224"
TIMM_EPS = 1e-6      # timm's ViT LayerNorm eps (not a model argument)


def timm_model_args(enc: api.Encoder) -> dict:
    m = enc.run_config.model
    return {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans, "embed_dim": m.dim,
            "depth": m.depth, "num_heads": m.heads, "mlp_ratio": m.mlp_ratio, "qkv_bias": m.bias,
            "proj_bias": m.bias, "class_token": False, "global_pool": "avg", "fc_norm": False,
            "final_norm": False}


def timm_state_dict(vit: ViT) -> dict[str, torch.Tensor]:
    """imagelm ViT weights under timm's names. The patch embedding is a linear map of (p, p, C)
    patches, timm's a stride-p conv: the same weights as (D, C, p, p). Where imagelm has no bias
    (bias=False), norms get zero biases (the same function); the final norm is left out (timm
    final_norm=False), as the features are read before it."""
    p, C, D = vit.cfg.patch_size, vit.cfg.in_chans, vit.cfg.dim
    pe = vit.patch_embed.proj
    sd = {"patch_embed.proj.weight": pe.weight.reshape(D, p, p, C).permute(0, 3, 1, 2),
          "patch_embed.proj.bias": pe.bias, "pos_embed": vit.pos_embed[None]}

    def norm(name, ln):
        sd[f"{name}.weight"] = ln.weight
        sd[f"{name}.bias"] = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)

    def linear(name, lin):
        sd[f"{name}.weight"] = lin.weight
        if lin.bias is not None:
            sd[f"{name}.bias"] = lin.bias

    for i, blk in enumerate(vit.transformer.blocks):
        b = f"blocks.{i}"
        norm(f"{b}.norm1", blk.norm1)
        linear(f"{b}.attn.qkv", blk.attn.qkv)
        linear(f"{b}.attn.proj", blk.attn.proj)
        norm(f"{b}.norm2", blk.norm2)                # the vision expert of a Multiway block
        linear(f"{b}.mlp.fc1", blk.mlp.fc1)
        linear(f"{b}.mlp.fc2", blk.mlp.fc2)
    return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}


def left_out(enc: api.Encoder) -> list[str]:
    """What of the run the exported vision encoder does not carry."""
    note = METHODS[enc.method_name].export_leaves_out
    return ["the final LayerNorm (features are read before it, as imagelm eval reads them)"] + ([note] if note else [])


def to_timm(enc: api.Encoder, out: Path, run: Path) -> dict:
    if not isinstance(enc.encoder, ViT):
        raise ConfigError(f"a {enc.method_name} encoder is not a ViT (iGPT is a GPT over palette pixels, with no "
                          f"patch embedding): timm has no model for it; export it with --to hf")
    if enc.run_config.model.norm_eps != TIMM_EPS:
        raise ConfigError(f"model.norm_eps={enc.run_config.model.norm_eps}: timm's ViT fixes LayerNorm eps at "
                          f"{TIMM_EPS}; export with --to hf")
    m = enc.run_config.model
    args = timm_model_args(enc)
    cfg = {"architecture": TIMM_ARCHITECTURE, "num_classes": 0, "num_features": m.dim, "global_pool": "avg",
           "model_args": args,
           "pretrained_cfg": {"tag": f"imagelm_{enc.method_name}", "custom_load": False,
                              "input_size": [m.in_chans, m.img_size, m.img_size], "fixed_input_size": True,
                              "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                              "mean": list(enc.config["mean"]), "std": list(enc.config["std"]), "num_classes": 0,
                              "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
                              "license": "unknown"},
           "imagelm": {"method": enc.method_name, "source": enc.config.get("source", {}),
                       "pooling": "mean of the last block's tokens, before the final norm (timm: global_pool=avg, "
                                  "final_norm=False, fc_norm=False)",
                       "left_out": left_out(enc)}}
    out.mkdir(parents=True, exist_ok=True)
    save_file(timm_state_dict(enc.encoder), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "README.md").write_text(model_card(enc, "timm", run))
    return cfg


def to_hf(enc: api.Encoder, out: Path, run: Path) -> None:
    enc.save_pretrained(out)
    (out / "README.md").write_text(model_card(enc, "hf", run))


def to_onnx(enc: api.Encoder, out: Path, run: Path) -> dict:
    """The image path as ONNX: `pixels` (B, C, S, S) standardised -> `features` (B, D), traced
    (TorchScript exporter, opset 17); then run once with onnxruntime against the encoder."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ConfigError("--to onnx needs the onnx package: pip install 'imagelm[onnx]'") from None
    m = enc.run_config.model
    x = torch.randn(2, m.in_chans, m.img_size, m.img_size, generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():     # the tracer's notes on shape arithmetic: shapes are fixed but the batch
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, (x,), str(out / "model.onnx"), dynamo=False, opset_version=17,
                          input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}})
    cfg = {"format": "imagelm-onnx", "method": enc.method_name, "input": "pixels", "output": "features",
           "input_size": [m.in_chans, m.img_size, m.img_size], "mean": enc.config["mean"], "std": enc.config["std"],
           "num_features": enc.num_features, "source": enc.config.get("source", {})}
    try:
        import onnxruntime as ort
    except ImportError:
        cfg["checked"] = None
    else:
        xb = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))
        got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"pixels": xb.numpy()})[0]
        with torch.inference_mode():
            diff = (torch.from_numpy(got) - enc(xb)).abs().max().item()
        cfg["checked"] = {"onnxruntime": ort.__version__, "max_abs_diff": diff}
        if diff > 1e-4:
            raise RuntimeError(f"onnxruntime's features differ from the encoder's by {diff:.2e} (> 1e-4)")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "README.md").write_text(model_card(enc, "onnx", run))
    return cfg


def is_export(folder: Path) -> bool:
    """Written by `imagelm export` (any format)?"""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("format") in (api.FORMAT, "imagelm-onnx") or "imagelm" in cfg)


def export(run: str | Path, to: str, out: str | Path) -> Path:
    run, out = Path(run), Path(out)
    if out.resolve() == run.resolve():
        raise FileExistsError(f"--out {out} is the run itself: choose another folder")
    enc = api.load(run)
    if out.exists() and any(out.iterdir()):
        if not is_export(out):
            raise FileExistsError(f"{out} exists and holds something other than an imagelm export: choose another")
        shutil.rmtree(out)      # an earlier export: replaced
    if to == "timm":
        to_timm(enc, out, run)
    elif to == "hf":
        to_hf(enc, out, run)
    elif to == "onnx":
        to_onnx(enc, out, run)
    else:
        raise ConfigError(f"unknown export format {to!r}: choose timm, hf or onnx")
    return out


# --- the model card ---------------------------------------------------------------------------
RESULT_ROWS = [("linear probe", "linear"), ("attentive probe", "attentive"), ("k-NN", "knn"),
               ("fine-tune", "finetune"), ("zero-shot", "zero_shot")]


def eval_figures(run: Path, checkpoint: str, dataset: str) -> str:
    path = run / "eval" / "probes.json"
    if not path.exists():
        return "Not evaluated yet (`imagelm eval RUN` writes RUN/eval/probes.json).\n"
    r = json.loads(path.read_text())
    rows = []
    for title, key in RESULT_ROWS:
        if isinstance(r.get(key), dict) and "acc" in r[key]:
            where = f" (layer {r[key]['layer']})" if "layer" in r[key] else ""
            rows.append(f"| {title}{where} | {100 * r[key]['acc']:.2f}% |")
    for base in ("random_init", "raw_pixels"):
        if isinstance(r.get(base), dict) and "linear" in r[base]:
            rows.append(f"| baseline {base.replace('_', ' ')}, linear probe | {100 * r[base]['linear']['acc']:.2f}% |")
    if "retrieval" in r:
        ret = r["retrieval"]
        rows.append(f"| retrieval image->text R@1 ({ret['n']} scenes) | {100 * ret['i2t_r1']:.2f}% |")
    note = ""
    if Path(r.get("checkpoint", "")).name != checkpoint:
        note = f"\nThese figures are of checkpoint {Path(r.get('checkpoint', '?')).name}, not the exported one.\n"
    data = r.get("eval_config", {}).get("dataset") or dataset
    return f"Probed on {data} test images (`imagelm eval`):\n\n| evaluation | accuracy |\n|---|---|\n" + \
        "\n".join(rows) + "\n" + note


def model_card(enc: api.Encoder, kind: str, run: Path) -> str:
    cfg, m = enc.run_config, enc.run_config.model
    src = enc.config.get("source", {})
    step = src.get("checkpoint", "?").removeprefix("step_").lstrip("0") or "0"
    params = sum(p.numel() for p in enc.encoder.parameters())
    if kind == "timm":
        usage = f"""```python
import json, timm
cfg = json.load(open("DIR/config.json"))
model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="DIR/model.safetensors"),
                          **cfg["model_args"])
features = model(x)                      # (B, {m.dim}), x standardised with pretrained_cfg mean/std
# or: timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)
```

Left out of this export: {'; '.join(left_out(enc))}.
"""
    elif kind == "onnx":
        usage = f"""```python
import onnxruntime as ort
session = ort.InferenceSession("DIR/model.onnx")
features = session.run(None, {{"pixels": x}})[0]   # (B, {m.dim})
# x: float32 (B, {m.in_chans}, {m.img_size}, {m.img_size}), standardised with the mean and std above
```
"""
    else:
        usage = """```python
import imagelm
enc = imagelm.load("DIR")                # or imagelm.api.Encoder.from_pretrained("DIR")
features = enc(enc.preprocess(images))   # images: uint8 or [0, 1] float (B, C, H, W), or PIL
```
"""
        if isinstance(enc.model, EmbedsImageText):
            usage += "\nWith the text tower: `enc.encode_text([\"a sneaker\"])`, `enc.zero_shot(images, names)`.\n"
        elif enc.has_text:
            usage += "\nWith the language path: `enc.encode_text([\"a sneaker\"])` (no space shared with images).\n"
    return f"""---
library_name: {"imagelm" if kind == "hf" else kind}
tags: [image-feature-extraction, imagelm, {cfg.method}]
---
# {cfg.method} encoder ({m.dim}-wide, {m.depth} blocks, patch {m.patch_size}, {m.img_size} px)

Pretrained with imagelm's `{cfg.method}` method on `{cfg.data.dataset}` for {step} steps
(global batch {cfg.train.batch_size}); exported from run `{src.get("run", "?")}`,
checkpoint `{src.get("checkpoint", "?")}`.
{params / 1e6:.2f} M parameters in the image encoder. Inputs: {m.in_chans}-channel {m.img_size} x {m.img_size} images,
standardised per channel with the training data's mean {enc.config["mean"]} and std {enc.config["std"]}.
Output: the last block's patch tokens, mean-pooled ({m.dim} features), as imagelm's probes read them.

## Use
{usage}
## Evaluation
{eval_figures(run, src.get("checkpoint", ""), cfg.data.dataset)}
"""
