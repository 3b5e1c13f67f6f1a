"""Global vs PCB vs AWPCN: same data, seed, schedule and backbone; several seeds.

    python bench/accuracy.py --data_dir ../shared/data/market1501-sub --out bench/out/market \
        --seeds 0 1 2 [--preset cpu] [any train.py flag after --, e.g. -- --epochs 30]

Variants: (a) global = one stripe (P=1), (b) PCB = P=6 uniform weights, (c) AWPCN = P=6
adaptive weights; the AWPCN checkpoint is also evaluated with uniform weights (test-time
ablation). Prints and writes OUT/results.md (mean ± std over seeds), OUT/results.json
(every run) and OUT/curves.png (training curves). Finished runs are reused (also a run
trained by hand with the same flags), so an interrupted benchmark continues where it
stopped; --report tabulates them without training.

Fair comparison: with ``-- --val_ids 0.15`` every run holds 15 % of the training ids out
as a validation set and is evaluated there only; the test split is touched once, with
--final, for the configuration chosen on validation. ``--compare OUT1 OUT2 ...`` tabulates
the validation results of several configurations (e.g. learning rates) and names the best
per variant. ``--occluded DIR`` (with --final) also evaluates on an occlusion benchmark made
by ``prepare.py --occlude``: clean and occluded queries separately, learned and uniform
weights, and the learned weight x P of occluded and visible stripes. ``--partial DIR`` (with
--final) and ``--val_partial DIR`` do the same for a partial-view benchmark made by
``prepare.py --partial``: partial and whole queries, and for the region head the same
checkpoint with fixed stripes and uniform weights, and the weight x P of the body parts a
partial query does not show.
On a dataset with occlusion.json (the synthetic set) the same split is made on its test set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import datasets  # noqa: E402
import evaluate  # noqa: E402
import inference  # noqa: E402
import results  # noqa: E402
import train  # noqa: E402
from utils import UserError, atomic_write_text, cli, load_checkpoint, load_yaml, save_figure  # noqa: E402

VARIANTS = {
    "global": ["--parts", "1", "--weighting", "uniform"],
    "pcb": ["--parts", "6", "--weighting", "uniform"],
    "awpcn": ["--parts", "6", "--weighting", "adaptive"],
}
METRICS = ("rank1", "rank5", "mAP", "mINP")


# A stripe is "occluded" when at least half of it is hidden and "visible" when under 5 % is;
# every weight and contamination figure uses these two thresholds.
HIDDEN_STRIPE, VISIBLE_STRIPE = 0.5, 0.05


def stripe_classes(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, P) hidden fraction of each stripe -> (occluded, visible) (N, P) bool masks."""
    return hidden >= HIDDEN_STRIPE, hidden < VISIBLE_STRIPE


def weight_summary(wp: torch.Tensor, hidden: torch.Tensor, occluded_image: torch.Tensor) -> dict:
    """Mean weight x P (1.0 = uniform) of occluded stripes, of visible stripes of occluded
    images and of clean images, and the clean images' spread (mean |weight x P - 1|, share
    within 1 ± 0.05: their mean is 1 by construction, weights summing to one).

    wp: (N, P) weight x P; hidden: (N, P) hidden fraction of each stripe; occluded_image: (N,) bool.
    """
    occ, vis = stripe_classes(hidden)
    img = occluded_image.view(-1, 1).expand_as(wp)
    clean = wp[~img]
    mean = lambda t: float(t.mean()) if t.numel() else float("nan")  # noqa: E731
    return {"occluded_stripes": mean(wp[occ & img]), "visible_stripes_of_occluded_images": mean(wp[vis & img]),
            "stripes_of_clean_images": mean(clean),
            "clean_mean_abs_deviation": mean((clean - 1).abs()),
            "clean_within_0.05": mean(((clean - 1).abs() <= 0.05).float())}


def occlusion_report(feats: dict, truth: dict, feat_rows: int | None = None) -> dict:
    """:func:`weight_summary` of the learned weights of a benchmark's query and gallery images
    against its ground truth; stripes pooled over the rows the model pools (``feat_rows``:
    its map height)."""
    wp, hidden, occluded = [], [], []
    for split in ("query", "gallery"):
        s = feats[split]
        parts = s["weights"].shape[1]
        wp.append(s["weights"].float() * parts)
        for path in s["paths"]:
            entry = datasets.occluded_rows(truth, path)
            hidden.append(datasets.stripe_hidden(entry, parts, truth.get("height", 0), feat_rows))
            occluded.append(bool(entry))
    return weight_summary(torch.cat(wp), torch.tensor(hidden), torch.tensor(occluded, dtype=torch.bool))


def true_visibility(feats: dict, truth: dict, feat_rows: int | None) -> torch.Tensor:
    """(Q, P) ground-truth visible fraction of each query stripe (1 on clean queries), pooled
    over the rows the model pools: the weights a perfect visibility head would give."""
    q = feats["query"]
    parts = q["weights"].shape[1]
    return torch.tensor([[1 - h for h in datasets.stripe_hidden(datasets.occluded_rows(truth, p), parts,
                                                                 truth.get("height", 0), feat_rows)]
                         for p in q["paths"]])


def metrics_from_features(feats: dict, weighting: str, keep: torch.Tensor | None = None,
                          query_weights: torch.Tensor | None = None) -> dict:
    """Metrics of saved features (``keep``: a boolean mask over queries), with the learned or
    uniform part weights, or with ``query_weights`` (Q, P) for the queries and uniform ones
    for the gallery (the oracle ablation)."""
    q, g = feats["query"], feats["gallery"]
    keep = torch.ones(len(q["pids"]), dtype=torch.bool) if keep is None else keep
    qw, gw = evaluate.weights_for(weighting, q["weights"][keep], g["weights"])
    if query_weights is not None:
        qw, gw = query_weights[keep], torch.ones_like(g["weights"])
    res = evaluate.evaluate_features(q["emb"][keep], qw, g["emb"], gw, q["pids"][keep], g["pids"],
                                     q["cams"][keep], g["cams"])
    return {m: float(res[m]) for m in METRICS}


def split_by_occlusion(feats: dict, truth: dict, weighting: str, query_weights: torch.Tensor | None = None) -> dict:
    """{'occluded': metrics over occluded queries, 'clean': over the others} (a key is left
    out when it has no query)."""
    occluded = torch.tensor([bool(datasets.occluded_rows(truth, p)) for p in feats["query"]["paths"]])
    out = {}
    for key, keep in (("occluded", occluded), ("clean", ~occluded)):
        if keep.any():
            out[key] = metrics_from_features(feats, weighting, keep, query_weights)
    return out


def occlusion_benchmark(feats: dict, truth: dict, opts: dict, data: str, originals: dict | None = None) -> dict:
    """Everything measured on an occlusion benchmark (prepare.py --occlude): metrics of clean
    and occluded queries with the run's weights, and for P > 1 with uniform weights and with
    the ground-truth visibility as query weights (the oracle: what perfect weights could
    add to these features), plus, for AWPCN, its weights against the ground truth.
    ``originals`` (the occluded queries' un-occluded originals, :func:`contamination`) adds
    where the loss comes from."""
    rec = {"data": data, "learned": split_by_occlusion(feats, truth, opts["weighting"])}
    rows = _feat_rows(opts)
    if int(opts["parts"]) > 1:
        rec["uniform_at_test"] = split_by_occlusion(feats, truth, "uniform")
        rec["oracle_weights"] = split_by_occlusion(feats, truth, "uniform", true_visibility(feats, truth, rows))
    if opts["weighting"] == "adaptive":
        rec["weights"] = occlusion_report(feats, truth, rows)
    if originals is not None and int(opts["parts"]) > 1:
        rec["contamination"] = contamination(feats, truth, rows, originals)
    return rec


def contamination(feats: dict, truth: dict, feat_rows: int, originals: torch.Tensor) -> dict:
    """Where occluded queries lose their accuracy, uniform weights, occluded queries only.

    originals (Q, P, D): embeddings of every query's un-occluded original (the benchmark's
    source image). ``original`` / ``occluded``: mAP of the originals and of the occluded
    images; ``*_visible_only``: the same with only the stripes the occluder leaves visible
    (< 5 % hidden) — original_visible_only is what dropping the hidden stripes costs by
    itself, the gap to occluded_visible_only is what the occluder does to the stripes it does
    not cover. ``cos_visible`` / ``cos_hidden``: mean cosine between a stripe of the occluded
    image and the same stripe of its original.
    """
    q = feats["query"]
    occluded = torch.tensor([bool(datasets.occluded_rows(truth, p)) for p in q["paths"]])
    vis = true_visibility(feats, truth, feat_rows)
    visible = stripe_classes(1 - vis)[1].float()
    # 1e-6: a stripe left out, not a query with no stripe at all (the distance would be 1)
    only = visible + 1e-6
    swapped = {**feats, "query": {**q, "emb": originals}}
    cos = torch.nn.functional.cosine_similarity(q["emb"][occluded], originals[occluded], dim=-1)
    keep = visible[occluded].bool()
    return {"original": metrics_from_features(swapped, "uniform", occluded),
            "occluded": metrics_from_features(feats, "uniform", occluded),
            "original_visible_only": metrics_from_features(swapped, "uniform", occluded, only),
            "occluded_visible_only": metrics_from_features(feats, "uniform", occluded, only),
            "cos_visible": float(cos[keep].mean()),
            "cos_hidden": float(cos[stripe_classes(1 - vis[occluded])[0]].mean())}


def originals_of(feats: dict, bench_dir: str, run_dir: Path) -> torch.Tensor:
    """(Q, P, D) embeddings of the benchmark's queries as they were before occlusion (the
    files of the same name in its source, occlusion.json's "source"/"originals"), extracted
    as test.py extracts; clean queries are their own originals, so only the occluded ones
    are extracted."""
    import inference

    truth = datasets.occlusion_truth(bench_dir)
    src = Path(truth["source"]) / truth.get("originals", datasets.SPLITS["query"])
    paths = feats["query"]["paths"]
    occluded = [i for i, p in enumerate(paths) if datasets.occluded_rows(truth, p)]
    ext = inference.Extractor.from_run(run_dir, device="cpu")
    emb, _, bad = ext.extract_files([src / Path(paths[i]).name for i in occluded], progress=False)
    if bad:
        raise UserError(f"{src}: {len(bad)} originals of {bench_dir}'s queries are missing or unreadable "
                        f"(first: {bad[0]}); rebuild the benchmark from its source")
    out = feats["query"]["emb"].clone()
    out[occluded] = emb
    return out


def split_by_view(feats: dict, truth: dict, weighting: str) -> dict:
    """{'partial': metrics over the partial queries, 'whole': over the others, and one key per
    kind of view ('top', 'bottom', 'side')}; a key is left out when it has no query."""
    views = [datasets.partial_view(truth, p) for p in feats["query"]["paths"]]
    groups = {"partial": [bool(v) for v in views], "whole": [not v for v in views]}
    for kind in datasets.PARTIAL_KINDS:
        groups[kind] = [bool(v) and v["kind"] == kind for v in views]
    return {key: metrics_from_features(feats, weighting, torch.tensor(keep))
            for key, keep in groups.items() if any(keep)}


def view_weight_summary(feats: dict, truth: dict) -> dict:
    """Mean learned weight x P (1.0 = uniform) of the parts a partial query does not show (its
    view keeps under 5 % of that band of the body), of those it shows whole (over 95 %), and
    of every part of the whole queries."""
    q = feats["query"]
    parts = q["weights"].shape[1]
    wp = q["weights"] * parts
    views = [datasets.partial_view(truth, p) for p in q["paths"]]
    shown = torch.tensor([datasets.parts_shown(v["box"] if v else None, parts) for v in views])
    partial = torch.tensor([bool(v) for v in views]).view(-1, 1).expand_as(wp)

    def mean(mask):
        return float(wp[mask].mean()) if mask.any() else float("nan")
    return {"outside_view": mean(partial & (shown < VISIBLE_STRIPE)),
            "inside_view": mean(partial & (shown > 1 - VISIBLE_STRIPE)),
            "whole_queries": mean(~partial)}


def partial_benchmark(feats: dict, truth: dict, opts: dict, data: str, fixed: dict | None = None) -> dict:
    """Everything measured on a partial-view benchmark (prepare.py --partial): metrics of
    partial and whole queries with the run's weights, for P > 1 with uniform weights, and
    with ``fixed`` (the same checkpoint's features with fixed stripes, region head) the
    fixed-stripe ablation; the learned weights against the parts each view shows."""
    rec = {"data": data, "learned": split_by_view(feats, truth, opts["weighting"])}
    if int(opts["parts"]) > 1:
        rec["uniform_at_test"] = split_by_view(feats, truth, "uniform")
    if fixed is not None:
        rec["fixed_stripes"] = split_by_view(fixed, truth, "uniform")
    if opts["weighting"] == "adaptive":
        rec["weights"] = view_weight_summary(feats, truth)
    return rec


def fixed_stripe_features(run_dir: Path, data_dir: str, workers: int) -> dict:
    """Features of a region-head run on ``data_dir`` with its fixed-stripe pooling (the model's
    ``fixed_stripes`` switch): what the same checkpoint gives without part alignment."""
    model, opts, _ = inference.load_model(run_dir)
    model.fixed_stripes = True
    data = datasets.load_dataset(data_dir, need=("query", "gallery"), log=lambda *_: None)
    return inference.features_of(model, opts, data, device=torch.device("cpu"), workers=workers)[0]


def _run_partial_benchmark(name: str, runs_dir: Path, workers: int, bench_dir: str, opts: dict) -> dict:
    feats = _test_features(name, runs_dir, workers, bench_dir)
    region = opts["weighting"] == "adaptive" and opts.get("head") == "region"
    fixed = fixed_stripe_features(runs_dir / name, bench_dir, workers) if region else None
    return partial_benchmark(feats, datasets.partial_truth(bench_dir), opts, str(bench_dir), fixed)


def _feat_rows(opts: dict) -> int:
    """Height of the trunk's map for the run's input: /16 with last stride 1, else /32."""
    return -(-int(opts["height"]) // (16 if int(opts.get("last_stride", 1)) == 1 else 32))


def _finished_history(run_dir: Path, opts: dict) -> list | None:
    """The training history of a finished run in ``run_dir`` made with ``opts`` (its model and
    training options; runtime ones such as --workers may differ), else None."""
    if not (run_dir / "last.pt").is_file() or not (run_dir / "opts.yaml").is_file():
        return None
    stored = load_yaml(run_dir / "opts.yaml")
    # An option newer than the run counts as given at its default (a run from before
    # --invariance existed is a run without it).
    defaults = vars(train.build_parser().parse_args([]))
    if not all(stored.get(k, defaults.get(k)) == v for k, v in opts.items() if k not in train.RUNTIME):
        return None
    ckpt = load_checkpoint(run_dir / "last.pt")
    return ckpt["history"] if int(ckpt["epoch"]) == int(opts["epochs"]) else None


def _test(name: str, runs_dir: Path, workers: int, *extra: str) -> tuple[dict, dict]:
    """test.py on the run (the learned weighting): its metrics, and the features they came
    from, so that other weightings are evaluated without extracting again."""
    args = results.build_parser().parse_args(["--name", name, "--runs_dir", str(runs_dir),
                                              "--workers", str(workers), *extra])
    out = results.run_test(args)
    return {m: float(out["plain"][m]) for m in METRICS}, out["features"]


def _bench_done(rec: dict | None, opts: dict) -> bool:
    """Whether an occlusion-benchmark record holds everything :func:`occlusion_benchmark`
    measures today (records of older versions get the missing rows by re-evaluating)."""
    if not rec:
        return False
    if int(opts["parts"]) > 1 and ("oracle_weights" not in rec or "contamination" not in rec):
        return False
    return opts["weighting"] != "adaptive" or "clean_mean_abs_deviation" in rec.get("weights", {})


def _test_features(name: str, runs_dir: Path, workers: int, data_dir: str) -> dict:
    """Features of the run on ``data_dir``; nothing of the run's (features.pt, cmc.png,
    result.txt: its test split's) is touched."""
    args = results.build_parser().parse_args(["--name", name, "--runs_dir", str(runs_dir), "--workers",
                                              str(workers), "--data_dir", str(data_dir)])
    return results.compute_features(args)[2]


def run_one(variant: str, seed: int, args) -> dict:
    name = f"{variant}_s{seed}"
    runs_dir = Path(args.out) / "runs"
    done = runs_dir / name / "bench.json"
    record = None
    if done.is_file():
        record = json.loads(done.read_text())
        if not _made_with(record, args, done.parent):
            raise UserError(f"{done}: this run was made with preset {record['preset']!r} and train.py flags "
                            f"{record['train_args']}, not {args.preset!r} and {args.train_args}; pass the "
                            "same flags or another --out")
    opts = train.parse_opts(["--data_dir", args.data_dir, "--runs_dir", str(runs_dir), "--name", name,
                             "--preset", args.preset, "--seed", str(seed), "--overwrite",
                             *VARIANTS[variant], *args.train_args])
    opts["data_dir"] = str(Path(opts["data_dir"]).expanduser().resolve())
    if record is None:
        hist = _finished_history(runs_dir / name, opts)
        if hist is None:
            hist = train.train(opts)["history"]
        record = {"variant": variant, "seed": seed, "preset": args.preset, "train_args": args.train_args,
                  "train_seconds": sum(h["seconds"] for h in hist), "final_acc": hist[-1]["acc"]}
        for key in ("vis_mae", "region_mae"):
            if key in hist[-1]:
                record[key] = [round(h[key], 4) for h in hist]
    adaptive = variant == "awpcn"
    if opts["val_ids"] and "val" not in record:
        record["val"], feats = _test(name, runs_dir, args.workers, "--split", "val")
        if adaptive:
            # The part embeddings do not depend on the weighting: only the weights are replaced.
            record["val_uniform"] = metrics_from_features(feats, "uniform")
    if args.val_occluded and not _bench_done(record.get("val_occ"), opts):
        feats = _test_features(name, runs_dir, args.workers, args.val_occluded)
        record["val_occ"] = occlusion_benchmark(feats, datasets.occlusion_truth(args.val_occluded), opts,
                                                str(args.val_occluded),
                                                originals_of(feats, args.val_occluded, runs_dir / name))
    if (args.final or not opts["val_ids"]) and args.occluded and not _bench_done(record.get("occ_bench"), opts):
        feats = _test_features(name, runs_dir, args.workers, args.occluded)
        record["occ_bench"] = occlusion_benchmark(feats, datasets.occlusion_truth(args.occluded), opts,
                                                  str(args.occluded),
                                                  originals_of(feats, args.occluded, runs_dir / name))
    if args.val_partial and "val_part" not in record:
        record["val_part"] = _run_partial_benchmark(name, runs_dir, args.workers, args.val_partial, opts)
    if (args.final or not opts["val_ids"]) and args.partial and "part_bench" not in record:
        record["part_bench"] = _run_partial_benchmark(name, runs_dir, args.workers, args.partial, opts)
    if (args.final or not opts["val_ids"]) and "learned" not in record:
        record["learned"], feats = _test(name, runs_dir, args.workers)
        if adaptive:
            record["uniform_at_test"] = metrics_from_features(feats, "uniform")
        truth = datasets.occlusion_truth(feats["data_root"])
        if truth:
            for label, weighting in (("learned", opts["weighting"]), ("uniform_at_test", "uniform")):
                if label in record:
                    occ_q = split_by_occlusion(feats, truth, weighting).get("occluded")
                    if occ_q:
                        record[label + "_occluded_queries"] = occ_q
            if adaptive:
                record["weights"] = occlusion_report(feats, truth, _feat_rows(opts))
    atomic_write_text(done, json.dumps(record, indent=1))
    if args.records:
        keep_record(runs_dir / name, Path(args.records) / name)
    return record


# What a finished run leaves that is small enough to commit: its figures stay traceable when
# the checkpoint (kept outside the work tree) is gone.
RECORD_FILES = ("bench.json", "opts.yaml", "train.log")


def keep_record(run_dir: Path, dest: Path) -> None:
    """Copy a finished run's :data:`RECORD_FILES` into ``dest`` (replacing an older copy)."""
    for f in RECORD_FILES:
        if (run_dir / f).is_file():
            atomic_write_text(dest / f, (run_dir / f).read_text(encoding="utf-8"))


def _train_settings(preset: str, train_args: list[str]) -> dict:
    """The training options a preset and train.py flags amount to, whatever the flags' order
    or spelling (``--lr 0.1`` = ``--lr=0.1``; a default typed out = left out)."""
    opts = train.parse_opts(["--preset", preset, *train_args])
    opts.pop("given")
    return opts


# Options that say where a run lives or how fast it ran, not what it learned (train.RUNTIME),
# and those the bench sets per run itself: the dataset and seed are its own arguments, and a
# preset only supplies values that are compared one by one.
_NOT_TRAINING = train.RUNTIME | {"data_dir", "seed", "preset"}


def _same_setting(key: str, had, want) -> bool:
    """One option of a finished run against today's. A weights file is the same file when its
    path differs only because it sits in another venv or checkout (the preset resolves the
    installed file): same name, and the same bytes wherever both are still on disk."""
    if had == want:
        return True
    if key != "weights" or not had or not want:
        return False
    a, b = Path(had), Path(want)
    if a.name != b.name:
        return False
    return not (a.is_file() and b.is_file()) or a.read_bytes() == b.read_bytes()


def _made_with(record: dict, args, run_dir: Path | None = None) -> bool:
    """Whether a finished run was made with this preset and these train.py flags.

    With the run's opts.yaml at hand, the options it was actually trained with are compared,
    so a train.py default changed since cannot pass an old run off as one made with today's
    default; options the run predates are not compared. Without it, the flags it was started
    with are parsed with today's defaults (runs from before the bench recorded them count as
    made with any)."""
    variant = VARIANTS.get(record.get("variant"), [])
    want = _train_settings(args.preset, [*variant, *args.train_args])
    stored = Path(run_dir) / "opts.yaml" if run_dir is not None else None
    if stored is not None and stored.is_file():
        had = load_yaml(stored)
        return all(_same_setting(k, had[k], v) for k, v in want.items() if k in had and k not in _NOT_TRAINING)
    return _train_settings(record.get("preset", args.preset),
                           [*variant, *record.get("train_args", args.train_args)]) == want


def finished_runs(args) -> list[dict]:
    """Records of OUT's finished runs made with this preset and these train.py flags, in
    (seed, variant) order; runs of another configuration are left out, and said so."""
    records, other = [], []
    for f in sorted((Path(args.out) / "runs").glob("*/bench.json")):
        r = json.loads(f.read_text())
        (records if _made_with(r, args, f.parent) and r["variant"] in args.variants else other).append(r)
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


ROWS = [("global (P=1)", "global", "learned"), ("PCB (P=6, uniform)", "pcb", "learned"),
        ("AWPCN (P=6, adaptive)", "awpcn", "learned"),
        ("AWPCN checkpoint, uniform weights at test", "awpcn", "uniform_at_test")]


def _dig(record: dict, path: tuple):
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _table(records: list[dict], rows: list[tuple[str, str, tuple]]) -> list[str]:
    """Markdown rows 'label | seeds | metrics' for (label, variant, key path) rows present."""
    out = ["| variant | seeds | Rank-1 | Rank-5 | mAP | mINP |", "| --- | --- | --- | --- | --- | --- |"]
    for label, variant, path in rows:
        rs = [r for r in records if r["variant"] == variant and _dig(r, path) is not None]
        if rs:
            out.append(f"| {label} | {','.join(str(r['seed']) for r in rs)} | "
                       + " | ".join(_ms([_dig(r, path)[m] for r in rs]) for m in METRICS) + " |")
    return out + [""]


def _weights_table(ws: list[dict]) -> list[str]:
    out = ["| stripes | mean weight × P |", "| --- | --- |"]
    for key, label in (("occluded_stripes", "occluded (≥ half hidden)"),
                       ("visible_stripes_of_occluded_images", "visible, on occluded images"),
                       ("stripes_of_clean_images", "all, on clean images (1 by construction)"),
                       ("clean_mean_abs_deviation", "clean images: mean \\|w × P − 1\\|"),
                       ("clean_within_0.05", "clean images: share of stripes within 1 ± 0.05")):
        vals = [w[key] for w in ws if key in w]
        if vals:
            out.append(f"| {label} | {statistics.mean(vals):.3f}"
                       + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "") + " |")
    return out + [""]


BENCH_ROWS = ROWS + [("PCB checkpoint, true visibility as query weights (oracle)", "pcb", "oracle_weights"),
                     ("AWPCN checkpoint, true visibility as query weights (oracle)", "awpcn", "oracle_weights")]


def _bench_section(records: list[dict], key: str, title: str) -> list[str]:
    """Clean and occluded queries of one occlusion benchmark: every weighting, paired
    differences, and the AWPCN weights against the ground truth."""
    occ = [r for r in records if key in r]
    if not occ:
        return []
    out = [f"**{title}: `{occ[0][key]['data']}`**", ""]
    for part in ("occluded", "clean"):
        out += [f"{part} queries:", ""]
        out += _table(records, [(lb, v, (key, k, part)) for lb, v, k in BENCH_ROWS])
        pairs = [{"variant": r["variant"], "seed": r["seed"], "x": r[key]["learned"][part]}
                 for r in occ if part in r[key]["learned"]]
        diff = paired_difference(pairs, "x")
        if diff:
            out += [diff, ""]
        for other, what in (("uniform_at_test", "uniform"), ("oracle_weights", "true-visibility (oracle)")):
            aw = [r for r in occ if r["variant"] == "awpcn" and other in r[key] and part in r[key]["learned"]]
            if aw:
                d = [r[key]["learned"][part]["mAP"] - r[key][other][part]["mAP"] for r in aw]
                out += [f"AWPCN learned − {what} weights, same checkpoints "
                        f"({','.join(str(r['seed']) for r in aw)}): mAP {_ms(d, signed=True)} points.", ""]
    con = [r for r in occ if "contamination" in r[key]]
    if con:
        out += ["where the occluded queries lose (uniform weights, mAP; *visible only*: just the stripes the "
                "occluder leaves < 5 % hidden; cos: occluded vs original image, same stripe):", "",
                "| checkpoint | seeds | originals | occluded | originals, visible only | occluded, visible only "
                "| cos visible stripes | cos hidden stripes |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for variant in VARIANTS:
            rs = [r[key]["contamination"] for r in con if r["variant"] == variant]
            if rs:
                seeds = ",".join(str(r["seed"]) for r in con if r["variant"] == variant)
                cells = [_ms([c[k]["mAP"] for c in rs]) for k in
                         ("original", "occluded", "original_visible_only", "occluded_visible_only")]
                cells += [f"{statistics.mean(c[k] for c in rs):.3f}" for k in ("cos_visible", "cos_hidden")]
                out.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
        out.append("")
    ws = [r[key]["weights"] for r in occ if "weights" in r[key]]
    if ws:
        out += ["AWPCN learned part weights × P on this benchmark (1.0 = uniform):", ""] + _weights_table(ws)
    return out


PARTIAL_ROWS = ROWS + [("AWPCN checkpoint, fixed stripes + uniform weights", "awpcn", "fixed_stripes")]


def _partial_section(records: list[dict], key: str, title: str) -> list[str]:
    """Partial and whole queries of one partial-view benchmark: every weighting, paired
    differences, and the learned weights of the parts the views do not show."""
    rs = [r for r in records if key in r]
    if not rs:
        return []
    out = [f"**{title}: `{rs[0][key]['data']}`**", ""]
    for group in ("partial", "whole", *datasets.PARTIAL_KINDS):
        if not any(group in r[key]["learned"] for r in rs):
            continue
        out += [f"{group} queries:", ""]
        out += _table(records, [(lb, v, (key, k, group)) for lb, v, k in PARTIAL_ROWS])
        if group in ("partial", "whole"):
            pairs = [{"variant": r["variant"], "seed": r["seed"], "x": r[key]["learned"][group]}
                     for r in rs if group in r[key]["learned"]]
            diff = paired_difference(pairs, "x")
            if diff:
                out += [diff, ""]
            fx = [r for r in rs if "fixed_stripes" in r[key] and group in r[key]["fixed_stripes"]]
            if fx:
                d = [r[key]["learned"][group]["mAP"] - r[key]["fixed_stripes"][group]["mAP"] for r in fx]
                out += [f"AWPCN aligned parts − fixed stripes, same checkpoints "
                        f"({','.join(str(r['seed']) for r in fx)}): mAP {_ms(d, signed=True)} points.", ""]
    ws = [r[key]["weights"] for r in rs if "weights" in r[key]]
    if ws:
        out += ["AWPCN learned part weights × P on this benchmark (1.0 = uniform):", "",
                "| parts | mean weight × P |", "| --- | --- |"]
        for k, label in (("outside_view", "outside a partial query's view (< 5 % shown)"),
                         ("inside_view", "inside it (> 95 % shown)"), ("whole_queries", "whole queries")):
            vals = [w[k] for w in ws if w.get(k) == w.get(k)]
            if vals:
                out.append(f"| {label} | {statistics.mean(vals):.3f}"
                           + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "") + " |")
        out.append("")
    return out


def markdown(records: list[dict], args) -> str:
    flags = f" {' '.join(args.train_args)}" if args.train_args else ""
    out = [f"Dataset `{args.data_dir}`, preset `{args.preset}`{flags}; mean ± std over the seeds listed, "
           f"AP formula: {evaluate.DEFAULT_AP}.", ""]
    if any("val" in r for r in records):
        out += ["**validation split (ids held out of training; what settings are chosen on)**", ""]
        out += _table(records, [(label.replace("at test", "at validation"), v,
                                 ("val" if key == "learned" else "val_uniform",)) for label, v, key in ROWS])
        maes = [r["vis_mae"][-1] for r in records if r.get("vis_mae")]
        if maes:
            out += [f"AWPCN visibility error on validation images with real-image occluders (mean |predicted − "
                    f"true| stripe visibility, last epoch): {statistics.mean(maes):.3f}"
                    + (f" ± {statistics.stdev(maes):.3f}" if len(maes) > 1 else "") + ".", ""]
        maes = [r["region_mae"] for r in records if r.get("region_mae")]
        if maes:
            out += ["AWPCN region error on partial views of validation images (mean |predicted − true| "
                    "original-body row of visible locations, in body heights), per epoch: "
                    + "; ".join(" ".join(f"{v:.3f}" for v in m) for m in maes) + ".", ""]
    for suffix, title in (("", "test split, all queries"), ("_occluded_queries", "occluded queries only")):
        if not any("learned" + suffix in r for r in records):
            continue
        out += [f"**{title}**", ""] + _table(records, [(lb, v, (k + suffix,)) for lb, v, k in ROWS])
        diff = paired_difference(records, "learned" + suffix)
        if diff:
            out += [diff, ""]
    out += _bench_section(records, "val_occ", "occlusion benchmark of the validation ids (prepare.py --occlude "
                          "--val_ids: where test-time settings are chosen)")
    out += _bench_section(records, "occ_bench", "occlusion benchmark (prepare.py --occlude: hard-edged occluders "
                          "cut from test-split images of other identities; never seen in training)")
    out += _partial_section(records, "val_part", "partial-view benchmark of the validation ids (prepare.py "
                            "--partial --val_ids: where settings are chosen)")
    out += _partial_section(records, "part_bench", "partial-view benchmark (prepare.py --partial: test-split "
                            "queries cut to their top, bottom or a side band, 40-80 %)")
    ws = [r["weights"] for r in records if "weights" in r]
    if ws:
        out += ["**AWPCN learned part weights × P (1.0 = uniform)**", ""] + _weights_table(ws)
    secs = [r["train_seconds"] for r in records]
    out.append(f"Training time per run: {statistics.mean(secs) / 60:.1f} min on average.")
    return "\n".join(out) + "\n"


def compare(outs: list[str]) -> str:
    """Validation results of several configurations (one OUT each), and the best per variant
    by mean validation mAP over the seeds every configuration of that variant has (more seeds
    for the chosen one later must not change the choice): how settings are chosen without
    touching the test split."""
    lines = ["| configuration | variant | seeds | val Rank-1 | val mAP | val partial queries mAP |",
             "| --- | --- | --- | --- | --- | --- |"]
    val: dict[str, dict[str, dict[int, float]]] = {}
    for out in outs:
        path = Path(out) / "results.json"
        if not path.is_file():
            raise UserError(f"{path}: not found; run bench/accuracy.py --out {out} first")
        records = json.loads(path.read_text())
        for variant in VARIANTS:
            rs = [r for r in records if r["variant"] == variant and "val" in r]
            if not rs:
                continue
            flags = " ".join(rs[0]["train_args"])
            part = [r["val_part"]["learned"]["partial"]["mAP"] for r in rs
                    if "partial" in r.get("val_part", {}).get("learned", {})]
            lines.append(f"| `{flags}` | {variant} | {','.join(str(r['seed']) for r in rs)} | "
                         f"{_ms([r['val']['rank1'] for r in rs])} | {_ms([r['val']['mAP'] for r in rs])} | "
                         f"{_ms(part) if part else '–'} |")
            val.setdefault(variant, {})[out] = {r["seed"]: r["val"]["mAP"] for r in rs}
    lines.append("")
    best: dict[str, tuple[float, str]] = {}
    for variant, by_out in val.items():
        seeds = sorted(set.intersection(*(set(v) for v in by_out.values())))
        if not seeds:
            lines.append(f"{variant}: no seed common to every configuration; nothing chosen")
            continue
        m, out = max((statistics.mean(v[s] for s in seeds), out) for out, v in by_out.items())
        best[variant] = (m, out)
        lines.append(f"best {variant} on validation mAP (seeds {','.join(map(str, seeds))}, common to every "
                     f"configuration): {out} ({100 * m:.1f})")
    # The chosen configuration of each variant, side by side, with whatever --final measured.
    chosen = [r for v, (_, out) in best.items() for r in json.loads((Path(out) / "results.json").read_text())
              if r["variant"] == v]
    if any("learned" in r for r in chosen):
        first = chosen[0]
        args = argparse.Namespace(data_dir="the chosen configurations", preset=first["preset"],
                                  train_args=["(per variant, as chosen above)"])
        lines += ["", markdown(chosen, args)]
    return "\n".join(lines) + "\n"


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data_dir")
    ap.add_argument("--out", help="folder for runs, results.md and results.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report", action="store_true",
                    help="train nothing: tabulate every finished run in OUT made with these train.py flags")
    ap.add_argument("--final", action="store_true",
                    help="runs with a validation split: also evaluate on the test split (once, for the chosen "
                         "configuration)")
    ap.add_argument("--occluded", default=None,
                    help="with --final: an occlusion benchmark made by prepare.py --occlude to evaluate on too")
    ap.add_argument("--val_occluded", default=None,
                    help="an occlusion benchmark of the validation ids (prepare.py --occlude --val_ids) to "
                         "evaluate every run on: where test-time settings are chosen")
    ap.add_argument("--partial", default=None,
                    help="with --final: a partial-view benchmark made by prepare.py --partial to evaluate on too")
    ap.add_argument("--val_partial", default=None,
                    help="a partial-view benchmark of the validation ids (prepare.py --partial --val_ids) to "
                         "evaluate every run on")
    ap.add_argument("--compare", nargs="+", metavar="OUT", help="tabulate the validation results of these OUTs")
    ap.add_argument("--records", default=None,
                    help="also copy each finished run's bench.json, opts.yaml and train.log into RECORDS/RUN "
                         "(e.g. bench/results/NAME, to commit while the runs themselves live outside the work tree)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra train.py flags for every run")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return 0
    if not args.data_dir or not args.out:
        raise UserError("--data_dir and --out are required (or --compare OUT ...)")
    args.train_args = [a for a in args.train_args if a != "--"]
    if args.report:
        records = finished_runs(args)
        if not records:
            raise UserError(f"{args.out}: no finished run made with preset {args.preset!r} and train.py flags "
                            f"{args.train_args}; run without --report first")
    else:
        records = []
        for seed in args.seeds:
            for variant in args.variants:
                print(f"=== {variant} seed {seed}", flush=True)
                records.append(run_one(variant, seed, args))
    text = markdown(records, args)
    atomic_write_text(Path(args.out) / "results.md", text)
    atomic_write_text(Path(args.out) / "results.json", json.dumps(records, indent=1))
    plot_curves(records, Path(args.out) / "runs", Path(args.out) / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
