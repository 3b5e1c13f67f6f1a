"""Shared fixtures: the repo on sys.path, a small synthetic dataset, the real Market subset."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARKET_SUB = REPO.parent / "shared" / "data" / "market1501-sub"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """24 identities (12 train / 12 test), generated once per test session."""
    import prepare

    out = tmp_path_factory.mktemp("synthetic") / "syn"
    prepare.make_synthetic(out, ids=24, seed=0, occlusion=0.3)
    return out


@pytest.fixture(scope="session")
def market_sub():
    if not (MARKET_SUB / "bounding_box_train").is_dir():
        pytest.skip(f"{MARKET_SUB} not present")
    return MARKET_SUB


@pytest.fixture
def offline_weights(monkeypatch, tmp_path):
    """No network and an empty torch cache (TORCH_HOME = tmp_path): torchvision's ImageNet
    weights fail to download as they do on a machine without network."""
    import urllib.error

    import torch
    import torchvision

    def offline(*_a, **_k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return tmp_path


def make_tree(root: Path, layout: dict, size=(8, 16)) -> Path:
    """Write tiny valid jpgs: layout = {"bounding_box_train": ["0001_c1s1_000001_00.jpg", ...], ...}."""
    from PIL import Image

    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for sub, names in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            Image.new("RGB", size, (i * 20 % 255, 80, 160)).save(root / sub / name)
    return root


def pytest_collection_modifyitems(session, config, items):
    """Run tests/test_deploy.py last. Once OpenVINO's CPU plugin is loaded into a process, a
    later test crashed the whole pytest process (SIGSEGV, no Python traceback; seen twice in a
    full-suite run, never with test_deploy.py left out), so nothing runs after it."""
    items.sort(key=lambda item: item.path.name == "test_deploy.py")
