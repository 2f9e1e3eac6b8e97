import torch

from imagelm.methods import build_method
from imagelm.methods.aim import patch_order


def test_sampled_prefix_is_in_1_to_K_minus_1(tiny):
    aim = build_method(tiny())
    K = aim.encoder.num_patches
    noise = torch.cat([torch.tensor([[0.0], [0.999999]]), torch.rand(2, K)], 1)
    S = aim.sample_prefix(torch.cat([noise, torch.rand(1000, K + 1)]))
    assert S.min() == 1 and S.max() == K - 1
    assert (build_method(tiny("aim.prefix=false")).sample_prefix(noise) == 0).all()


def test_loss_covers_only_non_prefix_positions(tiny):
    aim = build_method(tiny())
    K, P = aim.encoder.num_patches, 4
    pred, target = torch.randn(3, K - 1, P), torch.randn(3, K, P)
    S = torch.tensor([5, 1, K - 1])
    base = aim.loss(pred, target, S)
    p2, t2 = pred.clone(), target.clone()
    p2[0, :4] += 10       # predictions of patches 1..4, inside sample 0's prefix of 5
    t2[0, :5] += 10       # the prefix patches themselves
    p2[2, :K - 2] += 10   # sample 2 predicts only its last patch
    assert torch.allclose(aim.loss(p2, t2, S), base)
    p3 = pred.clone()
    p3[0, 4] += 10        # the prediction of patch 5, the first after the prefix
    assert aim.loss(p3, target, S) > base


def test_loss_is_the_per_image_mean_squared_error(tiny):
    aim = build_method(tiny("aim.prefix=false"))
    pred, target = torch.zeros(2, 3, 2), torch.ones(2, 4, 2)
    target[1] *= 3
    assert torch.isclose(aim.loss(pred, target, torch.zeros(2, dtype=torch.long)), torch.tensor(5.0))


def test_targets_are_normalised_per_patch(tiny):
    aim = build_method(tiny())
    images = torch.rand(4, 1, 8, 8) * 5 + 2
    t = aim.targets(images)
    assert torch.allclose(t.mean(-1), torch.zeros(4, 16), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(4, 16), atol=1e-3)
    raw = build_method(tiny("aim.norm_pix=false")).targets(images)
    assert raw.max() > 2


def test_patch_orders_are_permutations():
    assert patch_order("spiral", 3).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert patch_order("checkerboard", 2).tolist() == [0, 3, 1, 2]
    for kind in ("raster", "spiral", "checkerboard"):
        assert sorted(patch_order(kind, 5).tolist()) == list(range(25))
    r = patch_order("random", 3, torch.rand(4, 9))
    assert all(sorted(row) == list(range(9)) for row in r.tolist())


def test_random_order_predicts_each_targets_own_patch(tiny):
    """With a per-image order, the target at position i must be the patch the order puts there."""
    aim = build_method(tiny("aim.order=random"))
    noise = torch.rand(2, aim.noise_dim)
    order = aim.sample_order(noise)
    assert not torch.equal(order[0], order[1])
    seen = {}
    loss = aim.loss
    aim.loss = lambda pred, target, S: seen.update(target=target) or loss(pred, target, S)
    images = torch.randn(2, 1, 8, 8)
    out = aim({"image": images, "noise": noise})
    raster = aim.targets(images)                                        # (B, K, p*p*C) in raster order
    for b in range(2):     # position i's target is the patch the image's own order puts at i
        assert torch.equal(seen["target"][b], raster[b, order[b]])
    assert torch.isfinite(out.loss)


def test_forward_backward_every_variant(tiny):
    for o in ("aim.order=raster", "aim.order=spiral", "aim.order=checkerboard", "aim.prefix=false",
              "aim.norm_pix=false", "aim.head_depth=0"):
        aim = build_method(tiny(o))
        out = aim({"image": torch.randn(3, 1, 8, 8), "noise": torch.rand(3, aim.noise_dim)})
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert aim.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
