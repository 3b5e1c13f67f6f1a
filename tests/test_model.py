"""model.py and losses.py: shapes, weights, gradients, backbones, weights loading."""

import pytest
import torch
import torchvision

import datasets as D
import model as model_mod
from losses import awpcn_loss, batch_hard_triplet, cell_visibility, stripe_visibility
from model import AWPCN, build_model, build_trunk
from utils import UserError


def tiny(parts=6, weighting="adaptive", head="visibility", classes=5, **kw):
    torch.manual_seed(0)
    return AWPCN(classes, backbone="resnet18", parts=parts, embed_dim=32, weighting=weighting,
                 head=head, pretrained="none", **kw)


@pytest.mark.parametrize("parts", [1, 4, 6])
def test_shapes_train_and_eval(parts):
    m = tiny(parts)
    x = torch.randn(3, 3, 96, 32)
    m.train()
    out = m(x)
    assert out["logits"].shape == (3, parts, 5)
    assert out["fused"].shape == (3, 5)
    assert out["weights"].shape == (3, parts)
    assert out["scores"].shape == (3, parts)
    assert out["emb"].shape == (3, parts, 32)
    m.eval()
    emb, w = m(x)
    assert emb.shape == (3, parts, 32) and w.shape == (3, parts)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert (w >= 0).all()


def test_uniform_weighting_is_exactly_equal():
    m = tiny(4, weighting="uniform").eval()
    _, w = m(torch.randn(2, 3, 64, 32))
    assert torch.equal(w, torch.full((2, 4), 0.25))
    assert not hasattr(m, "scorer")


def test_fused_logits_are_weighted_sum_of_part_logits():
    m = tiny(4, head="softmax").train()
    m.drop.p = 0.0
    out = m(torch.randn(2, 3, 64, 32))
    expect = (out["weights"].unsqueeze(-1) * out["logits"]).sum(1)
    torch.testing.assert_close(out["fused"], expect)


def test_visibility_head_gets_no_gradient_from_fused_ce():
    m = tiny(4).train()
    out = m(torch.randn(4, 3, 64, 32))
    torch.nn.functional.cross_entropy(out["fused"], torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.scorer.parameters())
    # ... while the softmax ablation head learns only through it.
    m2 = tiny(4, head="softmax").train()
    out = m2(torch.randn(4, 3, 64, 32))
    torch.nn.functional.cross_entropy(out["fused"], torch.tensor([0, 1, 2, 3])).backward()
    assert m2.scorer[2].weight.grad.abs().sum() > 0  # last layer; the first waits for it (zero init)


def test_loss_decreases_on_a_tiny_batch():
    m = tiny(4, classes=4, dropout=0.0).train()
    x = torch.randn(8, 3, 64, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    vis = torch.ones(8, 64)
    vis[:4, :16] = 0  # top stripe hidden on half the images
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss, terms = awpcn_loss(m(x), y, vis, triplet_margin=0.3)
        assert set(terms) == {"part_ce", "fused_ce", "vis_bce", "triplet"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_stripe_visibility_maps_rows_to_parts():
    vis = torch.ones(1, 12)
    vis[0, :3] = 0      # first quarter hidden
    vis[0, 9:] = 0.5    # last quarter half hidden
    torch.testing.assert_close(stripe_visibility(vis, 4), torch.tensor([[0.0, 1.0, 1.0, 0.5]]))
    torch.testing.assert_close(stripe_visibility(vis, 2), torch.tensor([[0.5, 0.75]]))


# Adaptive pooling of 8 feature rows into 6 stripes (start floor(i*8/6), end ceil((i+1)*8/6)):
# the bins overlap, and stripes 2 and 3 share no row.
BINS_8_INTO_6 = [(0, 2), (1, 3), (2, 4), (4, 6), (5, 7), (6, 8)]


def test_stripe_visibility_pools_over_the_models_overlapping_bins():
    # 128 image rows -> 8 feature rows of 16 -> 6 stripes: hiding one feature row's image rows
    # halves exactly the stripes whose bin holds that row
    for r in range(8):
        vis = torch.ones(1, 128)
        vis[0, 16 * r:16 * r + 16] = 0
        expect = [0.5 if lo <= r < hi else 1.0 for lo, hi in BINS_8_INTO_6]
        torch.testing.assert_close(stripe_visibility(vis, 6, (8, 4)), torch.tensor([expect]))
        assert [1 - v for v in expect] == D.stripe_hidden([16 * r, 16 * r + 16], 6, 128, feat_rows=8)
    vis = torch.ones(1, 128)
    vis[0, 16:32] = 0
    # equal bands of 128/6 image rows would say otherwise: band 0 = rows 0-21 (6 hidden of 22)
    torch.testing.assert_close(stripe_visibility(vis, 6), torch.tensor([[16 / 22, 11 / 22, 1, 1, 1, 1]]))
    # per-pixel maps: a half-width occluder over the bottom quarter
    vis = torch.ones(2, 128, 64)
    vis[0, 96:, :32] = 0
    torch.testing.assert_close(stripe_visibility(vis, 4, (8, 4)), torch.tensor([[1, 1, 1, 0.5], [1, 1, 1, 1.0]]))
    torch.testing.assert_close(stripe_visibility(vis, 4), torch.tensor([[1, 1, 1, 0.5], [1, 1, 1, 1.0]]))
    torch.testing.assert_close(stripe_visibility(vis, 6, (8, 4))[0], torch.tensor([1, 1, 1, 1, 0.75, 0.5]))


def test_cell_visibility_hand_computed():
    vis = torch.ones(1, 128, 64)
    vis[0, 96:, :32] = 0                     # feature rows 6-7, columns 0-1 of an 8x4 map
    vis[0, :8, 48:] = 0                      # half of the rows of cell (0, 3)
    expect = torch.ones(1, 8, 4)
    expect[0, 6:, :2] = 0
    expect[0, 0, 3] = 0.5
    torch.testing.assert_close(cell_visibility(vis, (8, 4)), expect)
    rows = torch.ones(2, 128)
    rows[1, 96:] = 0.25                      # per-row input: every column alike
    torch.testing.assert_close(cell_visibility(rows, (8, 4)),
                               cell_visibility(rows[:, :, None].expand(2, 128, 64), (8, 4)))
    assert cell_visibility(rows, (8, 4))[1, 6:].eq(0.25).all() and cell_visibility(rows, (8, 4))[1, :6].eq(1).all()


class FixedMap(torch.nn.Module):
    """Stands in for vis_conv: the same visibility logits (h, w) for every image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, fmap):
        return self.logits.expand(fmap.shape[0], 1, *self.logits.shape).to(fmap.dtype)


def test_spatial_head_shapes_and_uniform_start():
    m = tiny(6, head="spatial").train()
    assert not hasattr(m, "scorer") and m.vis_conv.out_channels == 1
    x = torch.randn(3, 3, 128, 64)
    out = m(x)
    assert out["vis_logits"].shape == (3, 8, 4) and tuple(out["feat_hw"]) == (8, 4)
    assert out["scores"] is None
    assert out["logits"].shape == (3, 6, 5) and out["fused"].shape == (3, 5) and out["emb"].shape == (3, 6, 32)
    torch.testing.assert_close(out["weights"], torch.full((3, 6), 1 / 6))     # starts all visible
    m.eval()
    emb, w = m(x)
    assert emb.shape == (3, 6, 32) and w.shape == (3, 6)
    v, hw = m.predict_visibility(x)
    assert v.shape == (3, 6) and tuple(hw) == (8, 4)
    torch.testing.assert_close(v, torch.full((3, 6), torch.sigmoid(torch.tensor(3.0)).item()))
    # the other heads leave vis_logits empty and report the map size too
    out = tiny(6).train()(x)
    assert out["vis_logits"] is None and tuple(out["feat_hw"]) == (8, 4)
    with pytest.raises(ValueError, match="uniform"):
        tiny(6, weighting="uniform").predict_visibility(x)


def test_spatial_head_pools_only_visible_locations(monkeypatch):
    m = tiny(6, head="spatial").eval()
    logits = torch.full((8, 4), 30.0)
    logits[:4, :2] = -30.0                   # top half, left half of the map: hidden
    monkeypatch.setattr(m, "vis_conv", FixedMap(logits))
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        emb, w = m(x)
        fmap = m.trunk(x)                    # (2, C, 8, 4)
        visible = torch.ones(8, 4, dtype=torch.bool)
        visible[:4, :2] = False

        def embed(pooled):                   # (N, P, C) -> the model's embeddings
            e = torch.bmm(pooled.transpose(0, 1), m.reduce).transpose(0, 1)
            return torch.relu(m.reduce_bn(e.reshape(2, -1)).view_as(e))

        weighted = torch.stack([fmap[:, :, lo:hi][:, :, visible[lo:hi]].mean(-1) for lo, hi in BINS_8_INTO_6], 1)
        plain = torch.stack([fmap[:, :, lo:hi].mean((2, 3)) for lo, hi in BINS_8_INTO_6], 1)
        torch.testing.assert_close(emb, embed(weighted), rtol=1e-4, atol=1e-5)
        # stripes 0-2 reach into the hidden rows and differ from plain pooling; 3-5 do not
        assert not torch.allclose(emb[:, :3], embed(plain)[:, :3], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(emb[:, 3:], embed(plain)[:, 3:], rtol=1e-4, atol=1e-5)
        # stripe visibility 0.5 (half of each of their cells hidden) vs 1: weights 1/9 vs 2/9
        torch.testing.assert_close(w, torch.tensor([[1, 1, 1, 2, 2, 2]] * 2) / 9)
        v, _ = m.predict_visibility(x)
        torch.testing.assert_close(v, torch.tensor([[0.5, 0.5, 0.5, 1, 1, 1]] * 2))
        # the whole top half (feature rows 0-3, the bins of stripes 0-2) hidden: they weigh nothing
        m.vis_conv.logits[:4] = -30.0
        _, w = m(x)
        torch.testing.assert_close(w, torch.tensor([[0, 0, 0, 1 / 3, 1 / 3, 1 / 3]] * 2), atol=1e-6, rtol=0)
        torch.testing.assert_close(w.sum(1), torch.ones(2))


def test_spatial_head_bce_target_and_gradients():
    m = tiny(6, head="spatial", temperature=2.0).train()
    x = torch.randn(4, 3, 128, 64)
    y = torch.tensor([0, 1, 2, 3])
    vis = torch.ones(4, 128, 64)
    vis[0, 96:, :32] = 0
    vis[1, :40] = 0.3
    torch.manual_seed(1)
    out = m(x)
    loss, terms = awpcn_loss(out, y, vis, temperature=2.0)
    expect = torch.nn.functional.binary_cross_entropy_with_logits(out["vis_logits"] / 2.0, cell_visibility(vis, (8, 4)))
    torch.testing.assert_close(terms["vis_bce"], expect)
    torch.testing.assert_close(loss, terms["part_ce"] + terms["fused_ce"] + expect)
    loss.backward()
    full = m.vis_conv.weight.grad.clone()
    assert full.abs().sum() > 0 and m.vis_conv.bias.grad.abs() > 0
    # the identity losses do not reach the map: pooling uses it detached, the fused logits the weights detached
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    awpcn_loss(m(x), y, vis, vis_weight=0.0)[0].backward()
    assert m.vis_conv.weight.grad is None or m.vis_conv.weight.grad.abs().sum() == 0
    assert m.trunk[0].weight.grad.abs().sum() > 0
    # so the map's gradient in the full loss is the BCE's alone
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = m(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["vis_logits"] / 2.0, cell_visibility(vis, (8, 4)))
    bce.backward()
    torch.testing.assert_close(m.vis_conv.weight.grad, full)


def test_visibility_head_bce_uses_the_models_stripe_bins():
    m = tiny(6).train()
    vis = torch.ones(2, 128, 64)
    vis[0, 96:, :32] = 0
    out = m(torch.randn(2, 3, 128, 64))
    _, terms = awpcn_loss(out, torch.tensor([0, 1]), vis)
    target = torch.tensor([[1, 1, 1, 1, 0.75, 0.5], [1, 1, 1, 1, 1, 1.0]])
    expect = torch.nn.functional.binary_cross_entropy_with_logits(out["scores"], target)
    torch.testing.assert_close(terms["vis_bce"], expect)


def test_triplet_zero_when_classes_far_apart_and_positive_when_mixed():
    e = torch.zeros(4, 2, 3)
    e[:2, :, 0] = 1
    e[2:, :, 1] = 1
    y = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet(e, y, margin=0.3).item() == 0.0
    # swap labels so the hardest positive is farther than the hardest negative
    assert batch_hard_triplet(e, torch.tensor([0, 1, 0, 1]), margin=0.3).item() == pytest.approx(2 ** 0.5 + 0.3, abs=1e-4)


def test_resnet50_last_stride_one_gives_24x8_map():
    trunk, channels = build_trunk("resnet50", "none", None, last_stride=1)
    with torch.inference_mode():
        fmap = trunk.eval()(torch.zeros(1, 3, 384, 128))
    assert channels == 2048 and fmap.shape == (1, 2048, 24, 8)


def test_offline_imagenet_weights_message(offline_weights):
    tmp_path = offline_weights
    with pytest.raises(UserError) as err:
        build_trunk("resnet18", "imagenet")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg
    assert "--weights" in msg and "--pretrained none" in msg


def test_local_weights_file_loads_and_wrong_one_is_named(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    trunk, _ = build_trunk("resnet18", "imagenet", str(path))
    torch.testing.assert_close(trunk[0].weight, ref.conv1.weight)
    with pytest.raises(UserError, match="do not fit"):
        build_trunk("resnet34", "none", str(path))
    with pytest.raises(UserError, match="file not found"):
        build_trunk("resnet18", "none", str(tmp_path / "nope.pth"))


def test_build_model_from_opts_and_bad_choices():
    m = build_model({"backbone": "resnet18", "parts": 3, "num_classes": 7, "embed_dim": 16})
    assert m.parts == 3 and m.cls_weight.shape == (3, 16, 7)
    with pytest.raises(UserError, match="--backbone vgg"):
        AWPCN(3, backbone="vgg", pretrained="none")
    with pytest.raises(UserError, match="--weighting"):
        AWPCN(3, backbone="resnet18", weighting="learned", pretrained="none")


def test_model_cli_prints_shapes(capsys):
    assert model_mod.main(["--backbone", "resnet18", "--parts", "4", "--height", "64", "--width", "32",
                           "--num_classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "emb (2, 4, 256)" in out and "logits (2, 4, 10)" in out and "total:" in out


def test_invariance_loss_counts_visible_stripes_only():
    from losses import invariance_loss

    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])            # (1, 3, 2)
    same = teacher * 3                                                         # scale-free: cosine
    v = torch.tensor([[1.0, 0.5, 0.0]])
    assert float(invariance_loss(same, teacher, v)) == pytest.approx(0.0, abs=1e-6)
    # stripe 0 orthogonal (gap 1), stripe 1 opposite (gap 2), stripe 2 invisible (ignored)
    emb = torch.tensor([[[0.0, 1.0], [0.0, -1.0], [-1.0, -1.0]]])
    assert float(invariance_loss(emb, teacher, v)) == pytest.approx((1 * 1 + 0.5 * 2) / 1.5)
    # the teacher gets no gradient, the student does
    emb.requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    invariance_loss(emb, t, v).backward()
    assert t.grad is None and emb.grad[0, 0].abs().sum() > 0 and emb.grad[0, 2].abs().sum() == 0


def test_awpcn_loss_adds_invariance_on_the_teacher_rows_only():
    from losses import awpcn_loss

    torch.manual_seed(0)
    n, p, d, k = 4, 3, 5, 2
    out = {"logits": torch.randn(n, p, k), "fused": torch.randn(n, k), "scores": None, "vis_logits": None,
           "feat_hw": None, "emb": torch.randn(n, p, d)}
    labels = torch.tensor([0, 1, 0, 1])
    vis = torch.ones(n, 6, 4)
    base, terms = awpcn_loss(out, labels, vis, invariance=2.0)
    assert "invariance" not in terms                                 # no teacher: no term
    idx = torch.tensor([1, 3])
    out["teacher"] = (idx, -out["emb"][idx])                         # opposite: gap 2 per stripe
    total, terms = awpcn_loss(out, labels, vis, invariance=2.0)
    assert float(terms["invariance"]) == pytest.approx(2.0)
    assert float(total - base) == pytest.approx(4.0)
    out["teacher"] = (idx[:0], None)                                 # nothing occluded in the batch
    total, terms = awpcn_loss(out, labels, vis, invariance=2.0)
    assert float(terms["invariance"]) == 0 and float(total) == pytest.approx(float(base))
