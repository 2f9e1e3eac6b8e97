"""Crash safety: a process killed while writing a checkpoint, a preempted run (SIGTERM) and a full
disk each leave the previous checkpoint as the latest, and --resume continues the run bit-exactly."""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, tiny_cfg
from imagelm import checkpoint, config
from imagelm.cli import main
from imagelm.errors import CheckpointError
from imagelm.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("train.steps=6", "train.ckpt_every=2")


def losses(run: Path) -> dict[int, float]:
    """step -> loss; a resumed run's rows for the steps it trained again replace the first ones."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_weights(checkpoint.latest(run / "checkpoints"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run trained without interruption."""
    run = tmp_path_factory.mktemp("reference") / "run"
    Trainer(tiny_cfg(*ARGS), run, progress=False).fit()
    return run


def same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(a) == losses(b)


def run_pretrain(run: Path, before: str, timeout: float = 120, overrides=()) -> subprocess.CompletedProcess:
    """`imagelm pretrain` of the tiny recipe in a new process (and process group), after the Python
    in `before` (which arranges the accident); same threads as this process, so its arithmetic is
    bit-identical."""
    recipe = config.apply_overrides(copy.deepcopy(TINY), [*ARGS, *overrides])
    (run.parent / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    script = textwrap.dedent(f"""
        import os, signal, sys
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from imagelm import checkpoint
        from imagelm.train import Trainer
    """) + textwrap.dedent(before) + textwrap.dedent(f"""
        from imagelm.cli import main
        sys.exit(main(["pretrain", {str(run.parent / 'recipe.yaml')!r}, "--out", {str(run)!r}, "--no-progress"]))
    """)
    return run_python(script, timeout, cwd=run.parent)


def run_python(script: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run of `python -c script` in a new process group (its pid is the result's `.pid`);
    a run past `timeout` is killed, with whatever it started."""
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True, **kw) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    done.pid = p.pid
    return done


def survivors(p: subprocess.CompletedProcess) -> bool:
    """Whether a process of a finished run's process group (a loader worker) is still alive."""
    try:
        os.killpg(p.pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_is_bit_exact(tmp_path, reference):
    run = tmp_path / "run"
    p = run_pretrain(run, """
        import io
        save = torch.save
        def dying_save(obj, f, *a, **k):      # the trainer state of step 4: half written, then SIGKILL
            if isinstance(obj, dict) and obj.get("step") == 4:
                buf = io.BytesIO()
                save(obj, buf, *a, **k)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *a, **k)
        checkpoint.torch.save = dying_save
    """)
    assert p.returncode == -9, p.stderr
    ck = run / "checkpoints"
    assert (ck / ".tmp_step_00000004").is_dir()                # what the kill left
    assert checkpoint.latest(ck, state=True).name == "step_00000002"
    assert main(["pretrain", str(run / "config.yaml"), "--out", str(run), "--resume", "--no-progress"]) == 0
    same_run(run, reference)
    assert not list(ck.glob(".tmp_*"))


def test_sigterm_checkpoints_exits_0_and_resume_is_bit_exact(tmp_path, reference):
    run = tmp_path / "run"
    p = run_pretrain(run, """
        step = Trainer.train_step
        def preempted_at_3(self, s):          # the cluster's SIGTERM arrives during step 3
            if s == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(self, s)
        Trainer.train_step = preempted_at_3
    """)
    assert p.returncode == 0, p.stderr
    assert "stopped by SIGTERM" in p.stdout and "Traceback" not in p.stderr
    state = checkpoint.load_state(checkpoint.latest(run / "checkpoints", state=True))
    assert state["step"] == 3 and state["total"] == 6      # the step in flight finished, then a checkpoint
    assert main(["pretrain", str(run / "config.yaml"), "--out", str(run), "--resume", "--no-progress"]) == 0
    same_run(run, reference)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="macOS: torch's own SIGTERM handling in workers")
def test_sigterm_to_the_process_group_spares_the_loader_workers(tmp_path):
    """A cluster's preemption signals every process of the job, DataLoader workers included: they
    must not die of it (the trainer would fail on a lost worker), so the run still checkpoints."""
    from test_stream import make_folder

    make_folder(tmp_path / "f", size=8)
    run = tmp_path / "run"
    p = run_pretrain(run, """
        step = Trainer.train_step
        def preempted_at_3(self, s):
            if s == 2:      # from another process: a worker exits quietly on its parent's SIGTERM
                import subprocess, time
                subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"])
                time.sleep(0.5)
            return step(self, s)
        Trainer.train_step = preempted_at_3
    """, overrides=("data.dataset=folder", f"data.root={tmp_path / 'f'}", "data.workers=2"))
    assert p.returncode == 0, p.stderr
    assert "stopped by SIGTERM" in p.stdout and "Traceback" not in p.stderr
    assert checkpoint.load_state(checkpoint.latest(run / "checkpoints", state=True))["step"] == 3
    assert not survivors(p), "the trainer's exit left loader workers running"


def test_a_process_that_exits_with_its_loader_open_stops_the_workers(tmp_path):
    """Workers that take SIGTERM only from their parent still stop when the parent exits without
    closing its loader (multiprocessing terminates them, then waits for them)."""
    from test_stream import make_folder

    make_folder(tmp_path / "f", size=8)
    script = textwrap.dedent(f"""
        from imagelm.config import DataConfig, ModelConfig
        from imagelm.data import sources
        from imagelm.data.stream import StreamLoader
        c = DataConfig(dataset="folder", root={str(tmp_path / 'f')!r}, workers=2)
        loader = StreamLoader(sources.load(c, ModelConfig(img_size=8, patch_size=2, in_chans=1), "train"), c, 4, seed=0)
        loader.batch(0)                # a module global: still open at exit
    """)
    p = run_python(script, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not survivors(p)


def full_disk_at(step: int):
    """torch.save that writes part of a trainer state, then fails as a full disk does."""
    save = torch.save

    def save_until_full(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == step:
            Path(f).write_bytes(b"PK\x03\x04" + bytes(64))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *a, **k)
    return save_until_full


def test_a_full_disk_fails_the_write_cleanly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, reference):
    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at(4))
    tr = Trainer(tiny_cfg(*ARGS), run, progress=False)
    with pytest.raises(CheckpointError, match=r"step_00000004.*No space left.*step_00000002 is kept"):
        tr.fit()
    ck = run / "checkpoints"
    assert [p.name for p in ck.iterdir() if p.name.startswith(("step_", ".tmp"))] == ["step_00000002"]
    assert (ck / checkpoint.LATEST).read_text() == "step_00000002"
    monkeypatch.undo()                                          # space freed: continue
    Trainer(tiny_cfg(*ARGS), run, resume=True, progress=False).fit()
    same_run(run, reference)


def test_a_full_disk_is_one_line_from_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at(2))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(config.apply_overrides(copy.deepcopy(TINY), list(ARGS))))
    assert main(["pretrain", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("imagelm pretrain: error: cannot write checkpoint") and "no checkpoint was written" in err


def _mount_tmpfs(path: Path, size: int) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """The same on a real full file system (a small tmpfs), where root may mount one."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 4 << 20):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        tr = Trainer(tiny_cfg(*ARGS), disk / "run", progress=False)
        tr.fit(until=2)                                          # step_00000002 on disk
        size = sum(f.stat().st_size for f in (disk / "run" / "checkpoints" / "step_00000002").iterdir())
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:                   # leave room for half a checkpoint
            f.write(bytes(free - size // 2))
        with pytest.raises(CheckpointError, match="step_00000002 is kept"):
            tr.fit()
        assert checkpoint.latest(disk / "run" / "checkpoints", state=True).name == "step_00000002"
        assert not list((disk / "run" / "checkpoints").glob(".tmp_*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
