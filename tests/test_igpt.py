import torch
import torch.nn.functional as F

from conftest import needs_fmnist, tiny_cfg
from imagelm.methods import build_method
from imagelm.nn.gpt import TokenTransformer, generate
from imagelm.tokenizers.palette import Palette
from imagelm.train import Trainer


def igpt(*overrides):
    torch.manual_seed(0)
    cfg = tiny_cfg("method=igpt", "igpt.palette=8", "igpt.resolution=8", *overrides)
    m = build_method(cfg)
    m.encoder.palette.colours.copy_(torch.linspace(-1, 1, 8)[:, None])
    return m


def test_palette_roundtrip_and_nearest_colour():
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([-1.0, -0.2, 0.5, 2.0])
    images = levels[torch.randint(0, 4, (64, 1, 8, 8), generator=g)]
    pal = Palette(4, 1, 8).fit(images)
    assert torch.allclose(pal.dequantize(pal.quantize(images)), images, atol=1e-6)   # palette colours come back
    assert pal.usage(pal.quantize(images)) == 1.0
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = pal.quantize(x)
    err = (pal.colours[t].squeeze(-1) - x.flatten(1)).abs()
    best = (pal.colours.view(1, 1, -1) - x.flatten(1)[..., None]).abs().min(-1).values
    assert torch.allclose(err, best)
    rgb = Palette(16, 3, 4).fit(torch.rand(32, 3, 8, 8))                 # colour, area-downsampled 8 -> 4
    assert rgb.quantize(torch.rand(2, 3, 8, 8)).shape == (2, 16)
    assert rgb.dequantize(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 3, 4, 4)


def test_quantisation_is_exact_under_bf16_autocast():
    pal = Palette(64, 1, 8).fit(torch.randn(64, 1, 8, 8))
    x = torch.randn(16, 1, 8, 8)
    want = (x.flatten(1)[..., None] - pal.colours[:, 0]).abs().argmin(-1)     # nearest colour, fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(pal.quantize(x), want)


def test_changing_pixel_t_changes_no_logit_before_t():
    m = igpt().eval()
    gpt = m.encoder.gpt
    tokens = torch.randint(0, 8, (2, 64))
    t = 30
    other = tokens.clone()
    other[:, t] = (other[:, t] + 3) % 8
    a, b = gpt.logits(tokens), gpt.logits(other)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)


def test_kv_cache_logits_and_samples_equal_full_recompute():
    torch.manual_seed(0)
    gpt = TokenTransformer(9, 40, 32, 2, 2, out=8).eval()
    tokens = torch.randint(0, 8, (3, 40))
    full = gpt.logits(tokens)
    cache = gpt.transformer.new_cache(3, 40)
    with torch.no_grad():
        parts = [gpt.head(gpt(gpt.embed(tokens[:, :15]), cache=cache))]          # prefill
        for i in range(15, 40):                                                 # one token at a time
            parts.append(gpt.head(gpt(gpt.embed(tokens[:, i:i + 1], start=i), cache=cache)))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    a = generate(gpt, tokens[:, :10], 30, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(gpt, tokens[:, :10], 30, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1),
                 use_cache=False)
    assert torch.equal(a, b) and torch.equal(a[:, :10], tokens[:, :10])


def test_bert_zeroes_embeddings_only_at_masked_positions_and_scores_only_them():
    m = igpt("igpt.objective=bert")
    images = torch.randn(4, 1, 8, 8)
    noise = torch.rand(4, m.noise_dim)
    mask = m.mask(noise)
    assert (mask.sum(1) == round(0.15 * 64)).all()
    tokens = m.encoder.tokens(images)
    plain, masked = m.embed(tokens, None), m.embed(tokens, mask)
    where = F.pad(mask, (1, 0))                                  # the SOS slot is never masked
    pos = m.encoder.gpt.pos_embed[:65].expand(4, -1, -1)
    assert torch.allclose(masked[where], pos[where]) and torch.equal(masked[~where], plain[~where])
    gpt = m.encoder.gpt
    logits = gpt.head(gpt(masked))[:, 1:]
    target = tokens[:, 1:]
    want = F.cross_entropy(logits[mask], target[mask])
    loss = m({"image": images, "noise": noise}).loss
    assert torch.allclose(loss, want, atol=1e-5)
    assert not torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 8), target.reshape(-1)), atol=1e-3)


def test_features_api_and_completion_keeps_the_top_rows():
    m = igpt().eval()
    x = torch.randn(2, 1, 8, 8)
    feats = m.encoder.features(x, [0, 1, 2])
    assert [f.shape for f in feats] == [(2, 64, 32)] * 3         # AR: SOS, x_1..x_{N-1}
    # iGPT's features are layer-normed per token (n^l = layer_norm(h^l)): at init (unit LN
    # weights) each token has mean 0 and variance 1, and scaling the embeddings changes nothing
    for f in feats:
        assert torch.allclose(f.mean(-1), torch.zeros(2, 64), atol=1e-4)
        assert torch.allclose(f.var(-1, unbiased=False), torch.ones(2, 64), atol=1e-2)
    gpt = m.encoder.gpt
    with torch.no_grad():
        gpt.tok_embed.weight.mul_(10)
        gpt.pos_embed.mul_(10)
    assert torch.allclose(m.encoder.features(x, [0])[0], feats[0], atol=1e-2)      # up to LN eps
    out = m.complete(x, keep_rows=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8)
    kept = m.encoder.palette.dequantize(m.encoder.palette.quantize(x))
    assert torch.equal(out[:, :, :4], kept[:, :, :4])


@needs_fmnist
def test_igpt_loss_falls_on_fashion_mnist(tmp_path):
    cfg = tiny_cfg("method=igpt", "igpt.palette=8", "igpt.resolution=7", "data.dataset=fashion-mnist",
                   "model.img_size=28", "model.patch_size=4", "train.steps=40", "train.batch_size=32",
                   "train.lr=3e-3", "train.warmup=0.1", "train.ckpt_every=100")
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.fit()
    import json
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0], losses


def test_sample_complete_writes_a_grid_and_other_methods_get_a_clear_error(tmp_path, capsys):
    from imagelm.cli import main

    cfg = tiny_cfg("method=igpt", "igpt.palette=8", "igpt.resolution=8", "train.steps=3")
    Trainer(cfg, tmp_path / "igpt", progress=False).fit()
    out = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path / "igpt"), "--complete", "top-half", "--n", "3", "--samples", "2",
                 "--top-k", "4", "--out", str(out)]) == 0
    from PIL import Image
    with Image.open(out) as im:
        w, h = im.size
    assert h > w / 4 * 3 * 0.9           # 3 rows, 4 columns of equal squares
    Trainer(tiny_cfg("train.steps=2"), tmp_path / "aim", progress=False).fit()
    assert main(["sample", str(tmp_path / "aim"), "--complete", "top-half"]) == 2
    err = capsys.readouterr().err    # the missing capability, and who has it
    assert "samples image completions" in err and "igpt" in err


def test_bench_reports_kv_cache_speedup_and_sequence_growth():
    cfg = tiny_cfg("method=igpt", "igpt.palette=8", "igpt.resolution=8")
    from imagelm.bench import profile_step
    res = build_method(cfg).benchmarks(cfg, torch.device("cpu"), profile_step)
    assert res["kv_cache_identical"] and res["kv_cache_speedup"] > 0    # the speed itself: `imagelm bench`
    assert res["step_s_784"] > 0 and res["step_s_196"] > 0              # times: too noisy to compare in a test
    assert res["peak_mem_mb_784"] > res["peak_mem_mb_196"] > 0          # 4x the tokens hold more activations
    assert res["seq_4x_memory_growth"] == res["peak_mem_mb_784"] / res["peak_mem_mb_196"]
