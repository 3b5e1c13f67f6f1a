"""Evaluate a trained AWPCN run: extract features, rank the gallery, print Rank-k/mAP/mINP.

    python test.py --name RUN [--data_dir DIR] [--weighting adaptive|uniform]
                   [--ap official|standard] [--rerank] [--batchsize N] [--amp]

Everything about the model comes from model/RUN/opts.yaml. Writes to the run folder:
result.txt (appended), features.pt (what demo.py reads), cmc.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import datasets
import evaluate
from inference import fuse_for_inference
from model import AWPCN, MODEL_KEYS, build_model
from utils import (UserError, atomic_write_text, cli, load_checkpoint, load_yaml, save_features,
                   save_figure, select_device)

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate an AWPCN run on its dataset's query/gallery.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--name", required=True, help="run name (folder under --runs_dir)")
    ap.add_argument("--runs_dir", default="model")
    ap.add_argument("--data_dir", default=None, help="dataset (default: the one the run was trained on)")
    ap.add_argument("--which", default="last", help="checkpoint: last, epoch_NNN or interrupted")
    ap.add_argument("--weighting", default=None, choices=["adaptive", "uniform"],
                    help="part weights at test (default: the run's); uniform on an adaptive run = PCB ablation")
    ap.add_argument("--ap", default="official", choices=["official", "standard"],
                    help="official: Market-1501 trapezoid AP; standard: torchreid/fast-reid AP")
    ap.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    ap.add_argument("--no_flip", action="store_true", help="skip flip test-time augmentation")
    ap.add_argument("--batchsize", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--amp", action="store_true", help="fp16 on CUDA, bf16 on CPU")
    ap.add_argument("--device", default="auto")
    return ap


def find_run(runs_dir: str, name: str) -> Path:
    run_dir = Path(runs_dir) / name
    if not (run_dir / "opts.yaml").is_file():
        root = Path(runs_dir)
        runs = sorted(p.name for p in root.iterdir() if (p / "opts.yaml").is_file()) if root.is_dir() else []
        raise UserError(f"{run_dir}: no trained run here (no opts.yaml). "
                        + (f"Runs in {root}: {', '.join(runs)}" if runs else f"{root} holds no runs; train one with train.py"))
    return run_dir


def load_model(run_dir: Path, which: str = "last") -> tuple[AWPCN, dict, dict]:
    """Rebuild the run's model from opts.yaml and load a checkpoint. Returns (model, opts, ckpt)."""
    opts = load_yaml(run_dir / "opts.yaml")
    ckpt = load_checkpoint(run_dir / f"{which}.pt")
    model = build_model(opts, pretrained="none", weights="")
    state = ckpt.get("model") or {}
    own = model.state_dict()
    diffs = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if diffs or missing or unexpected:
        stored = ckpt.get("opts") or {}
        differs = [f"{k} {stored[k]!r} (opts.yaml says {opts.get(k)!r})" for k in MODEL_KEYS
                   if k in stored and stored[k] != opts.get(k)]
        raise UserError(
            f"{run_dir / (which + '.pt')} does not fit the model described by {run_dir / 'opts.yaml'}: "
            + ("; ".join(differs) + "; " if differs else "")
            + "; ".join(diffs[:3] + [f"{len(missing)} missing keys {missing[:2]}"] * bool(missing)
                        + [f"{len(unexpected)} unexpected keys {unexpected[:2]}"] * bool(unexpected)))
    model.load_state_dict(state)
    return model, opts, ckpt


@torch.inference_mode()
def extract(model: AWPCN, items, height: int, width: int, *, device, batchsize: int = 128, workers: int = 2,
            flip: bool = True, amp: bool = False, channels_last: bool = True, desc: str = "extract"):
    """Part embeddings and weights for ``items`` [(path, pid, cam)].

    Flip TTA: the image and its mirror go through the network in one batch; their part
    embeddings and weights are averaged. Returns emb (N, P, D) float32, weights (N, P) float32.
    """
    model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(datasets.ImageDataset(items, datasets.build_transforms(height, width, train=False)),
                        batch_size=batchsize, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    amp_ctx = (torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
               if amp else nullcontext())
    embs, weights = [], []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=not sys.stderr.isatty())
    for img, _vis, _pid, _cam in bar:
        img = img.to(device, non_blocking=True)
        n = img.shape[0]
        if flip:
            img = torch.cat([img, img.flip(3)])
        if channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with amp_ctx:
            emb, w = model(img)
        emb, w = emb.float(), w.float()
        if flip:
            emb, w = (emb[:n] + emb[n:]) / 2, (w[:n] + w[n:]) / 2
        embs.append(emb.cpu())
        weights.append(w.cpu())
    return torch.cat(embs), torch.cat(weights)


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


def append_result(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + text)


def run_test(args: argparse.Namespace) -> dict:
    run_dir = find_run(args.runs_dir, args.name)
    model, opts, ckpt = load_model(run_dir, args.which)
    device = select_device(args.device)
    # Folded conv+BN and channels_last: 1.7x the plain PCB extraction (bench/extract_speed.py).
    model = fuse_for_inference(model.to(device))
    data = datasets.load_dataset(args.data_dir or opts.get("data_root") or opts["data_dir"])
    weighting = args.weighting or opts.get("weighting", "adaptive")
    kw = dict(device=device, batchsize=args.batchsize, workers=args.workers, flip=not args.no_flip,
              amp=args.amp, channels_last=True)
    t0 = time.perf_counter()
    qf, qw = extract(model, data.query, opts["height"], opts["width"], desc="query", **kw)
    gf, gw = extract(model, data.gallery, opts["height"], opts["width"], desc="gallery", **kw)
    t_extract = time.perf_counter() - t0
    features = {
        "run": args.name, "checkpoint": args.which, "epoch": int(ckpt.get("epoch", 0)),
        "data_root": str(data.root), "parts": int(opts["parts"]), "weighting": opts.get("weighting", "adaptive"),
        "query": {"emb": qf, "weights": qw, "pids": torch.tensor([p for _, p, _ in data.query]),
                  "cams": torch.tensor([c for _, _, c in data.query]), "paths": [p for p, _, _ in data.query]},
        "gallery": {"emb": gf, "weights": gw, "pids": torch.tensor([p for _, p, _ in data.gallery]),
                    "cams": torch.tensor([c for _, _, c in data.gallery]), "paths": [p for p, _, _ in data.gallery]},
    }
    save_features(run_dir, features)

    qw, gw = evaluate.weights_for(weighting, qw, gw)
    q, g = features["query"], features["gallery"]
    t0 = time.perf_counter()
    res = evaluate.evaluate_features(qf, qw, gf, gw, q["pids"], g["pids"], q["cams"], g["cams"], ap=args.ap)
    t_eval = time.perf_counter() - t0
    header = (f"{args.name} [{args.which}, epoch {ckpt.get('epoch', '?')}] on {data.root} "
              f"| weights: {weighting} | flip TTA: {'off' if args.no_flip else 'on'}")
    lines = [header, evaluate.format_result(res)]
    if res.get("num_skipped_queries"):
        lines.append(f"warning: {res['num_skipped_queries']} queries have no valid gallery match and were skipped")
    plot_cmc(res["cmc"], run_dir / "cmc.png", f"{args.name} ({weighting})")
    results = {"plain": res}
    if args.rerank:
        dist = evaluate.rerank_features(qf, qw, gf, gw)
        rr = evaluate.evaluate(dist, q["pids"], g["pids"], q["cams"], g["cams"], ap=args.ap)
        lines.append("re-ranked (k1=20, k2=6, lambda=0.3): " + evaluate.format_result(rr))
        results["rerank"] = rr
    lines.append(f"({len(data.query)} queries x {len(data.gallery)} gallery; extraction {t_extract:.1f} s, "
                 f"evaluation {t_eval:.2f} s)")
    text = "\n".join(lines)
    print(text)
    append_result(run_dir / "result.txt", time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n\n")
    return results


@cli
def main(argv=None) -> int:
    run_test(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
