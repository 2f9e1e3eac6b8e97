import torch

from conftest import tiny_cfg
from imagelm.cli import main
from imagelm.methods import build_method
from imagelm.methods.mae import random_masking
from imagelm.nn.embed import patchify
from imagelm.train import Trainer


def mae_cfg(*o):
    return tiny_cfg("method=mae", "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2", *o)


def test_masking_keeps_exactly_the_count_and_the_inverse_restores_order():
    noise = torch.rand(5, 16)
    ids_keep, ids_restore, mask = random_masking(noise, 4)
    assert (mask.sum(1) == 12).all()
    x = torch.arange(16).expand(5, -1)
    shuffled = x.gather(1, noise.argsort(1))
    assert torch.equal(shuffled.gather(1, ids_restore), x)
    kept = torch.zeros(5, 16).scatter_(1, ids_keep, 1.0)
    assert torch.equal(kept, 1 - mask)                       # mask is in patch order
    assert torch.equal(ids_keep, noise.argsort(1)[:, :4])    # the lowest-noise patches are kept


def test_encoder_never_sees_masked_patches():
    mae = build_method(mae_cfg()).eval()
    images, noise = torch.randn(2, 1, 8, 8), torch.rand(2, 16)
    ids_keep, _, mask = mae.mask(noise)
    z = mae.encode(images, ids_keep, mask)
    assert z.shape == (2, 4, 32)                             # 25% of 16 patches
    p = patchify(images, 2)
    p2 = torch.where(mask[..., None].bool(), torch.randn_like(p) * 9, p)
    images2 = p2.view(2, 4, 4, 2, 2, 1).permute(0, 5, 1, 3, 2, 4).reshape(2, 1, 8, 8)
    assert torch.equal(patchify(images2, 2)[~mask.bool()], p[~mask.bool()])
    assert torch.allclose(mae.encode(images2, ids_keep, mask), z)


def test_loss_only_on_masked_patches():
    mae = build_method(mae_cfg())
    pred, target = torch.randn(2, 16, 4), torch.randn(2, 16, 4)
    mask = torch.zeros(2, 16)
    mask[:, 5:] = 1
    base = mae.loss(pred, target, mask)
    p2 = pred.clone()
    p2[:, :5] += 100
    assert torch.allclose(mae.loss(p2, target, mask), base)
    p2[:, 7] = target[:, 7] + 10                  # far from its target: a masked patch's error counts
    assert mae.loss(p2, target, mask) > base


def test_forward_backward_both_encoders():
    for o in ("mae.encode_mask_tokens=false", "mae.encode_mask_tokens=true", "mae.norm_pix=false"):
        mae = build_method(mae_cfg(o))
        out = mae({"image": torch.randn(3, 1, 8, 8), "noise": torch.rand(3, mae.noise_dim)})
        out.loss.backward()
        assert torch.isfinite(out.loss) and mae.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_mae_trains_and_draws_reconstructions(tmp_path):
    Trainer(mae_cfg("train.steps=3"), tmp_path / "run", progress=False).fit()
    assert main(["sample", str(tmp_path / "run"), "--reconstruct", "--n", "4", "--out", str(tmp_path / "g.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size[0] > Image.open(tmp_path / "g.png").size[1] / 2
