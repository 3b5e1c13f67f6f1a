"""model.py and losses.py: shapes, weights, gradients, backbones, weights loading."""
import urllib.error

import pytest
import torch
import torchvision

import model as model_mod
from losses import awpcn_loss, batch_hard_triplet, stripe_visibility
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


def test_offline_imagenet_weights_message(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        offline, raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
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
