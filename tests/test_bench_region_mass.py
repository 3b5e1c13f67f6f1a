import sys
from pathlib import Path

import pytest
import torch

from model import AWPCN

REPO = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    import region_mass
    return region_mass


def _region(parts=2):
    return AWPCN(5, backbone="resnet18", parts=parts, embed_dim=8, head="region", pretrained="none").eval()


def test_masses_soft_matches_the_model_and_argmax_counts_only_the_most_likely_part():
    rm = _bench()
    m = _region(parts=2)
    # A 4x1 map: rows 0-2 most likely part 0 (row 2 only just), row 3 "hidden"; part 1 never wins.
    logits = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 0.5, 2.0]]).T
    logits = logits.reshape(1, 3, 4, 1)
    w = rm.masses(m, logits, [0.5])
    soft, sharp, hard = w.view(1, 3, 2).unbind(1)
    assert torch.allclose(soft, m.part_weights(torch.zeros(1, 2, 8), logits)[0])   # as the model weighs
    assert hard[0].tolist() == pytest.approx([1.0, 0.0])     # part 1 is no location's argmax
    assert soft[0, 1] > sharp[0, 1] > hard[0, 1]           # sharper memberships, less diffuse mass
    assert w.view(1, 3, 2).sum(-1)[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_rule_features_split_the_weight_blocks_and_share_the_embeddings():
    rm = _bench()
    rules = rm.rule_names([0.5])
    assert rules == ["soft", "sharpen 0.5", "argmax"]
    emb = torch.rand(2, 2, 4)
    w = torch.arange(12.0).view(2, 6)
    feats = {"parts": 2, "query": {"emb": emb, "weights": w}, "gallery": {"emb": emb, "weights": w}}
    out = rm.rule_features(feats, rules, 2)
    assert out["sharpen 0.5"]["query"]["weights"].tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert out["argmax"]["gallery"]["weights"].tolist() == [[4.0, 5.0], [10.0, 11.0]]
    assert out["soft"]["query"]["emb"] is emb and feats["query"]["weights"].shape == (2, 6)


def test_region_mass_refuses_bad_arguments(tmp_path, capsys):
    rm = _bench()
    assert rm.main(["--runs", str(tmp_path), "--val_partial", str(tmp_path)]) == 2
    assert f"--runs {tmp_path}: no last.pt there" in capsys.readouterr().err
    assert rm.main(["--runs", str(tmp_path), "--val_partial", str(tmp_path), "--sharpen", "0"]) == 2
    assert "every factor must be above 0" in capsys.readouterr().err
