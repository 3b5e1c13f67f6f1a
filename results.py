"""A run's test result, as test.py computes, prints and records it, importable by name.

test.py is the command line over this module: a script called ``test`` cannot be imported
as such (Python's own ``test`` package comes first), and the benchmarks and tests need the
very same evaluation. :func:`run_test` extracts the run's query and gallery features
(:func:`compute_features`, through ``inference.features_of``), ranks with the chosen part
weights (and re-ranked), prints Rank-k/mAP/mINP, and writes to the run folder: result.txt
(appended), features.pt (what demo.py and report.py read), cmc.png, and with --report
report.html.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import evaluate
import report
from inference import add_eval_arguments, features_of, find_run, load_model
from utils import (UserError, add_run_arguments, atomic_write_text, run_data_dir, same_dataset, save_features,
                   save_figure, select_device)


def build_parser() -> argparse.ArgumentParser:
    """test.py's options; ``build_parser().parse_args([...])`` is how code asks for a test.py run."""
    ap = argparse.ArgumentParser(prog="test.py", description="Evaluate an AWPCN run on its dataset's query/gallery.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--data_dir", default=None, help="dataset (default: the one the run was trained on)")
    add_eval_arguments(ap, weighting_help="part weights at test (default: the run's); uniform on an adaptive run "
                                          "= PCB ablation")
    ap.add_argument("--report", action="store_true",
                    help="also write RUN/report.html: failures, part weights, learned vs uniform (see report.py)")
    ap.add_argument("--split", default="test", choices=["test", "val"],
                    help="val: the validation ids the run held out of training (train.py --val_ids), for "
                         "choosing settings without touching the test split; features.pt is not written")
    ap.add_argument("--no_features", action="store_true",
                    help="do not write features.pt (e.g. evaluating on another set while demo.py and report.py "
                         "keep reading the test split's)")
    ap.add_argument("--no_flip", action="store_true", help="skip flip test-time augmentation")
    ap.add_argument("--batchsize", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--amp", action="store_true", help="fp16 on CUDA, bf16 on CPU")
    ap.add_argument("--device", default="auto")
    return ap


def plot_cmc(cmc, path: Path, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmc = [float(c) for c in cmc]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(range(1, len(cmc) + 1), [100 * c for c in cmc], marker=".", label=label)
    ax.set_xlabel("rank"), ax.set_ylabel("matching rate (%)"), ax.set_title("CMC")
    ax.grid(alpha=0.3), ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def sets_line(trained_on: str | None, tested_on: Path) -> str:
    """Names the run's training set and the test set; a different test set is marked
    cross-dataset, so such a result is never read as an in-domain one."""
    if not trained_on:
        return f"trained on ? (opts.yaml has no data_root), tested on {tested_on}"
    if same_dataset(trained_on, tested_on):
        return f"trained on {trained_on}, tested on {tested_on} (same dataset)"
    return f"cross-dataset: trained on {trained_on}, tested on {tested_on}"


def append_result(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + text)


def compute_features(args: argparse.Namespace) -> tuple[Path, dict, dict, float]:
    """The run's query and gallery features on the chosen split, nothing written:
    (run folder, its options, the features dict that features.pt holds, extraction seconds)."""
    if args.batchsize < 1:
        raise UserError(f"--batchsize {args.batchsize}: must be at least 1 (images per extraction batch)")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 (load in this process) or more")
    run_dir = find_run(args.runs_dir, args.name)
    model, opts, ckpt = load_model(run_dir, args.which)
    trained_on = run_data_dir(opts)
    if not trained_on and (args.split == "val" or not args.data_dir):
        raise UserError(f"{run_dir / 'opts.yaml'}: no data_root or data_dir key, so the run's dataset is unknown; "
                        + ("restore the opts.yaml train.py wrote" if args.split == "val"
                           else "pass --data_dir DIR (or restore the opts.yaml train.py wrote)"))
    if args.split == "val":
        if args.report:
            raise UserError("--report describes the test split; drop --split val (or --report)")
        if not opts.get("val_ids"):
            raise UserError(f"--split val: {run_dir} was trained on all its training ids (no --val_ids); "
                            "train with --val_ids 0.15 to hold some out")
        if args.data_dir:
            raise UserError("--split val evaluates on ids held out of the run's own training set; drop --data_dir")
        full = datasets.load_dataset(trained_on)
        data = datasets.carve_validation(full, opts["val_ids"])[1]
    else:
        data = datasets.load_dataset(args.data_dir or trained_on, need=("query", "gallery"))
    if args.rerank:  # before extraction: a refusal after it would cost the plain result too
        evaluate.check_rerank_size(len(data.query), len(data.gallery))
    features, t_extract = features_of(model, opts, data, device=select_device(args.device),
                                      batchsize=args.batchsize, workers=args.workers, flip=not args.no_flip,
                                      amp=args.amp)
    features.update({"run": args.name, "checkpoint": args.which, "epoch": int(ckpt.get("epoch", 0))})
    return run_dir, opts, features, t_extract


def run_test(args: argparse.Namespace) -> dict:
    """Everything ``python test.py ARGS`` does, for ``args = build_parser().parse_args(ARGS)``.
    Returns {"plain": evaluate.Result, "features": the features dict, ["rerank": Result]}."""
    run_dir, opts, features, t_extract = compute_features(args)
    if args.split == "test" and not args.no_features:
        save_features(run_dir, features)
    q, g = features["query"], features["gallery"]
    qf, gf = q["emb"], g["emb"]
    weighting = args.weighting or opts.get("weighting", "adaptive")
    qw, gw = evaluate.weights_for(weighting, q["weights"], g["weights"])
    t0 = time.perf_counter()
    res = evaluate.evaluate_features(qf, qw, gf, gw, q["pids"], g["pids"], q["cams"], g["cams"], ap=args.ap)
    t_eval = time.perf_counter() - t0
    root = features["data_root"]
    header = (f"{args.name} [{args.which}, epoch {features['epoch']}] "
              + (f"validation ids held out of {root} " if args.split == "val" else
                 f"{sets_line(run_data_dir(opts), Path(root))} ") +
              f"| weights: {weighting} | flip TTA: {'off' if args.no_flip else 'on'}")
    lines = [header, evaluate.format_result(res)]
    if res.get("num_skipped_queries"):
        lines.append(f"warning: {res['num_skipped_queries']} queries have no valid gallery match and were skipped")
    plot_cmc(res["cmc"], run_dir / "cmc.png", f"{args.name} ({weighting})")
    results = {"plain": res, "features": features}
    if args.rerank:
        dist = evaluate.rerank_features(qf, qw, gf, gw)
        rr = evaluate.evaluate(dist, q["pids"], g["pids"], q["cams"], g["cams"], ap=args.ap)
        lines.append(f"re-ranked ({evaluate.RERANK_SETTINGS}): " + evaluate.format_result(rr))
        results["rerank"] = rr
    lines.append(f"({len(q['pids'])} queries x {len(g['pids'])} gallery; extraction {t_extract:.1f} s, "
                 f"evaluation {t_eval:.2f} s)")
    text = "\n".join(lines)
    print(text)
    append_result(run_dir / "result.txt", time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n\n")
    if args.report:
        known = {(weighting, False): res, **({(weighting, True): results["rerank"]} if args.rerank else {})}
        print(f"report: {report.build_report(run_dir, weighting=weighting, ap=args.ap, rerank=args.rerank, known=known)}")
    return results
