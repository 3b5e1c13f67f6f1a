import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    import weight_power
    return weight_power


def test_sharpened_weights_are_powers_renormalised_and_leave_features_alone():
    wp = _bench()
    emb = torch.rand(2, 3, 4)
    feats = {s: {"emb": emb, "weights": torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])}
             for s in ("query", "gallery")}
    out = wp.sharpened(feats, 2.0)
    assert out["query"]["weights"][0].tolist() == pytest.approx([0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38])
    assert out["gallery"]["weights"][1].tolist() == pytest.approx([1 / 3] * 3)      # uniform stays uniform
    assert out["query"]["emb"] is emb
    assert feats["query"]["weights"][0].tolist() == pytest.approx([0.5, 0.3, 0.2])  # the input is not changed
    assert torch.allclose(wp.sharpened(feats, 1.0)["query"]["weights"], feats["query"]["weights"])


def test_weight_power_refuses_a_folder_without_a_run(tmp_path, capsys):
    wp = _bench()
    assert wp.main(["--runs", str(tmp_path), "--val_partial", str(tmp_path)]) == 2
    assert f"--runs {tmp_path}: no last.pt there" in capsys.readouterr().err
    assert wp.main(["--runs", str(tmp_path), "--val_partial", str(tmp_path), "--powers", "0"]) == 2
    assert "every power must be above 0" in capsys.readouterr().err
