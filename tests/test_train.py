import json
import math

import pytest
import torch

from conftest import needs_fmnist, tiny_cfg
from imagelm import checkpoint
from imagelm.config import ConfigError, load
from imagelm.methods import Output
from imagelm.train import Trainer, TrainingDiverged, cpp_compiler, lr_at


def losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = tiny_cfg("train.warmup=0.1", "train.min_lr=1e-5").train
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-5, rel=0.1)


def test_resume_reproduces_an_uninterrupted_run_bit_exactly(tmp_path):
    Trainer(tiny_cfg(), tmp_path / "a", progress=False).fit()
    Trainer(tiny_cfg(), tmp_path / "b", progress=False).fit(until=3)   # interrupted after step 3
    resumed = Trainer(tiny_cfg(), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 3
    resumed.fit()
    wa = checkpoint.load_weights(checkpoint.latest(tmp_path / "a" / "checkpoints"))
    wb = checkpoint.load_weights(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_with_another_config_is_refused_with_the_keys(tmp_path):
    Trainer(tiny_cfg("train.steps=2"), tmp_path, progress=False).fit()
    with pytest.raises(ConfigError, match="train.lr"):
        Trainer(tiny_cfg("train.steps=2", "train.lr=0.5"), tmp_path, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_cfg("train.steps=2"), tmp_path, progress=False)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    tr = Trainer(tiny_cfg("train.steps=10", "train.ckpt_every=2"), tmp_path, progress=False)
    forward = tr.method.forward
    calls = []

    def poisoned(batch):
        out = forward(batch)
        calls.append(1)
        return Output(out.loss * float("nan")) if len(calls) == 6 else out
    tr.method.forward = poisoned
    with pytest.raises(TrainingDiverged, match="at step 5.*step_00000004"):
        tr.fit()
    last = checkpoint.latest(tmp_path / "checkpoints")
    assert last.name == "step_00000004"
    assert all(torch.isfinite(v).all() for v in checkpoint.load_weights(last).values())


def test_minutes_budget_stops_cleanly_with_a_checkpoint(tmp_path):
    tr = Trainer(tiny_cfg("train.steps=100000", "train.ckpt_every=100000"), tmp_path, minutes=0.3, progress=False)
    tr.fit()
    last = checkpoint.latest(tmp_path / "checkpoints")
    state = checkpoint.load_state(last)
    assert state["total"] < 100000              # the schedule was fitted to the budget
    assert 20 < state["step"] <= state["total"]  # 18 s: room for 20 steps on a loaded machine too


def test_trainer_state_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    Trainer(tiny_cfg("train.steps=1"), tmp_path, progress=False).fit()
    last = checkpoint.latest(tmp_path / "checkpoints")
    torch.save({"step": 1, "x": Evil()}, last / checkpoint.STATE)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        checkpoint.load_state(last)


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path):
    Trainer(tiny_cfg("train.steps=3", "train.ckpt_every=1", "train.keep_ckpts=2"), tmp_path, progress=False).fit()
    ck = tmp_path / "checkpoints"
    (ck / ".tmp_step_00000009").mkdir()        # a crash mid-write leaves only this
    assert checkpoint.latest(ck).name == "step_00000003"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    Trainer(tiny_cfg("train.steps=2"), tmp_path / "a", progress=False).fit()
    Trainer(tiny_cfg("train.steps=2", "train.accum_steps=4"), tmp_path / "b", progress=False).fit()
    wa = checkpoint.load_weights(checkpoint.latest(tmp_path / "a" / "checkpoints"))
    wb = checkpoint.load_weights(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("method", [
    ("method=mae", "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"),
    ("method=beit", "beit.vocab=16", "beit.tokenizer_kind=kmeans"),      # its block masks stay eager
], ids=["mae", "beit"])
def test_compiled_training_equals_eager(tmp_path, method):
    """train.compile=true (mae-tiny's recipe) trains the same model as eager, only faster."""
    args = (*method, "train.steps=3")
    Trainer(tiny_cfg(*args), tmp_path / "eager", progress=False).fit()
    trainer = Trainer(tiny_cfg(*args, "train.compile=true"), tmp_path / "compiled", progress=False)
    assert trainer.model is not trainer.method      # the step really runs compiled
    trainer.fit()
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    we = checkpoint.load_weights(checkpoint.latest(tmp_path / "eager" / "checkpoints"))
    wc = checkpoint.load_weights(checkpoint.latest(tmp_path / "compiled" / "checkpoints"))
    # Adam divides by sqrt(v): float-level differences in near-zero gradients move a weight by up to
    # ~1e-5 (lr 1e-3); a step computed wrongly would move it by ~lr
    assert we.keys() == wc.keys() and all(torch.allclose(we[k], wc[k], atol=1e-4) for k in we)


def test_compile_without_a_cpp_compiler_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        Trainer(tiny_cfg("train.compile=true"), tmp_path / "run", progress=False)


@needs_fmnist
def test_loss_falls_on_real_fashion_mnist(tmp_path):
    cfg = load("aim-tiny", ["model.dim=64", "model.depth=2", "model.heads=2", "aim.head_width=128",
                            "train.steps=60", "train.batch_size=64", "train.log_every=1", "train.warmup=0.1"])
    Trainer(cfg, tmp_path, progress=False).fit()
    ls = losses(tmp_path)
    assert all(math.isfinite(l) for l in ls)
    assert sum(ls[-10:]) / 10 < 0.8 * sum(ls[:5]) / 5


def test_minutes_refit_can_shrink_and_regrow_the_schedule_up_to_the_config(tmp_path):
    import time
    tr = Trainer(tiny_cfg("train.steps=100"), tmp_path, minutes=5, progress=False)
    tr.step = 30
    tr._fit_total(time.time() + 20, per_step=1.0)        # 20 s left at 1 s/step: 30 + ~20
    assert 45 <= tr.total <= 50
    tr._fit_total(time.time() + 1000, per_step=1.0)      # steps got faster: back up, but not past the config
    assert tr.total == 100
