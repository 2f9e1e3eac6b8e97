"""The MAE peer: lightly's MAE (its documented example: MaskedVisionTransformerTIMM + MAEDecoderTIMM,
torchvision transforms, a DataLoader) on the same ViT shape and Fashion-MNIST, trained for the same
wall time as `imagelm pretrain mae-tiny --minutes N`, then probed by imagelm's own probes.

Run in the peers venv (lightly needs torchvision):  make peers
    .venv-peers/bin/python benchmarks/mae_vs_lightly.py --minutes 10 --out runs/lightly-mae
    .venv-peers/bin/imagelm compare runs/mae-tiny runs/lightly-mae runs/aim-tiny
`--probe-only` probes the ViT an earlier run saved (RUN/vit.safetensors) again, without training.
It prints end-to-end images/s (data pipeline included) for lightly and, read from the imagelm run's
metrics.jsonl, for imagelm, and writes RUN/eval/probes.json like `imagelm eval`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from imagelm import config, dist
from imagelm.data import sources
from imagelm.eval import parse_layers, rows_table, run_probes
from imagelm.eval.features import extract
from imagelm.eval.probe import split_train


class LightlyMAE(nn.Module):
    """lightly's MAE example, with imagelm's mae-tiny decoder size and mask ratio."""

    def __init__(self, vit, decoder_dim: int, decoder_depth: int, decoder_heads: int, mask_ratio: float):
        super().__init__()
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        self.mask_ratio, self.patch_size = mask_ratio, vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=self.patch_size,
                                      in_chans=vit.patch_embed.proj.in_channels, embed_dim=vit.embed_dim,
                                      decoder_embed_dim=decoder_dim, decoder_depth=decoder_depth,
                                      decoder_num_heads=decoder_heads)

    def forward(self, images):
        from lightly.models import utils

        B = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask((B, self.sequence_length), self.mask_ratio, device=images.device)
        x = self.backbone.encode(images=images, idx_keep=idx_keep)
        x = self.decoder.embed(x)
        full = utils.repeat_token(self.decoder.mask_token, (B, self.sequence_length))
        full = utils.set_at_index(full, idx_keep, x.type_as(full))
        pred = self.decoder.predict(utils.get_at_index(self.decoder.decode(full), idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return nn.functional.mse_loss(pred, target)


class TimmFeatures(nn.Module):
    """imagelm's encoder API over a timm ViT: features(images, layers) -> per-layer patch tokens
    (layer i = output of block i, class token dropped)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def features(self, images, layers):
        outs = self.vit.forward_intermediates(images, indices=[l - 1 for l in layers], output_fmt="NLC",
                                              intermediates_only=True)
        return [o[:, self.vit.num_prefix_tokens:] if o.shape[1] > self.vit.patch_embed.num_patches else o
                for o in outs]


def main() -> None:
    import torchvision.transforms as T
    from timm.models.vision_transformer import VisionTransformer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--out", default="runs/lightly-mae")
    ap.add_argument("--ours", default="runs/mae-tiny", help="the imagelm mae-tiny run to compare throughput with")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--probe-only", action="store_true", help="probe OUT/vit.safetensors again; no training")
    args = ap.parse_args()
    cfg = config.load("mae-tiny")
    m, o, t = cfg.model, cfg.objective, cfg.train
    train = sources.load(cfg.data, m, "train")
    test = sources.load(cfg.data, m, "test", train)

    transform = T.Compose([T.RandomResizedCrop(m.img_size, scale=cfg.data.crop_scale), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(train.mean, train.std)])

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            from PIL import Image
            return transform(Image.fromarray(train.images[i, 0].numpy()))

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, num_classes=0,
                            embed_dim=m.dim, depth=m.depth, num_heads=m.heads)
    model = LightlyMAE(vit, o.decoder_dim, o.decoder_depth, o.decoder_heads, o.mask_ratio)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    loader = torch.utils.data.DataLoader(Data(), batch_size=t.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    out = Path(args.out)
    if args.probe_only:   # keep the measured throughput of the run that trained it
        vit.load_state_dict(load_file(str(out / "vit.safetensors")))
        lightly_ips = json.loads((out / "eval" / "probes.json").read_text())["img_per_s_end_to_end"]
    deadline, t0, images, step = time.time() + 60 * args.minutes, time.time(), 0, 0
    while not args.probe_only and time.time() < deadline:
        for x in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            images, step = images + len(x), step + 1
            if step % 50 == 0:
                print(f"step {step} loss {loss.item():.4f} {images / (time.time() - t0):.0f} img/s", flush=True)
            if time.time() >= deadline:
                break
    if not args.probe_only:
        lightly_ips = images / (time.time() - t0)
        (out / "eval").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out / "vit.safetensors"))

    enc = TimmFeatures(vit)
    layers = parse_layers("all", m.depth)[1:]
    tok = parse_layers(cfg.eval.attentive_layers, m.depth)
    bf16 = dist.bf16_supported(torch.device("cpu"))
    f_train, f_test = (extract(enc, d, layers, tok, cfg.eval.batch_size, bf16) for d in (train, test))
    split = split_train(train.labels, cfg.eval.val_size, cfg.eval.seed)     # as `imagelm eval` splits
    res = run_probes(f_train, train.labels, split, len(train.classes), ("linear", "attentive", "knn"), cfg.eval,
                     (f_test, test.labels), tok, bf16=bf16)
    res["img_per_s_end_to_end"] = lightly_ips
    (out / "eval" / "probes.json").write_text(json.dumps(res, indent=2))
    ours = [json.loads(line) for line in (Path(args.ours) / "metrics.jsonl").read_text().splitlines()]
    ours_ips = ours[-1]["step"] * t.batch_size / ours[-1]["time"]
    print(rows_table([("lightly-mae", res)]))
    print(f"end-to-end images/s: lightly {lightly_ips:.0f}, imagelm {ours_ips:.0f} ({ours_ips / lightly_ips:.2f}x)"
          + ("" if args.probe_only else f"; lightly ran {images / len(train):.2f} epochs"))


if __name__ == "__main__":
    main()
