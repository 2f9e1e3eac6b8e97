import torch
import torch.nn.functional as F

from imagelm.config import ModelConfig
from imagelm.nn import transformer
from imagelm.nn.embed import patchify, sincos_2d, unpatchify
from imagelm.nn.transformer import Transformer, attention_mask, explicit_attention
from imagelm.nn.vit import ViT


def test_prefix_mask_rows_see_exactly_the_prefix_and_the_rest_is_causal():
    n, S = 7, torch.tensor([3, 1, 6])
    m = attention_mask("prefix", n, S)
    assert m.shape == (3, 1, n, n)
    for b, s in enumerate(S.tolist()):
        for i in range(n):
            seen = set(torch.nonzero(m[b, 0, i]).flatten().tolist())
            assert seen == (set(range(s)) if i < s else set(range(i + 1)))


def test_causal_and_full_masks():
    assert attention_mask("full", 4) is None
    assert torch.equal(attention_mask("causal", 3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool())


def test_prefix_attention_information_flow():
    torch.manual_seed(0)
    net = Transformer(dim=16, depth=2, heads=2).eval()
    x = torch.randn(1, 6, 16)
    S = torch.tensor([3])
    mask = attention_mask("prefix", 6, S)
    y = net(x, mask)
    x2 = x.clone()
    x2[:, 4] += torch.randn(16)                      # a causal position after the prefix
    y2 = net(x2, mask)
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)   # nothing before it changes
    assert not torch.allclose(y[:, 4:], y2[:, 4:])
    x3 = x.clone()
    x3[:, 2] += torch.randn(16)                      # the last prefix token: the whole prefix sees it
    y3 = net(x3, mask)
    assert not torch.allclose(y[:, 0], y3[:, 0])


def test_explicit_attention_equals_sdpa_and_cpu_short_sequences_use_it(monkeypatch):
    """The written-out attention that short sequences run on CPU gives SDPA's outputs and gradients
    for every mask kind; a Transformer takes it in training and inference alike up to
    CPU_EXPLICIT_ATTENTION_MAX_LEN tokens, and SDPA beyond, with the same result."""
    torch.manual_seed(0)
    B, h, n, d = 3, 2, 7, 8
    masks = [(None, False), (None, True), (attention_mask("causal", n), False),
             (attention_mask("prefix", n, torch.tensor([1, 3, 7])), False)]
    for mask, causal in masks:
        q, k, v = (torch.randn(B, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
        ours = explicit_attention(q, k, v, mask, causal)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        torch.testing.assert_close(ours, ref)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g))
    calls = []
    monkeypatch.setattr(transformer, "explicit_attention", lambda *a: calls.append(1) or explicit_attention(*a))
    net = Transformer(16, 2, 2).double()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    prefix = attention_mask("prefix", n, torch.tensor([2, 4]))
    trained, causal = net(x, prefix), net(x, is_causal=True)
    assert len(calls) == 4                    # 2 blocks x 2 calls
    with torch.inference_mode():
        torch.testing.assert_close(trained, net(x, prefix))
        torch.testing.assert_close(causal, net(x, is_causal=True))
    assert len(calls) == 8
    monkeypatch.setattr(transformer, "CPU_EXPLICIT_ATTENTION_MAX_LEN", n - 1)    # longer sequences: SDPA
    torch.testing.assert_close(trained, net(x, prefix))
    assert len(calls) == 8


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(p[0, 1].view(4, 4, 3)[..., 0], x[0, 0, :4, 4:])   # patch 1 = top-right, raster order
    assert torch.equal(unpatchify(p, 4, 3), x)


def test_sincos_positions_are_distinct():
    pos = sincos_2d(32, 4, 4)
    assert pos.shape == (16, 32)
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1


def test_encoder_features_api():
    vit = ViT(ModelConfig(img_size=8, patch_size=2, in_chans=1, dim=32, depth=3, heads=2))
    x = torch.randn(2, 1, 8, 8)
    feats = vit.features(x, layers=[0, 2, 3])
    assert [f.shape for f in feats] == [(2, 16, 32)] * 3
    assert torch.equal(feats[0], vit.embed(x))
    last = vit.features(x)
    assert len(last) == 1 and torch.equal(last[0], feats[2])   # default: the last block
