"""Sharpened part weights at test time: w_i^g / sum_j w_j^g, chosen on validation.

    .venv/bin/python bench/weight_power.py --runs RUNS_DIR/awpcn_s0 RUNS_DIR/awpcn_s1 ... \\
        --val_partial ~/awpcn-bench/market_val_partial --partial ~/awpcn-bench/market_partial \\
        --powers 1 1.5 2 3 --json bench/results/partial/weight_power.json

A region-head run's weight for a part its query does not show is that part's predicted mass,
small but not zero. Raising every weight to a power g > 1 (and renormalising) pushes such
parts further toward zero without touching the features. For each run and power, on the
validation partial-view benchmark (prepare.py --partial --val_ids): mAP of partial, whole and
all queries and the mean weight x P of the parts outside a partial query's view. The power
with the best mean validation mAP over all queries is chosen; with ``--partial`` the test
benchmark is then evaluated at g = 1 and at the chosen g only. Features are extracted once
per run and benchmark; the powers are applied to the saved weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import accuracy  # noqa: E402
import datasets  # noqa: E402
from utils import UserError, atomic_write_text, cli  # noqa: E402


def sharpened(feats: dict, power: float) -> dict:
    """feats with every image's weights (N, P) raised to ``power`` and renormalised."""
    out = {}
    for split in ("query", "gallery"):
        w = feats[split]["weights"].double().clamp_min(0) ** power
        out[split] = {**feats[split], "weights": (w / w.sum(1, keepdim=True).clamp_min(1e-30)).float()}
    return out


def measure(feats: dict, truth: dict, power: float) -> dict:
    """mAP of partial / whole / all queries and weight x P outside the view, at one power."""
    f = sharpened(feats, power)
    views = accuracy.split_by_view(f, truth, "adaptive")
    return {"power": power, "partial_mAP": views["partial"]["mAP"], "whole_mAP": views["whole"]["mAP"],
            "all_mAP": accuracy.metrics_from_features(f, "adaptive")["mAP"],
            "partial_rank1": views["partial"]["rank1"],
            "outside_view": accuracy.view_weight_summary(f, truth)["outside_view"]}


def _line(split: str, run: str, power: float, row: dict) -> str:
    return (f"{split} {run} power {power:g}: all {100 * row['all_mAP']:.1f} partial "
            f"{100 * row['partial_mAP']:.1f} whole {100 * row['whole_mAP']:.1f} mAP, weight x P outside the view "
            f"{row['outside_view']:.3f}")


def finished_runs(paths: list[str]) -> list[Path]:
    runs = [Path(r).expanduser() for r in paths]
    for r in runs:
        if not (r / "last.pt").is_file():
            raise UserError(f"--runs {r}: no last.pt there; pass a finished run folder")
    return runs


def validate_then_test(args, options: list, baseline, measure_run: Callable, line: Callable,
                       prefer: Callable = lambda option: 0) -> dict:
    """The protocol of the test-time choices (this script, region_mass.py). ``measure_run(run,
    data_dir, truth, options)`` -> {option: row} (rows as :func:`measure` returns them, each
    naming its option). Every run is measured on ``args.val_partial``; the option with the
    best mean mAP over all queries is chosen (ties: ``baseline``, then ``prefer``); with
    ``args.partial`` the test benchmark is measured at ``baseline`` and the chosen option
    only. The record (rows as lists, in ``options`` order) goes to ``args.json``."""
    runs = finished_runs(args.runs)
    rec = {"runs": [str(r) for r in runs], "val_partial": args.val_partial, "val": {}}
    val_truth, val = datasets.partial_truth(args.val_partial), {}
    for r in runs:
        val[r.name] = measure_run(r, args.val_partial, val_truth, options)
        rec["val"][r.name] = list(val[r.name].values())
        for option, row in val[r.name].items():
            print(line("val", r.name, option, row))
    mean_all = {o: statistics.mean(val[r.name][o]["all_mAP"] for r in runs) for o in options}
    chosen = max(options, key=lambda o: (mean_all[o], o == baseline, prefer(o)))
    rec["chosen"] = chosen
    print(f"chosen on validation (mean mAP of all queries): {chosen}")
    if args.partial:
        truth = datasets.partial_truth(args.partial)
        rec["partial"], rec["test"] = args.partial, {}
        for r in runs:
            rows = measure_run(r, args.partial, truth, list(dict.fromkeys([baseline, chosen])))
            rec["test"][r.name] = list(rows.values())
            for option, row in rows.items():
                print(line("test", r.name, option, row))
    if args.json:
        atomic_write_text(args.json, json.dumps(rec, indent=1) + "\n")
        print(f"wrote {args.json}")
    return rec


def run(args) -> dict:
    if any(p <= 0 for p in args.powers):
        raise UserError(f"--powers {args.powers}: every power must be above 0")

    def measure_run(r: Path, data_dir: str, truth: dict, powers: list) -> dict:
        f = accuracy._test_features(r.name, r.parent, args.workers, data_dir)
        return {p: measure(f, truth, p) for p in powers}
    return validate_then_test(args, args.powers, 1.0, measure_run, _line, prefer=lambda p: -abs(p - 1))


def protocol_parser(doc: str, runs: str, choice: str) -> argparse.ArgumentParser:
    """The arguments of :func:`validate_then_test` (this script, region_mass.py): ``runs``
    says which runs fit, ``choice`` what validation chooses."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help=f"finished run folders ({runs})")
    ap.add_argument("--val_partial", required=True,
                    help=f"prepare.py --partial --val_ids benchmark: where the {choice} is chosen")
    ap.add_argument("--partial", default=None,
                    help=f"the test benchmark (prepare.py --partial), touched at the chosen {choice}")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", default="", help="where to write every figure ('': nowhere)")
    return ap


def build_parser() -> argparse.ArgumentParser:
    ap = protocol_parser(__doc__, "adaptive weights", "power g")
    ap.add_argument("--powers", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    return ap


@cli
def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
