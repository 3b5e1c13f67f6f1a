"""Global vs PCB vs AWPCN: same data, seed, schedule and backbone; several seeds.

    python bench/accuracy.py --data_dir ../shared/data/market1501-sub --out bench/out/market \
        --seeds 0 1 2 [--preset cpu] [any train.py flag after --, e.g. -- --epochs 30]

Variants: (a) global = one stripe (P=1), (b) PCB = P=6 uniform weights, (c) AWPCN = P=6
adaptive weights; the AWPCN checkpoint is also evaluated with uniform weights (test-time
ablation). Prints and writes OUT/results.md (mean ± std over seeds), OUT/results.json
(every run) and OUT/curves.png (training curves). Finished runs are reused, so an
interrupted benchmark continues where it stopped; --report tabulates them without
training. On a dataset with OUT_DIR/occlusion.json (the synthetic set) it also reports the
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
from utils import UserError, atomic_write_text, cli, load_checkpoint, load_features, save_figure  # noqa: E402

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


def occlusion_truth(data_root: Path) -> dict | None:
    """The generator's occlusion.json (``height``, ``images``: relative path -> hidden rows)
    with the dataset root added, or None for a dataset without one (real data)."""
    gt_file = data_root / "occlusion.json"
    if not gt_file.is_file():
        return None
    return {**json.loads(gt_file.read_text()), "root": data_root.resolve()}


def _relative(path: str, truth: dict) -> str:
    return str(Path(path).resolve().relative_to(truth["root"]))


def occlusion_report(feats: dict, truth: dict) -> dict:
    """Mean learned weight x P (1.0 = uniform) of occluded and visible stripes, from the
    generator's ground truth."""
    occ, vis_on_occ, clean = [], [], []
    for split in ("query", "gallery"):
        s = feats[split]
        parts = s["weights"].shape[1]
        for path, w in zip(s["paths"], s["weights"]):
            rows = truth["images"].get(_relative(path, truth))
            w = (w * parts).tolist()
            if not rows:
                clean.extend(w)
                continue
            frac = datasets.occlusion_fraction(tuple(rows), truth["height"], parts)
            for wi, fi in zip(w, frac):
                (occ if fi >= 0.5 else vis_on_occ if fi == 0 else []).append(wi)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"occluded_stripes": mean(occ), "visible_stripes_of_occluded_images": mean(vis_on_occ),
            "stripes_of_clean_images": mean(clean)}


def metrics_from_features(feats: dict, weighting: str, keep: torch.Tensor | None = None) -> dict:
    """Metrics of saved features (``keep``: a boolean mask over queries), with the learned or
    uniform part weights."""
    q, g = feats["query"], feats["gallery"]
    keep = torch.ones(len(q["pids"]), dtype=torch.bool) if keep is None else keep
    qw, gw = evaluate.weights_for(weighting, q["weights"][keep], g["weights"])
    res = evaluate.evaluate_features(q["emb"][keep], qw, g["emb"], gw, q["pids"][keep], g["pids"],
                                     q["cams"][keep], g["cams"])
    return {m: float(res[m]) for m in METRICS}


def occluded_query_metrics(feats: dict, truth: dict, weighting: str) -> dict | None:
    """Metrics over the queries that the generator occluded (None if there are none)."""
    keep = torch.tensor([bool(truth["images"].get(_relative(p, truth))) for p in feats["query"]["paths"]])
    return metrics_from_features(feats, weighting, keep) if keep.any() else None


def run_one(variant: str, seed: int, args, test_mod) -> dict:
    name = f"{variant}_s{seed}"
    runs_dir = Path(args.out) / "runs"
    done = runs_dir / name / "bench.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if not _made_with(record, args):
            raise UserError(f"{done}: this run was made with preset {record['preset']!r} and train.py flags "
                            f"{record['train_args']}, not {args.preset!r} and {args.train_args}; pass the "
                            "same flags or another --out")
        return record
    t0 = time.perf_counter()
    opts = train.parse_opts(["--data_dir", args.data_dir, "--runs_dir", str(runs_dir), "--name", name,
                             "--preset", args.preset, "--seed", str(seed), "--overwrite",
                             *VARIANTS[variant], *args.train_args])
    train.train(opts)
    t_train = time.perf_counter() - t0
    record = {"variant": variant, "seed": seed, "train_seconds": t_train, "preset": args.preset,
              "train_args": args.train_args}
    # One extraction per run: the uniform-at-test ablation reuses the saved features (the part
    # embeddings do not depend on the weighting; only the weights are replaced).
    targs = ["--name", name, "--runs_dir", str(runs_dir), "--workers", str(args.workers)]
    res = test_mod.run_test(test_mod.build_parser().parse_args(targs))["plain"]
    record["learned"] = {m: float(res[m]) for m in METRICS}
    feats = load_features(runs_dir / name)
    if variant == "awpcn":
        record["uniform_at_test"] = metrics_from_features(feats, "uniform")
    truth = occlusion_truth(Path(feats["data_root"]))
    if truth:
        for label, weighting in (("learned", opts["weighting"]), ("uniform_at_test", "uniform")):
            occ_q = occluded_query_metrics(feats, truth, weighting) if label in record else None
            if occ_q:
                record[label + "_occluded_queries"] = occ_q
        if variant == "awpcn":
            record["weights"] = occlusion_report(feats, truth)
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def _made_with(record: dict, args) -> bool:
    """Whether a finished run was made with this preset and these train.py flags (runs from
    before the bench recorded them count as made with any)."""
    return (record.get("preset", args.preset), record.get("train_args", args.train_args)) == \
        (args.preset, args.train_args)


def finished_runs(args) -> list[dict]:
    """Records of OUT's finished runs made with this preset and these train.py flags, in
    (seed, variant) order; runs of another configuration are left out, and said so."""
    records, other = [], []
    for f in sorted((Path(args.out) / "runs").glob("*/bench.json")):
        r = json.loads(f.read_text())
        (records if _made_with(r, args) and r["variant"] in args.variants else other).append(r)
    if other:
        print(f"left out {len(other)} finished runs of other variants or flags: "
              + ", ".join(f"{r['variant']}_s{r['seed']}" for r in other))
    order = list(VARIANTS)
    return sorted(records, key=lambda r: (r["seed"], order.index(r["variant"])))


def paired_difference(records: list[dict], key: str) -> str | None:
    """'AWPCN − PCB' in mAP and Rank-1 points over the seeds that have both, or None."""
    by = {(r["variant"], r["seed"]): r for r in records if key in r}
    seeds = sorted(s for v, s in by if v == "awpcn" and ("pcb", s) in by)
    if not seeds:
        return None
    d = {m: [by["awpcn", s][key][m] - by["pcb", s][key][m] for s in seeds] for m in ("mAP", "rank1")}
    return (f"AWPCN − PCB, paired by seed ({','.join(map(str, seeds))}): mAP {_ms(d['mAP'], signed=True)}, "
            f"Rank-1 {_ms(d['rank1'], signed=True)} points.")


def plot_curves(records: list[dict], runs_dir: Path, path: Path) -> None:
    """Training curves of every run (part CE and fused-logit accuracy per epoch), one colour per
    variant, read from each run's last.pt history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"global": "tab:gray", "pcb": "tab:blue", "awpcn": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labelled = set()
    for r in records:
        ckpt = runs_dir / f"{r['variant']}_s{r['seed']}" / "last.pt"
        if not ckpt.is_file():
            continue
        hist = load_checkpoint(ckpt)["history"]
        ep = [h["epoch"] for h in hist]
        label = None if r["variant"] in labelled else r["variant"]
        labelled.add(r["variant"])
        ax1.plot(ep, [h["part_ce"] for h in hist], color=colours[r["variant"]], marker="o", ms=3, label=label)
        ax2.plot(ep, [100 * h["acc"] for h in hist], color=colours[r["variant"]], marker="o", ms=3, label=label)
    ax1.set_xlabel("epoch"), ax1.set_ylabel("mean per-part cross-entropy"), ax1.grid(alpha=0.3), ax1.legend()
    ax2.set_xlabel("epoch"), ax2.set_ylabel("train accuracy of fused logits (%)"), ax2.grid(alpha=0.3)
    fig.suptitle("training curves, one line per seed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def _ms(values, signed: bool = False) -> str:
    """Fractions as points: "mean ± std" over seeds, just the value for one seed."""
    values = [100 * v for v in values]
    mean = f"{statistics.mean(values):{'+' if signed else ''}.1f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.1f}"


def markdown(records: list[dict], args) -> str:
    rows = [("global (P=1)", "global", "learned"), ("PCB (P=6, uniform)", "pcb", "learned"),
            ("AWPCN (P=6, adaptive)", "awpcn", "learned"),
            ("AWPCN checkpoint, uniform weights at test", "awpcn", "uniform_at_test")]
    flags = f" {' '.join(args.train_args)}" if args.train_args else ""
    out = [f"Dataset `{args.data_dir}`, preset `{args.preset}`{flags}; mean ± std over the seeds listed, "
           "AP formula: official.", ""]
    for suffix, title in (("", "all queries"), ("_occluded_queries", "occluded queries only")):
        if not any("learned" + suffix in r for r in records):
            continue
        out += [f"**{title}**", "", "| variant | seeds | Rank-1 | Rank-5 | mAP | mINP |",
                "| --- | --- | --- | --- | --- | --- |"]
        for label, variant, key in rows:
            rs = [r for r in records if r["variant"] == variant and (key + suffix) in r]
            if rs:
                seeds_txt = ",".join(str(r["seed"]) for r in rs)
                out.append(f"| {label} | {seeds_txt} | "
                           + " | ".join(_ms([r[key + suffix][m] for r in rs]) for m in METRICS) + " |")
        out.append("")
        diff = paired_difference(records, "learned" + suffix)
        if diff:
            out += [diff, ""]
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
    ap.add_argument("--report", action="store_true",
                    help="train nothing: tabulate every finished run in OUT made with these train.py flags")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra train.py flags for every run")
    args = ap.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    if args.report:
        records = finished_runs(args)
        if not records:
            raise UserError(f"{args.out}: no finished run made with preset {args.preset!r} and train.py flags "
                            f"{args.train_args}; run without --report first")
    else:
        test_mod = _test_module()
        records = []
        for seed in args.seeds:
            for variant in args.variants:
                print(f"=== {variant} seed {seed}", flush=True)
                records.append(run_one(variant, seed, args, test_mod))
    text = markdown(records, args)
    atomic_write_text(Path(args.out) / "results.md", text)
    atomic_write_text(Path(args.out) / "results.json", json.dumps(records, indent=1))
    plot_curves(records, Path(args.out) / "runs", Path(args.out) / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
