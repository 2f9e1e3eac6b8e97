"""The method contract (imagelm/methods/__init__.py), checked over every registered method: a new
method gets these tests by registering, and by adding its tiny config to TINY below."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_fmnist, run_ranks, tiny_cfg
from imagelm import checkpoint
from imagelm.config import ConfigError
from imagelm.methods import METHODS, Method, build_method

# each method's tiny config (on top of conftest.TINY) and the data it trains on; image-text methods
# read corpora built from Fashion-MNIST into the session's corpus folder (CORPORA)
CORPUS = ("data.corpus_size=64", "data.flip=false", "eval.dataset=synthetic")
TINY = {
    "aim": (),
    "mae": ("mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"),
    "beit": ("beit.vocab=16", "beit.tokenizer_kind=kmeans"),
    "igpt": ("igpt.palette=8", "igpt.resolution=8"),
    "clip": ("clip.embed_dim=16", "clip.context_length=12", "clip.text_vocab=300", "clip.text_dim=32",
             "clip.text_depth=2", "clip.text_heads=2", "data.dataset=captions", *CORPUS),
    "lcl": ("lcl.embed_dim=16", "lcl.image_tokens=4", "lcl.context_length=40", "lcl.text_vocab=300",
            "lcl.text_dim=32", "lcl.text_depth=2", "lcl.text_heads=2", "data.dataset=interleaved", *CORPUS),
    "beit3": ("beit3.vocab=32", "beit3.tokenizer_steps=20", "beit3.context_length=12", "beit3.text_vocab=400",
              "beit3.vl_layers=1", "data.dataset=captions+scenes", *CORPUS),
}
NAMES = sorted(METHODS)
RUN = ("train.steps=4", "train.ckpt_every=2", "train.keep_ckpts=3", "train.batch_size=16")


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    return tmp_path_factory.mktemp("corpora")


def cfg_of(name, corpora, *extra):
    if name not in TINY:
        pytest.fail(f"method '{name}' is registered but has no tiny config: add one to TINY in tests/test_contract.py")
    root = (f"data.root={corpora}",) if any(o.startswith("data.dataset=") for o in TINY[name]) else ()
    return tiny_cfg(f"method={name}", *TINY[name], *root, *RUN, *extra)


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run):
    return checkpoint.load_weights(checkpoint.latest(run / "checkpoints"))


def _same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], atol=1e-5)), k


pytestmark = needs_fmnist


@pytest.mark.parametrize("name", NAMES)
def test_is_a_method_with_encoder_noise_dim_and_output(name):
    cls = METHODS[name]
    assert issubclass(cls, Method) and cls.name == name and cls.Config is not None
    m = build_method(tiny_cfg(f"method={name}", *[o for o in TINY[name] if not o.startswith(("data.", "eval."))]))
    assert isinstance(m.noise_dim, int) and m.noise_dim >= 0 and hasattr(m.encoder, "features")


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_gets_a_finite_gradient(name, corpora, tmp_path):
    from imagelm.train import Trainer
    t = Trainer(cfg_of(name, corpora), tmp_path / "run", progress=False)
    out = t.method(t.loader.batch(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [k for k, p in t.method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in t.method.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_runs_repeat_and_resume_is_bit_exact(name, corpora, tmp_path):
    from imagelm.train import Trainer
    Trainer(cfg_of(name, corpora), tmp_path / "a", progress=False).fit()
    Trainer(cfg_of(name, corpora), tmp_path / "b", progress=False).fit(until=2)       # interrupted at step 2
    Trainer(cfg_of(name, corpora), tmp_path / "b", resume=True, progress=False).fit()
    assert len(_losses(tmp_path / "a")) == 4 and _losses(tmp_path / "a") == _losses(tmp_path / "b")
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def _fit_keeping_grads(cfg, out) -> list[dict]:
    """Train, keeping the gradients each optimizer step applied."""
    from imagelm.train import Trainer
    t = Trainer(cfg, out, progress=False)
    grads, step = [], t.opt.step

    def keep_then_step(*a, **k):
        grads.append({n: p.grad.clone() for n, p in t.method.named_parameters() if p.grad is not None})
        return step(*a, **k)
    t.opt.step = keep_then_step
    t.fit()
    return grads


@pytest.mark.parametrize("name", NAMES)
def test_two_accumulation_steps_equal_one_or_are_refused(name, corpora, tmp_path):
    """The gradients each step applies and the losses are the one-batch run's (weights are not
    compared: AdamW turns the rounding noise of a zero gradient, a key bias's, into a full step)."""
    from imagelm.train import Trainer
    cfg = cfg_of(name, corpora, "train.accum_steps=2", "train.steps=2")
    if build_method(cfg).couples_samples:       # contrastive: micro-batches would shrink the negatives
        with pytest.raises(ConfigError, match="accum_steps"):
            Trainer(cfg, tmp_path / "two", progress=False)
        return
    two = _fit_keeping_grads(cfg, tmp_path / "two")
    one = _fit_keeping_grads(cfg_of(name, corpora, "train.steps=2"), tmp_path / "one")
    for g1, g2 in zip(one, two):
        assert g1.keys() == g2.keys()
        for k in g1:
            assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), (name, k)
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 2 and all(abs(a - b) < 1e-5 * max(1, abs(a)) for a, b in zip(l1, l2)), (l1, l2)


@pytest.mark.parametrize("name", NAMES)
def test_weights_round_trip_and_features_have_every_layer(name, corpora, tmp_path):
    from imagelm.train import Trainer
    t = Trainer(cfg_of(name, corpora), tmp_path / "run", progress=False)
    save_file({k: v.contiguous() for k, v in t.method.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fresh = build_method(t.cfg)
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    x = t.loader.batch(0)["image"]
    x = x.flatten(0, 1)[:4] if x.dim() == 5 else x[:4]        # documents: their images
    layers = list(range(fresh.encoder.num_layers + 1))
    with torch.no_grad():
        a, b = t.method.encoder.features(x, layers), fresh.encoder.features(x, layers)
    assert len(a) == len(layers)
    for fa, fb in zip(a, b):
        assert fa.ndim == 3 and fa.shape[0] == 4 and torch.equal(fa, fb)


@pytest.mark.parametrize("name", NAMES)
def test_eval_probes_a_trained_run(name, corpora, tmp_path):
    from imagelm.eval import evaluate
    from imagelm.train import Trainer
    Trainer(cfg_of(name, corpora, "train.steps=2"), tmp_path / "run", progress=False).fit()
    res = evaluate(tmp_path / "run", probes=("linear", "knn"), layers="last:1", log=lambda *a: None)
    assert 0.0 <= res["linear"]["acc"] <= 1.0 and "val_acc" in res["linear"] and "val_acc" in res["knn"]


def _first_grads_then_fit(cfg, out):
    """The gradients of step 0's batch (averaged over ranks by DDP), then the 4-step run."""
    from imagelm.train import Trainer
    t = Trainer(cfg, out, progress=False)
    with t.autocast():
        t.model(t.loader.batch(0)).loss.backward()
    grads = {k: p.grad.clone() for k, p in t.method.named_parameters() if p.grad is not None}
    t.opt.zero_grad(set_to_none=True)
    t.fit()
    return grads


def _ranks_worker(rank, world, root, names):
    from pathlib import Path
    try:
        for name in names:
            grads = _first_grads_then_fit(cfg_of(name, Path(root) / "corpora"), Path(root) / f"{name}-two")
            if rank == 0:
                torch.save(grads, Path(root) / f"{name}-two.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_for_every_method(corpora, tmp_path):
    """One process and two ranks with the same global batch: the same gradients and losses."""
    shutil.copytree(corpora, tmp_path / "corpora", dirs_exist_ok=True)
    one = {name: _first_grads_then_fit(cfg_of(name, tmp_path / "corpora"), tmp_path / f"{name}-one") for name in NAMES}
    run_ranks(_ranks_worker, str(tmp_path), NAMES, timeout=240)
    for name in NAMES:
        two = torch.load(tmp_path / f"{name}-two.pt", weights_only=True)
        assert two.keys() == one[name].keys(), name
        for k, g in one[name].items():
            assert torch.allclose(two[k], g, atol=1e-6, rtol=1e-4), (name, k)
        l1, l2 = _losses(tmp_path / f"{name}-one"), _losses(tmp_path / f"{name}-two")
        assert len(l1) == len(l2) == 4
        assert all(abs(a - b) < 1e-4 * max(1, abs(a)) for a, b in zip(l1, l2)), (name, l1, l2)
