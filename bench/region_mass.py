"""Where an unseen part's weight comes from: the region head's part mass, soft or hard, at test time.

    .venv/bin/python bench/region_mass.py --runs RUNS_DIR/awpcn_s0 RUNS_DIR/awpcn_s1 ... \\
        --val_partial ~/awpcn-bench/market_val_partial --partial ~/awpcn-bench/market_partial \\
        --json bench/results/partial/region_mass.json

A region-head run weighs part i by its predicted mass, the sum over every location of that
location's membership r_i = softmax(logits / T)_i. A part a partial query does not show keeps
weight x P of about 0.2: either every location gives it a little (soft membership), or some
locations are predicted to show it (a misplaced part). This script tells the two apart and
asks whether either is worth changing at test time. For each mass rule — the trained one
(``soft``), memberships sharpened to softmax(logits / (T s)) for each ``--sharpen`` s, and the
hard one (``argmax``: each location counts only for its most likely part or "hidden") — the
weights are recomputed from the same forward pass while the part features stay as trained
(pooled with the soft memberships). On the validation partial-view benchmark: mAP of partial,
whole and all queries and weight x P outside the view; the rule with the best mean validation
mAP over all queries is chosen, and with ``--partial`` the test benchmark is evaluated at
``soft`` and at the chosen rule only. One extraction per run and benchmark serves every rule.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import datasets  # noqa: E402
import weight_power  # noqa: E402
from inference import features_of, load_model  # noqa: E402
from model import visibility_to_weights  # noqa: E402
from utils import UserError, cli, select_device  # noqa: E402

SOFT, HARD = "soft", "argmax"


def rule_names(sharpen: list[float]) -> list[str]:
    return [SOFT] + [f"sharpen {s:g}" for s in sharpen] + [HARD]


def masses(model, logits: torch.Tensor, sharpen: list[float]) -> torch.Tensor:
    """logits (N, P+1, h, w) region logits -> part weights under every rule of
    :func:`rule_names`, concatenated: (N, R*P) float32, each block of P summing to 1."""
    t = model.temperature
    dists = [torch.softmax(logits / t, dim=1)] + [torch.softmax(logits / (t * s), dim=1) for s in sharpen]
    dists.append(F.one_hot(logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).float())
    return torch.cat([visibility_to_weights(model.region_mass(r)) for r in dists], dim=1)


class AllRules(nn.Module):
    """A region-head model whose forward returns (emb (N,P,D), weights of every rule (N, R*P)),
    so the one extraction loop (inference.features_of, flip TTA included) serves every rule."""

    def __init__(self, model, sharpen: list[float]):
        super().__init__()
        self.model, self.sharpen = model, list(sharpen)
        self.parts, self.embed_dim = model.parts, model.embed_dim

    def forward(self, x):
        emb, logits = self.model.part_embeddings(x)
        return emb, masses(self.model, logits, self.sharpen)


def rule_features(feats: dict, rules: list[str], parts: int) -> dict:
    """The features dict with (N, R*P) weights -> {rule: the features dict with that rule's weights}."""
    out = {}
    for i, rule in enumerate(rules):
        out[rule] = dict(feats)
        for split in ("query", "gallery"):
            out[rule][split] = {**feats[split], "weights": feats[split]["weights"][:, i * parts:(i + 1) * parts]}
    return out


def features(run_dir: Path, data_dir: str, sharpen: list[float], workers: int, device) -> dict:
    model, opts, _ = load_model(run_dir)
    if not model.region:
        raise UserError(f"--runs {run_dir}: a {opts['weighting']}/{opts['head']} run; this needs --head region")
    data = datasets.load_dataset(data_dir, need=("query", "gallery"))
    net = AllRules(model.eval(), sharpen)
    feats, _ = features_of(net, opts, data, device=device, workers=workers)
    return rule_features(feats, rule_names(sharpen), model.parts)


def measure(feats: dict, truth: dict) -> dict:
    """weight_power.measure at power 1, plus how many images have no part mass at all (every
    location "hidden"; their weights do not sum to 1 and their distances mean nothing)."""
    empty = sum(int((feats[s]["weights"].sum(1) < 0.5).sum()) for s in ("query", "gallery"))
    return {**weight_power.measure(feats, truth, 1.0), "no_mass_images": empty}


def _line(split: str, run: str, rule: str, row: dict) -> str:
    return (f"{split} {run} {rule}: all {100 * row['all_mAP']:.1f} partial {100 * row['partial_mAP']:.1f} "
            f"whole {100 * row['whole_mAP']:.1f} mAP, weight x P outside the view {row['outside_view']:.3f}, "
            f"{row['no_mass_images']} image(s) without part mass")


def run(args) -> dict:
    if any(s <= 0 for s in args.sharpen):
        raise UserError(f"--sharpen {args.sharpen}: every factor must be above 0 (argmax is always measured)")
    device = select_device(args.device)

    def measure_run(r: Path, data_dir: str, truth: dict, rules: list) -> dict:
        f = features(r, data_dir, args.sharpen, args.workers, device)
        return {rule: {"rule": rule, **measure(f[rule], truth)} for rule in rules}
    return weight_power.validate_then_test(args, rule_names(args.sharpen), SOFT, measure_run, _line)


def build_parser() -> argparse.ArgumentParser:
    ap = weight_power.protocol_parser(__doc__, "--head region", "mass rule")
    ap.add_argument("--sharpen", type=float, nargs="*", default=[0.5, 0.25],
                    help="membership temperature factors s < 1 to try (argmax is the limit s -> 0)")
    ap.add_argument("--device", default="auto")
    return ap


@cli
def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
