"""A run's test result, as test.py computes, prints and records it, importable by name.

test.py is the command line over this module: a script called ``test`` cannot be imported
as such (Python's own ``test`` package comes first), and the benchmarks and tests need the
very same evaluation. :func:`run_test` extracts the run's query and gallery features
(:func:`compute_features`, through ``inference.features_of``), ranks with the chosen part
weights (and re-ranked), prints Rank-k/mAP/mINP and the true-match rate at 1 % and 0.1 %
false-match rate (open set: ``evaluate.verification_features``), and writes to the run folder:
result.txt (appended), features.pt (what demo.py and report.py read), cmc.png, with --report
report.html, and with ``--split val --calibrate FMR`` threshold.json (the distance threshold at
that false-match rate, which demo.py's searches answer "no match" beyond).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import evaluate
import report
import search
from gallery_index import run_identity_of
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
    ap.add_argument("--calibrate", type=float, default=None, metavar="FMR",
                    help="with --split val: store in RUN/threshold.json the distance threshold at this false-match "
                         "rate (e.g. 0.01), beyond which demo.py's searches answer 'no match'")
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
    Returns {"plain": evaluate.Result, "features": the features dict, "verification":
    evaluate.Verification, ["rerank": Result], ["threshold": the threshold.json path]}."""
    check_calibrate(args)
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
    fmrs = tuple(sorted(set(evaluate.DEFAULT_FMRS) | ({args.calibrate} if args.calibrate else set()), reverse=True))
    t0 = time.perf_counter()
    ver = evaluate.verification_features(qf, qw, gf, gw, q["pids"], g["pids"], q["cams"], g["cams"], fmrs=fmrs)
    t_ver = time.perf_counter() - t0
    lines.append("open set: " + evaluate.format_verification(ver))
    results["verification"] = ver
    if args.calibrate:
        if not ver.impostor or not ver.genuine:
            raise UserError(f"--calibrate: the validation split of {args.name} has {ver.genuine} genuine and "
                            f"{ver.impostor} impostor pairs; it needs both (hold out more ids: --val_ids 0.15 or more)")
        path = search.save_threshold(run_dir, calibration_record(args, opts, features, weighting, ver))
        at = ver.at(args.calibrate)
        lines.append(f"calibrated: same person if d < {at['threshold']:.4f} (FMR {100 * at['fmr_achieved']:.3g}% of "
                     f"{ver.impostor:,} impostor pairs, TMR {100 * at['tmr']:.2f}%; a search of these "
                     f"{len(g['pids'])} images answers the right person first and within it for "
                     f"{100 * at['rank1_tmr']:.1f}% of the queries, a stranger for {100 * at['fpir']:.1f}% of "
                     f"queries whose person is absent) -> {path}")
        results["threshold"] = path
    lines.append(f"({len(q['pids'])} queries x {len(g['pids'])} gallery; extraction {t_extract:.1f} s, "
                 f"evaluation {t_eval:.2f} s, open set {t_ver:.2f} s)")
    text = "\n".join(lines)
    print(text)
    append_result(run_dir / "result.txt", time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n\n")
    if args.report:
        known = {(weighting, False): res, **({(weighting, True): results["rerank"]} if args.rerank else {})}
        print(f"report: {report.build_report(run_dir, weighting=weighting, ap=args.ap, rerank=args.rerank, known=known)}")
    return results


def check_calibrate(args: argparse.Namespace) -> None:
    """--calibrate FMR: a fraction in (0, 1), on the validation split only (refused before any work)."""
    if args.calibrate is None:
        return
    if not 0 < args.calibrate < 1:
        raise UserError(f"--calibrate {args.calibrate}: expected a false-match rate in (0, 1), e.g. 0.01 for 1 %")
    if args.split != "val":
        raise UserError("--calibrate chooses the threshold on the validation ids (--split val; train with --val_ids "
                        "0.15): a threshold tuned on the test split would make its reported rates optimistic")


def calibration_record(args: argparse.Namespace, opts: dict, features: dict, weighting: str,
                       ver: evaluate.Verification) -> dict:
    """What RUN/threshold.json holds: the threshold at ``args.calibrate``, the rates measured with
    it on the validation ids, and the identity of the checkpoint and settings it holds for."""
    q, g = features["query"], features["gallery"]
    at = ver.at(args.calibrate)
    ident = run_identity_of(find_run(args.runs_dir, args.name), args.which, epoch=features["epoch"],
                            flip=not args.no_flip, height=opts["height"], width=opts["width"],
                            parts=int(q["emb"].shape[1]), embed_dim=int(q["emb"].shape[2]))
    return {"threshold": at["threshold"], "rule": "same person if distance < threshold", "fmr": at["fmr"],
            "fmr_achieved": at["fmr_achieved"], "tmr": at["tmr"], "rank1_tmr": at["rank1_tmr"], "fpir": at["fpir"],
            "weighting": weighting, "split": "val", "val_ids": opts.get("val_ids"), "data_root": features["data_root"],
            "queries": len(q["pids"]), "gallery": len(g["pids"]), "genuine_pairs": ver.genuine,
            "impostor_pairs": ver.impostor, "identity": ident, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
