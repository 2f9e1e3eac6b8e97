"""FSDP2 (train.parallel=fsdp) on two gloo ranks must train exactly like one process with the same
global batch, with or without activation checkpointing, and its sharded checkpoints must resume
exactly on two ranks and on one, and consolidate to the live model's weights."""
import json
import shutil

import torch

from conftest import run_ranks, tiny_cfg
from imagelm import checkpoint, parallel
from test_clip import CLIP, _batch, _clip

FSDP = ("train.parallel=fsdp", "train.steps=4", "train.ckpt_every=2", "train.keep_ckpts=3")


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run):
    return checkpoint.load_weights(checkpoint.latest(run / "checkpoints"))


def _aim_worker(rank, world, root):
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from imagelm.train import Trainer
    root = Path(root)
    try:
        t = Trainer(tiny_cfg(*FSDP), root / "fsdp", progress=False)
        assert parallel.is_sharded(t.method)
        t.fit()
        full = get_model_state_dict(t.method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, root / "live.pt")
        Trainer(tiny_cfg(*FSDP, "train.activation_checkpointing=true"), root / "fsdp_ac", progress=False).fit()
        # a frozen tokenizer (BEiT's targets) is left whole: only trainable parameters are sharded
        from torch.distributed.tensor import DTensor

        from imagelm.methods import build_method
        beit = parallel.wrap(build_method(tiny_cfg("method=beit", "beit.vocab=16")), t.cfg.train, bf16=True)
        assert all(isinstance(p, DTensor) == p.requires_grad for p in beit.parameters())
        assert any(not p.requires_grad for p in beit.parameters())
        Trainer(tiny_cfg(*FSDP), root / "cut", progress=False).fit(until=2)       # interrupted at step 2
        if rank == 0:
            shutil.copytree(root / "cut", root / "cut_one_rank")
        torch.distributed.barrier()
        Trainer(tiny_cfg(*FSDP), root / "cut", resume=True, progress=False).fit()
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_two_ranks_equal_one_process_and_resume_on_two_or_one_rank(tmp_path):
    from imagelm.train import Trainer
    Trainer(tiny_cfg(*FSDP), tmp_path / "one", progress=False).fit()     # one process, sharded checkpoints
    run_ranks(_aim_worker, str(tmp_path))
    Trainer(tiny_cfg(*FSDP), tmp_path / "cut_one_rank", resume=True, progress=False).fit()
    one, w_one = _losses(tmp_path / "one"), _weights(tmp_path / "one")
    assert len(one) == 4 and len(w_one) > 10
    for run in ("fsdp", "fsdp_ac", "cut", "cut_one_rank"):
        losses, w = _losses(tmp_path / run), _weights(tmp_path / run)
        # a resumed run's metrics.jsonl holds the steps before the cut and those after it
        assert len(losses) == 4 and all(abs(a - b) < 1e-5 * max(1, abs(a)) for a, b in zip(one, losses)), run
        assert w.keys() == w_one.keys()
        for k in w_one:
            assert torch.allclose(w[k], w_one[k], atol=1e-5), (run, k)
    live = torch.load(tmp_path / "live.pt", weights_only=True)
    consolidated = _weights(tmp_path / "fsdp")
    assert live.keys() == consolidated.keys() and all(torch.equal(live[k], consolidated[k]) for k in live)
    ckpt = checkpoint.latest(tmp_path / "fsdp" / "checkpoints")
    assert parallel.has_sharded(ckpt) and not (ckpt / checkpoint.WEIGHTS).exists()
    assert checkpoint.consolidate(ckpt).exists()         # `imagelm consolidate`: the same weights, one file
    assert all(torch.equal(consolidated[k], v) for k, v in checkpoint.load_weights(ckpt).items())


def _clip_steps(model, batches, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    losses = []
    for _ in range(steps):
        loss = model(batches).loss
        loss.backward()
        parallel.grad_norm_clip(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _clip_worker(rank, world, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from imagelm import dist
    try:
        dist.init()
        model = parallel.wrap(_clip(), tiny_cfg(*CLIP, "train.parallel=fsdp").train, bf16=False)
        n = 8 // world
        losses = _clip_steps(model, {k: v[rank * n:(rank + 1) * n] for k, v in _batch().items()})
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"losses": torch.tensor(losses), "weights": full}, out)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_contrastive_loss_two_ranks_equal_one_process(tmp_path):
    """CLIP's InfoNCE over both ranks' pairs (gathered with gradient) under fsdp: the losses and
    the weights after three AdamW steps are one process's with the whole batch."""
    model = _clip()
    losses = _clip_steps(model, _batch())
    run_ranks(_clip_worker, str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert torch.allclose(two["losses"], torch.tensor(losses), atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.allclose(two["weights"][k], v, atol=1e-5), k


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _clip()
    model(_batch()).loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert parallel.set_activation_checkpointing(model) == 4     # 2 image + 2 text blocks
    model(_batch()).loss.backward()
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[k], atol=1e-6), k


def test_memory_plan_shards_the_training_state():
    plan = parallel.memory_plan(10 ** 9, activations_gb=2.0, ranks=(1, 8))
    assert plan["ddp_gb"] == 18.0                  # 16 bytes a parameter + activations
    assert plan["fsdp_gb"]["8"] == 2.0 + 2.0
