"""A corpus of malformed inputs, each with the outcome a user must see: one line
`imagelm CMD: error: ...` naming what is wrong and exit code 2 (never a traceback), or the bad
part skipped and counted, or a fallback with a warning. Configs, CLI arguments, recipe files, run
directories, checkpoints, MMC4-style JSONL and corpus folders. Most cases call `imagelm.cli.main`
in-process; a few run the real command to check its exit code and stderr."""
from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY, tiny_cfg
from imagelm import checkpoint, config
from imagelm.cli import main
from imagelm.data import corpora, sources
from imagelm.errors import CheckpointError, DataError
from imagelm.train import Trainer

pytestmark = pytest.mark.timeout(60)      # zero hangs: a case that blocks fails with its stack
ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:            # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, cmd: str, *names: str, usage: bool = False) -> str:
    """The outcome every user mistake must have; returns the line."""
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    if not usage:                      # argparse prints its usage lines first
        assert len(lines) == 1, err
    line = lines[-1]
    assert line.startswith(f"imagelm {cmd}: error: "), line
    for n in names:
        assert n in line, (n, line)
    return line


# ----------------------------------------------------------------------------- config values

def _key(override: str) -> str:
    return override.split("=", 1)[0]


# (recipe, override): a value that passes the type check but cannot be meant
BAD_VALUES = [("tiny", o) for o in [
    "train.batch_size=0", "train.batch_size=-1", "train.accum_steps=0", "train.accum_steps=-2",
    "train.ckpt_every=0", "train.log_every=0", "train.keep_ckpts=0", "train.steps=-1", "train.epochs=-1",
    "train.warmup=-0.1", "train.warmup=1.5", "train.weight_decay=-0.01", "train.grad_clip=-1", "train.lr=0",
    "train.lr=-1e-3", "train.lr=.nan", "train.lr=.inf", "train.min_lr=-1", "train.min_lr=1",
    "train.betas=[1.0, 0.9]", "train.betas=[0.9]", "train.betas=[-0.1, 0.9]", "train.seed=-1",
    "train.accum_steps=3", "train.precision=fp16", "train.batch_size=1.5", "train.batch_size=true",
    "train.batch_size=[16]", "train.batch_size=null",
    "model.patch_size=0", "model.dim=0", "model.dim=-32", "model.heads=0", "model.heads=5", "model.in_chans=2",
    "model.in_chans=0", "model.img_size=0", "model.img_size=9", "model.depth=0", "model.mlp_ratio=0",
    "model.norm_eps=0",
    "data.crop_ratio=[-1, 1]", "data.crop_ratio=[2, 1]", "data.crop_scale=[1, 0.5]", "data.crop_scale=[0.5, 1.5]",
    "data.crop_scale=[0, 1]", "data.crop_scale=[0.5]", "data.crop_scale=0.5", "data.corpus_size=-1",
    "data.dataset=imagenet", "data.strict=maybe",
    "eval.val_size=0", "eval.knn_k=0", "eval.knn_k=-3", "eval.knn_t=0", "eval.linear_wd=[]", "eval.linear_wd=[-1]",
    "eval.linear_iters=0", "eval.attentive_layers=last:0", "eval.attentive_layers=deep", "eval.attentive_epochs=0",
    "eval.batch_size=0", "eval.finetune_lr=0", "eval.finetune_images=-1", "eval.vl_steps=0", "eval.dataset=cifar",
    "aim.head_width=0", "aim.head_depth=-1", "aim.order=zigzag",
]] + [
    ("mae-tiny", "mae.mask_ratio=0"), ("mae-tiny", "mae.mask_ratio=1"), ("mae-tiny", "mae.mask_ratio=1.5"),
    ("mae-tiny", "mae.decoder_heads=3"), ("mae-tiny", "mae.decoder_dim=0"), ("mae-tiny", "mae.decoder_depth=0"),
    ("beit-tiny", "beit.mask_ratio=0"), ("beit-tiny", "beit.min_block=0"), ("beit-tiny", "beit.aspect=0"),
    ("beit-tiny", "beit.aspect=2"), ("beit-tiny", "beit.vocab=1"), ("beit-tiny", "beit.tokenizer_steps=0"),
    ("beit3-tiny", "beit3.mix=[0, 0, 0]"), ("beit3-tiny", "beit3.mix=[1, 1]"), ("beit3-tiny", "beit3.mix=[-1, 1, 1]"),
    ("beit3-tiny", "beit3.text_mask_ratio=1"), ("beit3-tiny", "beit3.context_length=0"),
    ("beit3-tiny", "beit3.vl_layers=-1"),
    ("clip-tiny", "clip.text_heads=7"), ("clip-tiny", "clip.init_temperature=0"), ("clip-tiny", "clip.embed_dim=0"),
    ("igpt-tiny", "igpt.palette=1"), ("igpt-tiny", "igpt.mask_ratio=1"), ("igpt-tiny", "igpt.resolution=-1"),
    ("lcl-tiny", "lcl.caption_image_first=1.5"), ("lcl-tiny", "lcl.text_weight=-1"), ("lcl-tiny", "lcl.text_heads=7"),
    ("lcl-tiny", "lcl.image_tokens=-1"),
]


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.mark.parametrize("recipe,override", BAD_VALUES, ids=[f"{r}:{o}" for r, o in BAD_VALUES])
def test_a_bad_config_value_is_one_line_naming_the_key(capsys, tmp_path, tiny_recipe, recipe, override):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "pretrain", tiny_recipe if recipe == "tiny" else recipe, override, "--out", out)
    line = one_line_error(rc, err, "pretrain")
    assert _key(override) in line, line
    assert not out.exists()            # refused before any work


@pytest.mark.parametrize("override", ["tokenizer.vocab=1", "tokenizer.in_chans=2", "img_size=0", "tokenizer.ema=1",
                                      "tokenizer.lr=0", "tokenizer.steps=-5", "tokenizer.kind=bpe"])
def test_a_bad_tokenizer_job_is_one_line_naming_the_key(capsys, tmp_path, override):
    rc, _, err = cli(capsys, "tokenizer", "train", override, "--out", tmp_path / "tok")
    one_line_error(rc, err, "tokenizer", _key(override))
    assert not (tmp_path / "tok").exists()


def test_a_vit_width_its_positions_cannot_use_is_one_line(capsys, tmp_path, tiny_recipe):
    rc, _, err = cli(capsys, "pretrain", tiny_recipe, "model.dim=30", "--out", tmp_path / "run")
    one_line_error(rc, err, "pretrain", "model.dim", "multiple of 4")


BAD_OVERRIDES = ["train.lrr=1", "trian.lr=1", "model=5", ".lr=1", "train.=1", "=1", "noequals",
                 "train.betas=[0.9", "train.lr={", "data.crop_scale=[0.5, 1", "model.dim: 3=4"]


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_a_malformed_override_is_one_line(capsys, tmp_path, tiny_recipe, override):
    rc, _, err = cli(capsys, "pretrain", tiny_recipe, override, "--out", tmp_path / "run")
    one_line_error(rc, err, "pretrain")


# ----------------------------------------------------------------------------- command-line arguments

BAD_ARGS = [
    *[("pretrain", ["aim-tiny", "--minutes", m], "--minutes") for m in ("-1", "0", "nan", "inf", "-inf")],
    ("pretrain", ["aim-tiny", "--minutes", "soon"], "--minutes"), ("pretrain", ["aim-tiny", "--bogus"], "--bogus"),
    ("pretrain", ["aim-tiny", "--out", "x", "train.lr=1", "--resume", "extra"], "extra"),
    ("eval", ["RUN", "--layers", "last:0"], "--layers"), ("eval", ["RUN", "--layers", "last:x"], "--layers"),
    ("eval", ["RUN", "--layers", "1,,2"], "--layers"), ("eval", ["RUN", "--probe", "svm"], "--probe"),
    ("sample", ["RUN", "--reconstruct", "--n", "0"], "--n"), ("sample", ["RUN", "--complete", "top-half",
                                                                      "--top-k", "-1"], "--top-k"),
    ("sample", ["RUN", "--complete", "top-half", "--temperature", "0"], "--temperature"),
    ("bench", ["aim-tiny", "--steps", "0"], "--steps"), ("bench", ["aim-tiny", "--batch-size", "-4"], "--batch-size"),
    ("data", ["captions", "--n", "0"], "--n"), ("tokenizer", ["train", "--out", "x", "--minutes", "-5"], "--minutes"),
]


@pytest.mark.parametrize("cmd,args,name", BAD_ARGS, ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD_ARGS])
def test_a_bad_argument_is_argparses_one_line(capsys, tmp_path, cmd, args, name):
    rc, _, err = cli(capsys, cmd, *[str(tmp_path) if a == "RUN" else a for a in args])
    one_line_error(rc, err, cmd if cmd != "tokenizer" else "tokenizer train", name, usage=True)


# ----------------------------------------------------------------------------- recipe files

BAD_RECIPES = {
    "a list": b"- method: aim\n- model: {}\n",
    "a string": b"just some words\n",
    "a number": b"42\n",
    "binary": bytes(range(256)) * 4,
    "a png": b"\x89PNG\r\n\x1a\n" + bytes(100),
    "unclosed bracket": b"model: {dim: 32\n",
    "tab indentation": b"model:\n\tdim: 32\n",
    "empty": b"",
    "only comments": b"# nothing here\n",
    "utf-16": "method: aim\n".encode("utf-16"),
    "a section that is a number": b"method: aim\nmodel: 5\n",
    "a method that is a list": b"method: [aim]\n",
    "a non-string key": b"1: 2\n",
    "two documents": b"method: aim\n---\nmethod: mae\n",
    "a string for an integer": b"method: aim\ntrain: {batch_size: '16'}\n",
    "an unknown section": b"method: aim\ntraining: {lr: 1}\n",
}


@pytest.mark.parametrize("what", list(BAD_RECIPES))
def test_a_malformed_recipe_file_is_one_line_naming_it(capsys, tmp_path, what):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(BAD_RECIPES[what])
    rc, _, err = cli(capsys, "pretrain", path, "--out", tmp_path / "run")
    line = one_line_error(rc, err, "pretrain")
    assert "recipe.yaml" in line or "'" in line    # the file, or the key in it


@pytest.mark.parametrize("what", ["a folder", "a missing file"])
def test_a_recipe_that_is_not_a_file_is_one_line(capsys, tmp_path, what):
    path = tmp_path / "recipe.yaml"
    if what == "a folder":
        path.mkdir()
    rc, _, err = cli(capsys, "pretrain", path, "--out", tmp_path / "run")
    one_line_error(rc, err, "pretrain", "recipe")


# ----------------------------------------------------------------------------- run directories and checkpoints

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished run: checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_cfg(), run, progress=False).fit()
    assert [p.name for p in checkpoint.steps(run / "checkpoints")] == ["step_00000003", "step_00000006"]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run to break."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def last(run: Path) -> Path:
    return run / "checkpoints" / "step_00000006"


def only_last(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "step_00000003")


def eval_cli(capsys, run: Path, *extra, probe: str = "knn") -> tuple[int, str, str]:
    return cli(capsys, "eval", run, "--probe", probe, "--layers", "last:1", *extra)


def evaluated(run: Path) -> str:
    """The checkpoint the last eval of `run` used."""
    return Path(json.loads((run / "eval" / "probes.json").read_text())["checkpoint"]).name


def resume_cli(capsys, run: Path) -> tuple[int, str, str]:
    return cli(capsys, "pretrain", run / "config.yaml", "--out", run, "--resume", "--no-progress")


def _weights(run: Path) -> dict:
    # copies: the loaded tensors map the file, which the cases then overwrite
    return {k: v.clone() for k, v in load_file(str(last(run) / checkpoint.WEIGHTS)).items()}


def _rewrite(run: Path, change) -> None:
    w = _weights(run)
    change(w)
    save_file(w, str(last(run) / checkpoint.WEIGHTS))


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _first(w: dict) -> str:
    return sorted(k for k, v in w.items() if v.is_floating_point() and v.ndim >= 2)[0]


# the weights file of the only checkpoint, broken: one line naming the file (and the tensor)
BROKEN_WEIGHTS = {
    "zero bytes": lambda r: (last(r) / checkpoint.WEIGHTS).write_bytes(b""),
    "truncated": lambda r: _cut(last(r) / checkpoint.WEIGHTS, 0.5),
    "cut by one byte": lambda r: _cut(last(r) / checkpoint.WEIGHTS, 0.9999),
    "garbage": lambda r: (last(r) / checkpoint.WEIGHTS).write_bytes(os.urandom(4096)),
    "a text file": lambda r: (last(r) / checkpoint.WEIGHTS).write_text("hello\n"),
    "a torch pickle": lambda r: torch.save(_weights(r), last(r) / checkpoint.WEIGHTS),
    "header only": lambda r: _cut(last(r) / checkpoint.WEIGHTS, 0.05),
    "a folder": lambda r: ((last(r) / checkpoint.WEIGHTS).unlink(), (last(r) / checkpoint.WEIGHTS).mkdir()),
    "missing": lambda r: (last(r) / checkpoint.WEIGHTS).unlink(),
    "another shape": lambda r: _rewrite(r, lambda w: w.update({_first(w): torch.zeros(3, 3)})),
    "a missing tensor": lambda r: _rewrite(r, lambda w: w.pop(_first(w))),
    "an extra tensor": lambda r: _rewrite(r, lambda w: w.update({"extra.weight": torch.zeros(2)})),
    "NaN weights": lambda r: _rewrite(r, lambda w: w[_first(w)].fill_(float("nan"))),
    "infinite weights": lambda r: _rewrite(r, lambda w: w[_first(w)].fill_(float("inf"))),
}
CORRUPT = {"zero bytes", "truncated", "cut by one byte", "garbage", "a text file", "a torch pickle", "header only",
           "a folder", "missing"}     # unreadable: an older checkpoint takes over


@pytest.mark.parametrize("what", list(BROKEN_WEIGHTS))
def test_broken_weights_of_the_only_checkpoint_are_one_line_naming_the_file(capsys, run, what):
    only_last(run)
    BROKEN_WEIGHTS[what](run)
    rc, _, err = eval_cli(capsys, run)
    one_line_error(rc, err, "eval", "model.safetensors")


@pytest.mark.parametrize("what", sorted(CORRUPT))
def test_unreadable_latest_weights_fall_back_to_the_previous_checkpoint(capsys, caplog, run, what):
    BROKEN_WEIGHTS[what](run)
    rc, _, err = eval_cli(capsys, run, probe="none")     # the choice of checkpoint, without the probes
    assert rc == 0 and "Traceback" not in err, err
    warning = caplog.text
    assert "step_00000006" in warning and "falling back to" in warning and "step_00000003" in warning
    assert evaluated(run) == "step_00000003"


@pytest.mark.parametrize("what", ["another shape", "a missing tensor", "an extra tensor", "NaN weights"])
def test_mismatched_weights_name_the_tensor(run, what):
    from imagelm.methods import build_method

    BROKEN_WEIGHTS[what](run)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(tensor|missing|unexpected)") as e:
        checkpoint.load_into(build_method(tiny_cfg()), last(run))
    w = _weights(run) if what != "a missing tensor" else load_file(str(run / "checkpoints" / "step_00000003" /
                                                                      checkpoint.WEIGHTS))
    assert _first(w) in str(e.value) or "extra.weight" in str(e.value)


LATEST_POINTERS = {"binary": os.urandom(64), "empty": b"", "a missing step": b"step_00000099",
                   "a path out of the run": b"../../etc", "another name": b"final",
                   "utf-16": "step_00000006".encode("utf-16")}


@pytest.mark.parametrize("what", list(LATEST_POINTERS))
def test_a_bad_latest_pointer_falls_back_to_the_newest_readable_checkpoint(capsys, caplog, run, what):
    (run / "checkpoints" / checkpoint.LATEST).write_bytes(LATEST_POINTERS[what])
    rc, _, err = eval_cli(capsys, run, probe="none")
    assert rc == 0 and "Traceback" not in err, err
    assert "latest" in caplog.text
    assert evaluated(run) == "step_00000006"


def _state(run: Path) -> dict:
    return torch.load(last(run) / checkpoint.STATE, weights_only=True)


def _restate(run: Path, change) -> None:
    s = _state(run)
    s = change(s) or s
    torch.save(s, last(run) / checkpoint.STATE)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


# trainer.pt of the only checkpoint, broken: --resume refuses in one line naming trainer.pt
BROKEN_STATE = {
    "zero bytes": lambda r: (last(r) / checkpoint.STATE).write_bytes(b""),
    "truncated": lambda r: _cut(last(r) / checkpoint.STATE, 0.5),
    "garbage": lambda r: (last(r) / checkpoint.STATE).write_bytes(os.urandom(2048)),
    "missing": lambda r: (last(r) / checkpoint.STATE).unlink(),
    "a pickle payload": lambda r: torch.save({"step": 6, "x": Evil()}, last(r) / checkpoint.STATE),
    "a raw pickle": lambda r: (last(r) / checkpoint.STATE).write_bytes(pickle.dumps({"step": 6})),
    "a list": lambda r: torch.save([1, 2, 3], last(r) / checkpoint.STATE),
    "no step": lambda r: _restate(r, lambda s: s.pop("step") and None),
    "a string step": lambda r: _restate(r, lambda s: s.update(step="6")),
    "step past total": lambda r: _restate(r, lambda s: s.update(step=99)),
    "no param_groups": lambda r: _restate(r, lambda s: s["optimizer"].pop("param_groups") and None),
    "rng not a tensor": lambda r: _restate(r, lambda s: s.update(rng_cpu=[1, 2])),
    "another model's optimizer": lambda r: _restate(r, lambda s: s["optimizer"].update(
        param_groups=s["optimizer"]["param_groups"][:1])),
}


@pytest.mark.parametrize("what", list(BROKEN_STATE))
def test_a_broken_trainer_state_is_refused_in_one_line(capsys, run, what):
    only_last(run)
    BROKEN_STATE[what](run)
    rc, _, err = resume_cli(capsys, run)
    one_line_error(rc, err, "pretrain", "trainer.pt")
    assert not Path("pwned").exists()


@pytest.mark.parametrize("what", ["zero bytes", "a raw pickle", "garbage", "missing"])
def test_an_unreadable_latest_state_is_passed_over_for_the_previous_checkpoint(caplog, run, what):
    BROKEN_STATE[what](run)
    assert checkpoint.latest(run / "checkpoints", state=True).name == "step_00000003"
    assert "falling back to" in caplog.text and "trainer.pt" in caplog.text


def test_an_unreadable_latest_state_resumes_from_the_previous_checkpoint(capsys, caplog, run):
    BROKEN_STATE["truncated"](run)
    rc, out, err = resume_cli(capsys, run)
    assert rc == 0 and "Traceback" not in err, err
    assert "falling back to" in caplog.text and "step_00000003" in caplog.text
    assert "finished: step 6/6" in out               # steps 4-6 trained again from step 3
    assert checkpoint.load_state(checkpoint.latest(run / "checkpoints", state=True))["step"] == 6


def test_eval_needs_only_the_weights(capsys, run):
    BROKEN_STATE["garbage"](run)
    rc, _, err = eval_cli(capsys, run)
    assert rc == 0, err


def _config(run: Path, text: bytes) -> None:
    (run / "config.yaml").write_bytes(text)


def _config_with(run: Path, key: str, value) -> None:
    d = yaml.safe_load((run / "config.yaml").read_text())
    section, name = key.split(".")
    d[section][name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(d))


BROKEN_RUNS = {
    "no config.yaml": (lambda r: (r / "config.yaml").unlink(), "config.yaml"),
    "config.yaml a list": (lambda r: _config(r, b"- 1\n- 2\n"), "config.yaml"),
    "config.yaml binary": (lambda r: _config(r, os.urandom(512)), "config.yaml"),
    "config.yaml not YAML": (lambda r: _config(r, b"model: {dim: [\n"), "config.yaml"),
    "config.yaml empty": (lambda r: _config(r, b""), "config.yaml"),
    "config.yaml a bad value": (lambda r: _config_with(r, "model.dim", 0), "model.dim"),
    "config.yaml an unknown key": (lambda r: _config_with(r, "train.speed", 3), "train.speed"),
    "no checkpoints": (lambda r: shutil.rmtree(r / "checkpoints"), "checkpoint"),
    "a run that is a file": (lambda r: (shutil.rmtree(r), r.write_text("x")), "run"),
    "every checkpoint unreadable": (lambda r: [(p / checkpoint.WEIGHTS).write_bytes(b"x")
                                               for p in checkpoint.steps(r / "checkpoints")], "model.safetensors"),
}


@pytest.mark.parametrize("what", list(BROKEN_RUNS))
def test_a_broken_run_directory_is_one_line(capsys, run, what):
    breaks, name = BROKEN_RUNS[what]
    breaks(run)
    rc, _, err = eval_cli(capsys, run)
    one_line_error(rc, err, "eval", name)


@pytest.mark.parametrize("extra,name", [(["train.lr=1"], "eval.*"), (["eval.knn_k=0"], "eval.knn_k"),
                                        (["--layers", "99"], "99"),
                                        (["eval.linear_wd=[]"], "eval.linear_wd")])
def test_bad_eval_settings_are_one_line(capsys, run, extra, name):
    rc, _, err = cli(capsys, "eval", run, "--probe", "knn", *extra)
    one_line_error(rc, err, "eval", name)


def test_knn_k_larger_than_the_data_is_clamped_with_a_warning(capsys, run):
    rc, out, err = eval_cli(capsys, run, "eval.knn_k=100000")
    assert rc == 0, err
    assert "eval.knn_k=100000" in out and "using k=" in out
    assert json.loads((run / "eval" / "probes.json").read_text())["knn"]["k"] < 100000


@pytest.mark.parametrize("what", ["no probes.json", "probes.json not JSON"])
def test_compare_of_unevaluated_runs_is_one_line(capsys, run, what):
    if what == "probes.json not JSON":
        (run / "eval").mkdir()
        (run / "eval" / "probes.json").write_bytes(b"\x00{")
    rc, _, err = cli(capsys, "compare", run)
    one_line_error(rc, err, "compare", "probes.json")


# ----------------------------------------------------------------------------- interleaved JSONL

@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """A small interleaved corpus (synthetic images) to append bad lines to."""
    out = tmp_path_factory.mktemp("interleaved")
    data = sources.synthetic(40, 28, 1, classes=10)
    data.classes = list(sources.FASHION_MNIST_CLASSES)
    corpora.build_interleaved(out, "train", n=6, data=data)
    return out


GOOD = {"text_list": ["a.", "b."], "image_info": [{"image_name": "000000_0.png", "matched_text_index": 1}]}
BAD_LINES = {
    "invalid JSON": (b'{"text_list": [', "invalid JSON"),
    "truncated line": (json.dumps(GOOD).encode()[:30], "invalid JSON"),
    "a list": (b"[1, 2]", "not a JSON object"),
    "a string": (b'"words"', "not a JSON object"),
    "a number": (b"42", "not a JSON object"),
    "null": (b"null", "not a JSON object"),
    "no text_list": (json.dumps({"image_info": []}).encode(), "text_list missing or not a list of strings"),
    "text_list a string": (json.dumps({**GOOD, "text_list": "a. b."}).encode(),
                           "text_list missing or not a list of strings"),
    "text_list with a number": (json.dumps({**GOOD, "text_list": ["a", 1]}).encode(),
                                "text_list missing or not a list of strings"),
    "image_info not a list": (json.dumps({**GOOD, "image_info": "x"}).encode(), "image_info not a list"),
    "no image_name": (json.dumps({**GOOD, "image_info": [{"matched_text_index": 0}]}).encode(),
                      "image_info entry without an image_name"),
    "image_name a number": (json.dumps({**GOOD, "image_info": [{"image_name": 3, "matched_text_index": 0}]}).encode(),
                            "image_info entry without an image_name"),
    "index a string": (json.dumps({**GOOD, "image_info": [{"image_name": "000000_0.png", "matched_text_index": "1"}]})
                       .encode(), "matched_text_index missing or not an integer"),
    "index a float": (json.dumps({**GOOD, "image_info": [{"image_name": "000000_0.png", "matched_text_index": 1.5}]})
                      .encode(), "matched_text_index missing or not an integer"),
    "index a bool": (json.dumps({**GOOD, "image_info": [{"image_name": "000000_0.png", "matched_text_index": True}]})
                     .encode(), "matched_text_index missing or not an integer"),
    "index negative": (json.dumps({**GOOD, "image_info": [{"image_name": "000000_0.png", "matched_text_index": -1}]})
                       .encode(), "matched_text_index out of range"),
    "index past the text": (json.dumps({**GOOD, "image_info": [{"image_name": "000000_0.png",
                                                                "matched_text_index": 99}]}).encode(),
                            "matched_text_index out of range"),
    "not UTF-8": (b'{"text_list": ["caf\xe9"], "image_info": []}', "not UTF-8"),
}


def _with_bad_line(documents: Path, tmp_path: Path, line: bytes) -> tuple[Path, int]:
    """docs.jsonl with `line` inserted as line 3; returns the file and the line number."""
    lines = (documents / "docs.jsonl").read_bytes().splitlines()
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join(lines[:2] + [line] + lines[2:]) + b"\n")
    return path, 3


@pytest.mark.parametrize("what", list(BAD_LINES))
def test_a_bad_jsonl_line_is_skipped_and_counted_with_its_reason(documents, tmp_path, what):
    line, reason = BAD_LINES[what]
    path, _ = _with_bad_line(documents, tmp_path, line)
    data = corpora.load_interleaved(path, sorted(map(str, documents.glob("*.tar"))))
    assert len(data.docs) == 6 and data.bad_lines == {reason: 1}
    assert sum(len(d.images) for d in data.docs) > 0


@pytest.mark.parametrize("what", list(BAD_LINES))
def test_a_bad_jsonl_line_is_fatal_under_strict_naming_file_and_line(documents, tmp_path, what):
    line, reason = BAD_LINES[what]
    path, n = _with_bad_line(documents, tmp_path, line)
    with pytest.raises(DataError, match=re.escape(f"docs.jsonl:{n}: {reason}")):
        corpora.load_interleaved(path, sorted(map(str, documents.glob("*.tar"))), strict=True)


def test_data_strict_reaches_the_jsonl_reader_from_the_command(capsys, documents, tmp_path):
    corpus = Path(shutil.copytree(documents, tmp_path / "corpora" / "interleaved" / "train"))
    _with_bad_line(documents, corpus, b"[not a document")
    rc, _, err = cli(capsys, "pretrain", "lcl-tiny", f"data.root={tmp_path / 'corpora'}", "data.corpus_size=6",
                     "data.strict=true", "--out", tmp_path / "run")
    one_line_error(rc, err, "pretrain", "docs.jsonl:3: invalid JSON")


def test_a_jsonl_without_a_valid_document_is_one_line(documents, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"[1]\n{bad\n")
    with pytest.raises(sources.DatasetMissing, match="no valid document.*2 bad lines"):
        corpora.load_interleaved(path, sorted(map(str, documents.glob("*.tar"))))


def test_an_image_missing_from_the_shards_is_counted_or_fatal_under_strict(documents, tmp_path):
    missing = json.dumps({**GOOD, "image_info": [{"image_name": "nowhere.png", "matched_text_index": 0}]}).encode()
    path, _ = _with_bad_line(documents, tmp_path, missing)
    shards = sorted(map(str, documents.glob("*.tar")))
    assert corpora.load_interleaved(path, shards).missing_images == 1
    with pytest.raises(DataError, match="nowhere.png"):
        corpora.load_interleaved(path, shards, strict=True)


# ----------------------------------------------------------------------------- corpus folders

def _users_shards(folder: Path) -> dict[str, bytes]:
    """A user's own WebDataset folder (as img2dataset writes it: shards, no manifest.json)."""
    folder.mkdir(parents=True)
    for i in range(2):
        (folder / f"{i:05d}.tar").write_bytes(os.urandom(1024))
    (folder / "00000_stats.json").write_text("{}")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


FOREIGN = {
    "no manifest": lambda f: None,
    "a manifest naming a missing shard": lambda f: (f / "manifest.json").write_text(json.dumps(
        {"shards": ["00000.tar", "00007.tar"]})),
    "a manifest that is not JSON": lambda f: (f / "manifest.json").write_text("{shards"),
    "a manifest without shards": lambda f: (f / "manifest.json").write_text(json.dumps({"kind": "mine"})),
}


@pytest.mark.parametrize("what", list(FOREIGN))
def test_a_folder_imagelm_did_not_build_is_never_deleted(tmp_path, what):
    folder = tmp_path / "captions" / "train"
    before = _users_shards(folder)
    FOREIGN[what](folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DataError, match=re.escape(str(folder)) + ".*never deletes"):
        corpora.ensure_corpus("captions", "train", tmp_path, n=10)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_imagelm_data_refuses_to_write_into_a_foreign_folder(capsys, tmp_path):
    before = _users_shards(tmp_path / "mine" / "train")
    rc, _, err = cli(capsys, "data", "captions", "--out", tmp_path / "mine", "--split", "train", "--n", "5",
                     "--data-root", tmp_path / "no-fmnist")
    one_line_error(rc, err, "data", str(tmp_path / "mine"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine" / "train").iterdir()} == before


def test_a_users_folder_with_a_manifest_is_read_as_it_is(tmp_path):
    folder = tmp_path / "captions" / "train"
    _users_shards(folder)
    (folder / "manifest.json").write_text(json.dumps({"shards": ["00000.tar", "00001.tar"]}))
    c = corpora.ensure_corpus("captions", "train", tmp_path, n=10)
    assert [Path(s).name for s in c.shards] == ["00000.tar", "00001.tar"] and (folder / "00000_stats.json").exists()


def test_a_corpus_imagelm_built_is_rebuilt_when_stale(tmp_path):
    data = sources.synthetic(30, 28, 1, classes=10)
    data.classes = list(sources.FASHION_MNIST_CLASSES)
    folder = tmp_path / "captions" / "train"
    corpora.build_captions(folder, "train", n=10, data=data)
    assert (folder / corpora.MARKER).exists()
    corpora.build_captions(folder, "train", n=12, data=data)      # its own folder: rebuilt in place
    assert json.loads((folder / "manifest.json").read_text())["samples"] == 12


# ----------------------------------------------------------------------------- the real command

@pytest.fixture(scope="module")
def commands(trained, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """A few mistakes made with the real `imagelm` command, run side by side (each pays for importing torch)."""
    tmp = tmp_path_factory.mktemp("commands")
    (tmp / "r.yaml").write_bytes(bytes(range(128, 256)) * 3)
    run = Path(shutil.copytree(trained, tmp / "run"))
    for ck in checkpoint.steps(run / "checkpoints"):
        _cut(ck / checkpoint.WEIGHTS, 0.5)
    argvs = {"bad value": ["pretrain", "aim-tiny", "model.heads=5", "--out", tmp / "out"],
             "binary recipe": ["pretrain", tmp / "r.yaml"],
             "corrupt checkpoint": ["eval", run, "--probe", "knn"],
             "--debug": ["pretrain", "aim-tiny", "model.heads=5", "--debug"]}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {k: subprocess.Popen([sys.executable, "-m", "imagelm.cli", *map(str, a)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=tmp, env=env) for k, a in argvs.items()}
    done = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=120)
        done[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


@pytest.mark.parametrize("case", ["bad value", "binary recipe", "corrupt checkpoint"])
def test_the_real_command_exits_2_with_one_line_and_no_traceback(commands, case):
    p = commands[case]
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("imagelm ")


def test_debug_shows_the_traceback(commands, capsys, monkeypatch):
    p = commands["--debug"]
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError" in p.stderr
    monkeypatch.setenv("IMAGELM_DEBUG", "1")
    with pytest.raises(config.ConfigError, match="model.heads"):
        main(["pretrain", "aim-tiny", "model.heads=5"])
