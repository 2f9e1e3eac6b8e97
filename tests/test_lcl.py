import datetime

import torch

from conftest import run_ranks, tiny_cfg
from imagelm.methods import build_method
from imagelm.tokenizers.text import train_text_tokenizer

LCL = ("method=lcl", "lcl.embed_dim=16", "lcl.image_tokens=4", "lcl.context_length=40", "lcl.text_vocab=300",
       "lcl.text_dim=32", "lcl.text_depth=2", "lcl.text_heads=2")
DOCS = [["a dark bag on sale", 0, "it costs five dollars.", 1, "and this boot"],   # two images
        [0, "an image opens this page."],                                          # image first
        [0, 1],                                                                    # images only
        ["a page with no image at all."],                                          # no image
        ["a large coat", 0, "warm."], ["a sandal", 0, "for summer.", 1, "a bag"]]


def _model(*overrides):
    torch.manual_seed(0)
    m = build_method(tiny_cfg(*LCL, *overrides))
    m.tokenizer = train_text_tokenizer([p for d in DOCS for p in d if isinstance(p, str)] * 5, 300)
    return m


def _batch(m):
    g = torch.Generator().manual_seed(0)
    lay = m.layout(DOCS, 2)
    return {"image": torch.randn(len(DOCS), 2, 1, 8, 8, generator=g), **lay}


def test_layout_places_images_between_boi_and_eoi():
    m = _model()
    b = _batch(m)
    assert b["valid"].tolist() == [[True, True], [True, False], [True, True], [False, False], [True, False],
                                   [True, True]]
    tok = m.tokenizer
    for i in range(len(DOCS)):
        for j in range(2):
            p = int(b["boi"][i, j])
            if p >= 0:
                assert b["tokens"][i, p] == tok.boi_id and b["tokens"][i, p + 5] == tok.eoi_id
                assert b["slot"][i, p + 1:p + 5].tolist() == [j * 4 + k for k in range(4)]
    assert b["boi"][1, 0] == 0                              # an image first: no context before it


def test_contrastive_target_uses_only_tokens_before_the_image():
    m = _model().eval()
    b = _batch(m)
    z, vis = m.encode(b["image"][b["valid"]])
    h = m.read(b["tokens"], b["slot"], b["valid"], vis)
    p = int(b["boi"][0, 1])                                  # doc 0, its second image
    later = b["tokens"].clone()
    later[0, p + 6:] = 7                                     # only the text after the image
    h_text = m.read(later, b["slot"], b["valid"], vis)
    assert torch.allclose(h[0, :p + 1], h_text[0, :p + 1], atol=1e-5)  # the <boi> state: unchanged
    img = b["image"].clone()
    img[0, 1] += 1.0                                         # only the image itself
    z2, vis2 = m.encode(img[b["valid"]])
    h_img = m.read(b["tokens"], b["slot"], b["valid"], vis2)
    assert torch.allclose(h[0, :p + 1], h_img[0, :p + 1], atol=1e-5)   # unchanged up to its <boi>
    assert not torch.allclose(h[0, p + 1:], h_img[0, p + 1:], atol=1e-4)   # what follows reads the image
    assert not torch.allclose(z, z2, atol=1e-4)             # and its latent is the image's


def test_every_document_shape_trains_and_each_objective_runs():
    for objective, pool in [("both", "attention"), ("contrastive", "attention"), ("generation", "attention"),
                            ("both", "mean"), ("generation", "mean")]:
        m = _model(f"lcl.objective={objective}", f"lcl.pool={pool}")
        out = m(_batch(m))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert m.encoder.patch_embed.proj.weight.grad.abs().sum() > 0   # the vision encoder learns
        assert all(p.grad is not None for p in m.parameters())          # DDP needs every gradient
        assert (m.pool is None) == (pool == "mean")


def test_mean_pooled_latent_is_the_projected_mean_of_the_patch_tokens():
    m = _model("lcl.pool=mean").eval()
    x = torch.randn(3, 1, 8, 8)
    h = m.encoder(m.encoder.embed(x))
    assert torch.allclose(m.encode(x)[0], torch.nn.functional.normalize(m.z_proj(h.mean(1)), dim=-1), atol=1e-6)


def _worker(rank, world, out):
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        m = _model()
        b = _batch(m)
        mine = slice(rank * 3, rank * 3 + 3)                  # 5 images on rank 0, 3 on rank 1
        model = torch.nn.parallel.DistributedDataParallel(m)
        loss = model({k: v[mine] for k, v in b.items()}).loss
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": {k: p.grad for k, p in m.named_parameters()
                                                     if p.grad is not None}}, f"{out}.{rank}")
        torch.distributed.barrier()    # a rank that tears gloo down while the other still works can abort it
    finally:
        torch.distributed.destroy_process_group()


def test_variable_image_counts_on_two_ranks_equal_one_process(tmp_path):
    m = _model()
    loss = m(_batch(m)).loss
    loss.backward()
    run_ranks(_worker, str(tmp_path / "r"))
    r0, r1 = (torch.load(tmp_path / f"r.{i}", weights_only=True) for i in (0, 1))
    assert torch.allclose((r0["loss"] + r1["loss"]) / 2, loss.detach(), atol=1e-5)   # DDP's mean of rank losses
    for k, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(r0["grads"][k], p.grad, atol=1e-5, rtol=1e-4), k
