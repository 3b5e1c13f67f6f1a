"""report.py on a Market-sized test: seconds to build the page from features.pt, and its size.

    .venv/bin/python bench/report_speed.py [--queries 3368] [--gallery 15913]
        [--difficulty realistic] [--threads N] [--repeat 2] [--work DIR]

Builds a run folder the way test.py leaves it: features.pt with a Market-sized problem
(3,368 queries x 15,913 gallery, 6 parts x 256-d, from bench/eval_speed.make_problem:
per-identity part centres plus per-image noise, random part weights, junk, distractors,
6 cameras), opts.yaml, and one tiny generated image per query and gallery item (64x128 JPEG
colour bands, named PID_cCAM like Market's; never dataset photos). The images and features
are made once per --work folder (not timed). Then it times report.build_report: the whole
call (load features.pt, evaluate with learned and with uniform weights, pick and rank the
shown queries, thumbnails, write the page), and on their own the load and the two
evaluations, medians of --repeat runs; and prints the page's size and how many thumbnails
it embeds. Targets (issue 15): built in seconds, under 10 MB. No asserts.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import evaluate  # noqa: E402
import report  # noqa: E402
from model import WEIGHTINGS  # noqa: E402
from utils import load_features, save_features, save_yaml  # noqa: E402

RUN = "report_bench"


def _eval_speed():
    spec = importlib.util.spec_from_file_location("bench_eval_speed", REPO / "bench" / "eval_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_images(folder: Path, pids, cams, seed: int) -> list[str]:
    """One 64x128 JPEG of six colour bands per item (colours from the pid, a per-image shade)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1).integers(0, 256, (1024, 6, 3), dtype=np.uint8)
    paths = []
    for n, (pid, cam) in enumerate(zip(pids.tolist(), cams.tolist())):
        path = folder / f"{pid:04d}_c{cam}s1_{n:06d}_00.jpg" if pid >= 0 else folder / f"-1_c{cam}s1_{n:06d}_00.jpg"
        if not path.is_file():
            bands = palette[pid % 1024].astype(np.int16) + rng.integers(-20, 21, (6, 3))
            arr = np.repeat(bands.clip(0, 255).astype(np.uint8), 128 // 6 + 1, axis=0)[:128]
            Image.fromarray(np.repeat(arr[:, None], 64, axis=1)).save(path, quality=85)
        paths.append(str(path))
    return paths


def make_run(work: Path, queries: int, gallery: int, difficulty: str) -> Path:
    run_dir = work / "model" / RUN
    if (run_dir / "features.pt").is_file():
        return run_dir
    t0 = time.perf_counter()
    qf, qw, gf, gw, qp, gp, qc, gc = _eval_speed().make_problem(queries, gallery, difficulty=difficulty)
    data = work / "data"
    feats = {
        "run": RUN, "checkpoint": "last", "epoch": 60, "data_root": str(data), "parts": int(qw.shape[1]),
        "weighting": "adaptive",
        # Cameras are 1-based in make_problem, 0-based in features.pt (as datasets.parse_name makes them).
        "query": {"emb": qf, "weights": qw, "pids": qp, "cams": qc - 1,
                  "paths": write_images(data / "query", qp, qc, 1)},
        "gallery": {"emb": gf, "weights": gw, "pids": gp, "cams": gc - 1,
                    "paths": write_images(data / "bounding_box_test", gp, gc, 2)},
    }
    save_features(run_dir, feats)
    save_yaml(run_dir / "opts.yaml", {"data_dir": str(data), "data_root": str(data), "backbone": "resnet50",
                                      "parts": int(qw.shape[1]), "height": 384, "width": 128, "head": "visibility",
                                      "weighting": "adaptive", "epochs": 60, "num_classes": 751})
    print(f"made {run_dir} and {queries + gallery} images in {time.perf_counter() - t0:.0f} s (not timed)")
    return run_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--difficulty", default="realistic", choices=["easy", "realistic", "hard"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for the generated run and images (default: a temp folder)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="awpcn-report-bench-"))
    run_dir = make_run(work, args.queries, args.gallery, args.difficulty)

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return out, (time.perf_counter() - w, time.process_time() - c)

    runs = {"total": [], "load": [], "eval": [], "known": []}
    for _ in range(args.repeat):
        path, t = timed(lambda: report.build_report(run_dir))
        runs["total"].append(t)
        feats, t = timed(lambda: load_features(run_dir))
        runs["load"].append(t)
        cols, t = timed(lambda: report.evaluate_columns(feats, list(WEIGHTINGS), ap=evaluate.DEFAULT_AP, rerank=False))
        runs["eval"].append(t)
        known = {(c.weighting, False): c.plain for c in cols}
        del feats
        # The same call with the evaluations handed in: what the page costs beyond the metrics.
        _, t = timed(lambda: report.build_report(run_dir, known=known))
        runs["known"].append(t)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
    page = path.read_text(encoding="utf-8")
    load = os.getloadavg()[0]
    print(f"Market-sized report: {args.queries} queries x {args.gallery} gallery, 6 x 256-d, {torch.get_num_threads()} "
          f"threads, difficulty {args.difficulty} (learned weights: Rank-1 {100 * cols[0].plain.rank1:.1f} %, "
          f"mAP {100 * cols[0].plain.mAP:.1f} %); load average {load:.1f}. Medians of {args.repeat}: wall s / CPU s")
    rows = [("report.build_report, everything", med["total"]),
            ("  load features.pt", med["load"]),
            ("  evaluate: learned + uniform weights", med["eval"]),
            ("  the page (given the evaluations, load included)", med["known"])]
    for name, (w, c) in rows:
        print(f"  {name:<50} {w:6.2f} s wall  {c:6.2f} s CPU")
    print(f"  page {path.stat().st_size / 1e6:.2f} MB (target < 10 MB), {page.count('data:image/jpeg')} embedded "
          f"JPEG data URIs")
    print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
