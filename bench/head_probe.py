"""Frozen-trunk diagnostic of the spatial visibility head (issue #12).

Does the head miss real occluders because it had too little training, too little capacity,
or because the trunk's features do not say where the person is hidden? A finished AWPCN run
(spatial head) is frozen; visibility heads are fitted on its trunk map, with the run's own
training occluders on its own training ids:

- ``linear``: the run's own 1x1 conv, trained further (more budget, same head);
- ``mlp``: 1x1 conv -> 128 -> ReLU -> 1x1 conv, from scratch (more capacity).

Each is scored, before and after, on the run's visibility probe (the same 256 held-out
validation images with real-image patch occluders as train.log's vis_mae): stripe visibility
error and weight x P of occluded (>= half hidden) and fully visible stripes. With
``--occluded DIR`` (prepare.py --occlude, e.g. the validation benchmark) the fine-tuned linear
head is put back into the model and the benchmark's occluded queries are ranked with learned,
uniform and oracle weights (the head also pools the stripes, so its embeddings change too).

The trunk maps of ``--passes`` augmented copies of the training set are computed once and
kept in memory (float16), so the heads train for many epochs in seconds.

    .venv/bin/python bench/head_probe.py --run bench/out/fair/lr0.05/runs/awpcn_s0 \\
        --occluded bench/out/market_val_occ --out bench/out/head_probe
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402
import train  # noqa: E402
from inference import features_of, load_model  # noqa: E402
from losses import cell_visibility, stripe_visibility  # noqa: E402
from model import visibility_to_weights  # noqa: E402
from utils import UserError, atomic_write_text, cli, progress, run_data_dir, seed_everything  # noqa: E402


@functools.cache
def _bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def trunk_maps(model, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """images (N,3,H,W) -> trunk maps (N,C,h,w) float16 (eval mode: running BN statistics)."""
    model.eval()
    return torch.cat([model.trunk(x).half() for x in images.split(batch)])


def augmented_set(model, data, opts: dict, passes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk maps (N,C,h,w) float16 and per-pixel visibility (N,H,W) of ``passes`` copies of
    the training images under the run's own training transform (its occluders, p and all)."""
    t = train.train_transform({**opts, "invariance": 0}, data)
    torch.manual_seed(seed)
    maps, vis = [], []
    items = data.train * passes
    for start in progress(range(0, len(items), 128), desc="trunk maps"):
        chunk = [t(datasets.load_image(p), label) for p, label, _ in items[start:start + 128]]
        maps.append(trunk_maps(model, torch.stack([x for x, _ in chunk])))
        vis.append(torch.stack([v for _, v in chunk]).half())
    return torch.cat(maps), torch.cat(vis)


def make_head(kind: str, model) -> torch.nn.Module:
    if kind == "linear":
        return copy.deepcopy(model.vis_conv).float()
    c = model.vis_conv.in_channels
    head = torch.nn.Sequential(torch.nn.Conv2d(c, 128, 1), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(128, 1, 1))
    torch.nn.init.zeros_(head[2].weight)
    torch.nn.init.constant_(head[2].bias, 3.0)  # start "all visible", as the model's own head does
    return head


def score(head, maps: torch.Tensor, vis: torch.Tensor, parts: int) -> dict:
    """Stripe visibility error and weight x P (bench/accuracy.py's weight_summary) on probe
    maps (N,C,h,w) with pixel visibility (N,H,W)."""
    with torch.no_grad():
        m = torch.sigmoid(torch.cat([head(x.float()) for x in maps.split(256)]))          # (N,1,h,w)
    pred = F.adaptive_avg_pool2d(m, (parts, 1)).flatten(1)                                # (N,P)
    true = stripe_visibility(vis.float(), parts, tuple(maps.shape[2:]))
    wp = visibility_to_weights(pred) * parts
    w = _bench().weight_summary(wp, 1 - true, (true < 1).any(1))
    return {"vis_mae": float((pred - true).abs().mean()), "w_occluded_stripes": w["occluded_stripes"],
            "w_visible_stripes_of_occluded": w["visible_stripes_of_occluded_images"]}


def fit(head, maps, vis, *, epochs: int, lr: float, batch: int = 256, seed: int = 0, on_epoch=None):
    """BCE of the head's per-location logits against the visible fraction of each cell, as in training."""
    hw = tuple(maps.shape[2:])
    target = cell_visibility(vis.float(), hw)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(maps), generator=g).split(batch):
            loss = F.binary_cross_entropy_with_logits(head(maps[idx].float()).squeeze(1), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if on_epoch:
            on_epoch(epoch + 1, float(loss.detach()))
    return head


def ranked_with_head(model, opts: dict, head, occluded: str) -> dict:
    """The occlusion benchmark with the fine-tuned linear head in place of the run's own."""
    bench = _bench()
    model = copy.deepcopy(model)
    model.vis_conv.load_state_dict(head.state_dict())
    data = datasets.load_dataset(occluded, need=("query", "gallery"))
    feats = features_of(model, opts, data, device=torch.device("cpu"), workers=0)[0]
    return bench.occlusion_benchmark(feats, datasets.occlusion_truth(occluded), opts, occluded)


def run(args) -> dict:
    run_dir = Path(args.run)
    model, opts, _ = load_model(run_dir)
    if not model.spatial:
        raise UserError(f"{run_dir}: a {opts['weighting']}/{opts.get('head')} run; this diagnostic needs the "
                        "spatial head (--weighting adaptive --head spatial)")
    if not opts.get("val_ids"):
        raise UserError(f"{run_dir}: trained without --val_ids; the probe needs held-out validation ids")
    seed_everything(args.seed)
    data = datasets.load_dataset(run_data_dir(opts))
    data, val = datasets.carve_validation(data, opts["val_ids"])
    probe_x, probe_vis = train.visibility_probe(val, opts)
    probe_maps = trunk_maps(model, probe_x)
    t0 = time.perf_counter()
    maps, vis = augmented_set(model, data, opts, args.passes, args.seed)
    result = {"run": str(run_dir), "passes": args.passes, "samples": len(maps), "epochs": args.epochs,
              "seconds_trunk_maps": round(time.perf_counter() - t0, 1),
              "as_trained": score(model.vis_conv.float(), probe_maps, probe_vis, model.parts), "heads": {}}
    print(f"as trained: {result['as_trained']}")
    for kind in ("linear", "mlp"):
        curve = []
        head = make_head(kind, model)

        def on_epoch(epoch, loss, head=head, curve=curve, kind=kind):
            s = score(head, probe_maps, probe_vis, model.parts)
            curve.append({"epoch": epoch, "train_bce": round(loss, 4), **{k: round(v, 4) for k, v in s.items()}})
            print(f"{kind} epoch {epoch}: {curve[-1]}")

        fit(head, maps, vis, epochs=args.epochs, lr=args.lr, seed=args.seed, on_epoch=on_epoch)
        result["heads"][kind] = curve
        if kind == "linear" and args.occluded:
            result["linear_on_benchmark"] = ranked_with_head(model, opts, head, args.occluded)
    return result


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished AWPCN run folder (spatial head, trained with --val_ids)")
    ap.add_argument("--out", default="bench/out/head_probe")
    ap.add_argument("--occluded", default=None, help="an occlusion benchmark (prepare.py --occlude) to rank with the "
                                                     "fine-tuned linear head; use the validation one")
    ap.add_argument("--passes", type=int, default=1, help="augmented copies of the training set")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(args.run).name}.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
