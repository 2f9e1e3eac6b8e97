import json
import math
import random

import torch

from conftest import needs_fmnist, tiny_cfg
from imagelm.cli import main
from imagelm.data import sources
from imagelm.data.transforms import normalize
from imagelm.methods import build_method
from imagelm.methods.beit import block_mask
from imagelm.tokenizers import visual
from imagelm.train import Trainer


def test_block_masks_reach_the_ratio_with_rectangles_inside_the_grid():
    rng = random.Random(0)
    for grid, count, min_block in ((14, 78, 16), (7, 20, 4), (4, 6, 1)):
        for _ in range(20):
            m = block_mask(grid, count, min_block, 0.3, rng)
            assert m.shape == (grid * grid,) and int(m.sum()) == count
    # one rectangle: with a budget equal to one block's area the mask is a single filled box
    m = block_mask(8, 16, 16, 1.0, random.Random(1)).view(8, 8)
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    box = m[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all() and int(m.sum()) == 16


def test_beit_masks_exact_counts_and_loss_only_on_masked_positions(tmp_path):
    cfg = tiny_cfg("method=beit", "beit.vocab=16", "beit.tokenizer_kind=kmeans")
    beit = build_method(cfg)
    data = sources.load(cfg.data, cfg.model, "train")
    beit.prepare(data, tmp_path, log=lambda *a: None)
    assert (tmp_path / "tokenizer" / "tokenizer.yaml").exists()
    noise = torch.rand(4, beit.noise_dim)
    for masking in ("block", "random"):
        beit.cfg.masking = masking
        assert (beit.mask(noise).sum(1) == round(0.4 * 16)).all()
    beit.cfg.masking = "block"
    images = normalize(data.images[:4], data.mean, data.std)
    mask = beit.mask(noise)
    z = beit.encode(images, mask)
    images2 = images.clone()
    images2[..., :2, :2] += 5 * (mask.view(4, 4, 4)[:, 0, 0] > 0).float().view(4, 1, 1, 1)   # hidden patch 0
    z2 = beit.encode(images2, mask)
    hidden0 = mask[:, 0].bool()
    assert torch.allclose(z[hidden0], z2[hidden0])           # a masked patch's pixels never enter
    seen = []
    loss = beit.loss
    beit.loss = lambda logits, codes: seen.append((logits, codes)) or loss(logits, codes)
    out = beit({"image": images, "noise": noise})
    logits, codes = seen[0]         # one row per masked patch, its target the tokenizer's code there
    assert len(codes) == mask.sum() and torch.equal(codes, beit.tokenizer.encode(images)[mask.bool()])
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(logits.float(), codes))
    out.loss.backward()
    assert torch.isfinite(out.loss) and beit.mask_token.grad is not None
    assert all(p.grad is None for p in beit.tokenizer.parameters())


def test_kmeans_and_vq_tokenizers_roundtrip_and_reconstruct():
    data = sources.synthetic(256, 8, 1)
    x = normalize(data.images, [0.3], [0.3])
    for kind in ("kmeans", "vq"):
        cfg = visual.TokenizerConfig(kind=kind, vocab=32, patch_size=2, in_chans=1, steps=150, batch_size=32)
        tok = visual.train_tokenizer(cfg, x, log=lambda *a: None)
        codes = tok.encode(x[:5])
        assert codes.shape == (5, 16) and codes.max() < 32
        assert tok.decode(codes).shape == (5, 16, 4)
        stats = visual.tokenizer_stats(tok, x)
        assert stats["recon_mse"] < 0.5 * tok.patches(x).var().item()
        assert stats["codebook_usage"] > 0.5


def test_save_load_tokenizer_is_versioned(tmp_path):
    tok = visual.VisualTokenizer(visual.TokenizerConfig(vocab=8, patch_size=2, in_chans=1))
    tok.codebook.normal_()
    visual.save_tokenizer(tok, tmp_path / "t", {"codebook_usage": 1.0})
    back = visual.load_tokenizer(tmp_path / "t")
    assert torch.equal(back.codebook, tok.codebook) and back.cfg == tok.cfg
    meta = (tmp_path / "t" / "tokenizer.yaml").read_text()
    (tmp_path / "t" / "tokenizer.yaml").write_text(meta.replace("format_version: 1", "format_version: 99"))
    import pytest
    with pytest.raises(ValueError, match="format 99"):
        visual.load_tokenizer(tmp_path / "t")


@needs_fmnist
def test_vq_reconstruction_loss_falls_on_fashion_mnist(tmp_path, capsys):
    assert main(["tokenizer", "train", "tokenizer.vocab=64", "tokenizer.steps=201", "--out", str(tmp_path / "t"),
                 "--json"]) == 0
    cap = capsys.readouterr()
    stats = json.loads(cap.out)
    assert stats["codebook_usage"] > 0.5 and stats["recon_mse"] < 0.5
    losses = [float(line.split("loss ")[1]) for line in cap.err.splitlines() if "loss" in line]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert visual.load_tokenizer(tmp_path / "t").cfg.vocab == 64


def test_beit_and_aim_token_ce_train(tmp_path):
    for name, o in (("beit", ("method=beit",)), ("aim", ("aim.loss=token_ce",))):
        cfg = tiny_cfg(*o, f"{name}.vocab=16", f"{name}.tokenizer_kind=kmeans", "train.steps=2")
        Trainer(cfg, tmp_path / name, progress=False).fit()
        assert (tmp_path / name / "tokenizer" / "tokenizer.yaml").exists()
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        assert abs(first - math.log(16)) < 1.0, (name, first)    # cross-entropy over 16 codes, near ln 16 at init


def test_tokenizer_on_raw_patches_tells_flat_background_from_flat_fill(tmp_path):
    """Per-patch normalisation maps every flat patch (background or a garment's uniform fill) to the
    same vector, so its codes cannot tell them apart; on raw patches (BEiT's dVAE) they differ.
    A saved tokenizer whose normalisation differs from the config's is refused."""
    cfg = tiny_cfg("method=beit", "beit.vocab=8", "beit.tokenizer_kind=kmeans")
    data = sources.load(cfg.data, cfg.model, "train")
    flat = torch.full((2, 1, 8, 8), -1.0)
    flat[1] = 1.0                                            # a dark and a bright flat image
    codes = {}
    for norm_pix in (True, False):
        cfg.objective.tokenizer_norm_pix = norm_pix
        beit = build_method(cfg)
        assert beit.tokenizer.cfg.norm_pix is norm_pix
        beit.prepare(data, tmp_path / str(norm_pix), log=lambda *a: None)
        codes[norm_pix] = beit.tokenizer.encode(flat)
    assert (codes[True][0] == codes[True][1]).all()
    assert (codes[False][0] != codes[False][1]).all()
    cfg.objective.tokenizer = str(tmp_path / "True" / "tokenizer")   # saved with norm_pix on
    import pytest
    with pytest.raises(ValueError, match="norm_pix True"):
        build_method(cfg).prepare(data, tmp_path / "x", log=lambda *a: None)


def test_tokenizer_context_codes_a_window_centred_on_each_patch():
    """With context=c each code stands for the (2c+1)p-pixel window around its patch: the window's
    centre is the patch itself, and a change just outside a patch moves that patch's window."""
    x = torch.randn(2, 1, 8, 8)
    local = visual.VisualTokenizer(visual.TokenizerConfig(vocab=4, patch_size=2, in_chans=1, norm_pix=False))
    wide = visual.VisualTokenizer(visual.TokenizerConfig(vocab=4, patch_size=2, in_chans=1, norm_pix=False, context=1))
    w = wide.patches(x)
    assert w.shape == (2, 16, 36) == (2, local.patches(x).shape[1], wide.in_dim)
    assert torch.equal(w.view(2, 16, 6, 6)[:, :, 2:4, 2:4].reshape(2, 16, 4), local.patches(x))
    y = x.clone()
    y[:, :, 2, 2] += 1                           # a pixel of patch (1, 1), next to patch (0, 0)
    assert torch.equal(local.patches(y)[:, 0], local.patches(x)[:, 0])
    assert not torch.equal(wide.patches(y)[:, 0], w[:, 0])
    tok = visual.train_tokenizer(visual.TokenizerConfig(vocab=8, patch_size=2, in_chans=1, context=1, steps=20,
                                                        batch_size=8), x.repeat(8, 1, 1, 1), log=lambda *a: None)
    assert tok.encode(x).shape == (2, 16) and tok.decode(tok.encode(x)).shape == (2, 16, 36)


def test_codes_are_the_nearest_codeword_and_the_same_under_bf16_autocast():
    """BEiT computes its targets inside the training step's bf16 autocast: they must still be the
    exact nearest codes, the ones the tokenizer was trained and measured with."""
    torch.manual_seed(0)
    tok = visual.VisualTokenizer(visual.TokenizerConfig(vocab=1024, patch_size=4, in_chans=1, context=1))
    tok.codebook.normal_()
    z = torch.randn(4096, tok.cfg.dim)
    assert torch.equal(tok.quantize(z), torch.cdist(z.double(), tok.codebook.double()).argmin(1))
    images = torch.randn(64, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = tok.encode(images)
    assert torch.equal(under_amp, tok.encode(images))
