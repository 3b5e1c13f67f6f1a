"""Global vs PCB vs AWPCN: same data, seed, schedule and backbone; several seeds.

    python bench/accuracy.py --data_dir ../shared/data/market1501-sub --out bench/out/market \
        --seeds 0 1 2 [--preset cpu] [any train.py flag after --, e.g. -- --epochs 30]

Variants: (a) global = one stripe (P=1), (b) PCB = P=6 uniform weights, (c) AWPCN = P=6
adaptive weights; the AWPCN checkpoint is also evaluated with uniform weights (test-time
ablation). Prints and writes OUT/results.md (mean ± std over seeds) and OUT/results.json
(every run). Finished runs are reused, so an interrupted benchmark continues where it
stopped. On a dataset with OUT_DIR/occlusion.json (the synthetic set) it also reports the
mean learned weight of occluded and of visible stripes, and metrics on occluded queries.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import datasets  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from utils import atomic_write_text, cli, load_features  # noqa: E402

VARIANTS = {
    "global": ["--parts", "1", "--weighting", "uniform"],
    "pcb": ["--parts", "6", "--weighting", "uniform"],
    "awpcn": ["--parts", "6", "--weighting", "adaptive"],
}
METRICS = ("rank1", "rank5", "mAP", "mINP")


def _test_module():
    # test.py by path: "import test" could find the standard library's test package.
    spec = importlib.util.spec_from_file_location("awpcn_test_py", REPO / "test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def occlusion_report(feats: dict, data_root: Path) -> dict | None:
    """Mean learned weight x P (1.0 = uniform) of occluded and visible stripes, from the
    generator's ground truth; None when the dataset has no occlusion.json."""
    gt_file = data_root / "occlusion.json"
    if not gt_file.is_file():
        return None
    gt = json.loads(gt_file.read_text())
    height, images = gt["height"], gt["images"]
    occ, vis_on_occ, clean = [], [], []
    for split in ("query", "gallery"):
        s = feats[split]
        parts = s["weights"].shape[1]
        for path, w in zip(s["paths"], s["weights"]):
            rows = images.get(str(Path(path).resolve().relative_to(data_root.resolve())))
            w = (w * parts).tolist()
            if not rows:
                clean.extend(w)
                continue
            frac = datasets.occlusion_fraction(tuple(rows), height, parts)
            for wi, fi in zip(w, frac):
                (occ if fi >= 0.5 else vis_on_occ if fi == 0 else []).append(wi)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"occluded_stripes": mean(occ), "visible_stripes_of_occluded_images": mean(vis_on_occ),
            "stripes_of_clean_images": mean(clean)}


def occluded_query_metrics(feats: dict, data_root: Path, weighting: str) -> dict | None:
    """Metrics over the queries that the generator occluded (None without ground truth)."""
    gt_file = data_root / "occlusion.json"
    if not gt_file.is_file():
        return None
    images = json.loads(gt_file.read_text())["images"]
    q, g = feats["query"], feats["gallery"]
    keep = torch.tensor([bool(images.get(str(Path(p).resolve().relative_to(data_root.resolve()))))
                         for p in q["paths"]])
    if not keep.any():
        return None
    qw, gw = q["weights"][keep], g["weights"]
    if weighting == "uniform":
        qw, gw = torch.full_like(qw, 1 / qw.shape[1]), torch.full_like(gw, 1 / gw.shape[1])
    res = evaluate.evaluate_features(q["emb"][keep], qw, g["emb"], gw, q["pids"][keep], g["pids"],
                                     q["cams"][keep], g["cams"])
    return {m: float(res[m]) for m in METRICS}


def run_one(variant: str, seed: int, args, test_mod) -> dict:
    name = f"{variant}_s{seed}"
    runs_dir = Path(args.out) / "runs"
    done = runs_dir / name / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    opts = train.parse_opts(["--data_dir", args.data_dir, "--runs_dir", str(runs_dir), "--name", name,
                             "--preset", args.preset, "--seed", str(seed), "--overwrite",
                             *VARIANTS[variant], *args.train_args])
    train.train(opts)
    t_train = time.perf_counter() - t0
    record = {"variant": variant, "seed": seed, "train_seconds": t_train}
    evals = [("learned", None)] if variant != "awpcn" else [("learned", None), ("uniform_at_test", "uniform")]
    for label, weighting in evals:
        targs = ["--name", name, "--runs_dir", str(runs_dir), "--workers", str(args.workers)]
        if weighting:
            targs += ["--weighting", weighting]
        res = test_mod.run_test(test_mod.build_parser().parse_args(targs))["plain"]
        record[label] = {m: float(res[m]) for m in METRICS}
        feats = load_features(runs_dir / name)
        root = Path(feats["data_root"])
        occ_q = occluded_query_metrics(feats, root, weighting or opts["weighting"])
        if occ_q:
            record[label + "_occluded_queries"] = occ_q
        if label == "learned" and variant == "awpcn":
            rep = occlusion_report(feats, root)
            if rep:
                record["weights"] = rep
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def _ms(values) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(records: list[dict], args) -> str:
    rows = [("global (P=1)", "global", "learned"), ("PCB (P=6, uniform)", "pcb", "learned"),
            ("AWPCN (P=6, adaptive)", "awpcn", "learned"),
            ("AWPCN checkpoint, uniform weights at test", "awpcn", "uniform_at_test")]
    seeds = sorted({r["seed"] for r in records})
    out = [f"Dataset `{args.data_dir}`, preset `{args.preset}` {' '.join(args.train_args)}, "
           f"seeds {seeds}; mean ± std over seeds, AP formula: official.", ""]
    for suffix, title in (("", "all queries"), ("_occluded_queries", "occluded queries only")):
        got = [r for r in records if (r.get("learned" + suffix) if r["variant"] != "awpcn"
                                      else r.get("learned" + suffix))]
        if not got:
            continue
        out += [f"**{title}**", "", "| variant | Rank-1 | Rank-5 | mAP | mINP |", "| --- | --- | --- | --- | --- |"]
        for label, variant, key in rows:
            rs = [r[key + suffix] for r in records if r["variant"] == variant and (key + suffix) in r]
            if rs:
                out.append(f"| {label} | " + " | ".join(_ms([x[m] for x in rs]) for m in METRICS) + " |")
        out.append("")
    ws = [r["weights"] for r in records if "weights" in r]
    if ws:
        out += ["**AWPCN learned part weights × P (1.0 = uniform)**", "",
                "| stripes | mean weight × P |", "| --- | --- |"]
        for key, label in (("occluded_stripes", "occluded (≥ half hidden)"),
                           ("visible_stripes_of_occluded_images", "visible, on occluded images"),
                           ("stripes_of_clean_images", "all, on clean images")):
            vals = [w[key] for w in ws]
            out.append(f"| {label} | {statistics.mean(vals):.3f}"
                       + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "") + " |")
        out.append("")
    secs = [r["train_seconds"] for r in records]
    out.append(f"Training time per run: {statistics.mean(secs) / 60:.1f} min on average.")
    return "\n".join(out) + "\n"


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--out", required=True, help="folder for runs, results.md and results.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra train.py flags for every run")
    args = ap.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    test_mod = _test_module()
    records = []
    for seed in args.seeds:
        for variant in args.variants:
            print(f"=== {variant} seed {seed}", flush=True)
            records.append(run_one(variant, seed, args, test_mod))
    text = markdown(records, args)
    atomic_write_text(Path(args.out) / "results.md", text)
    atomic_write_text(Path(args.out) / "results.json", json.dumps(records, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
