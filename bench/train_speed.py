"""Training-step throughput: AWPCN adaptive vs AWPCN uniform (PCB ablation) vs a plain PCB.

    .venv/bin/python bench/train_speed.py [--steps 5] [--warmup 1] [--batch 16]
        [--height 384] [--width 128] [--backbone resnet50] [--threads N] [--channels_last]

One step = forward, loss, backward, SGD (momentum 0.9, Nesterov, weight decay 5e-4, as
train.py) on a fixed random batch, fp32, 751 classes. Variants:
  (a) AWPCN, adaptive weights with the visibility head (the default), loss
      ``losses.awpcn_loss`` with its visibility BCE (a synthetic occluder in the batch);
  (b) AWPCN, ``weighting='uniform'``, ``losses.awpcn_loss`` (no head, no BCE);
  (c) the PCB reference of ``bench/pcb_reference.py`` (six separate blocks in a Python
      loop, sum of six CEs), always ResNet-50;
  (d) with ``--channels_last``: (a) with model and batch in channels_last.
The three use the same trunk (>= 99% of the work), so their whole-step ratios are 1.0 up
to noise; the script therefore also times the part in which they differ alone ("head
only": stripe pooling, part blocks, weight head, losses, backward to the feature map,
SGD, on a fixed random feature map) and expresses the difference as % of a full step.
The variants are interleaved step by step (the order rotates each round: abc, bca, cab,
...) so the drift of a shared machine hits all of them alike; figures are medians of the
timed steps, and ratios are medians of the per-round paired ratios. Absolute figures on
a shared CPU drift by tens of percent between runs; quote the ratios.
Data loading is not included (the batch is already in memory).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from losses import awpcn_loss  # noqa: E402
from model import BACKBONES, AWPCN  # noqa: E402
from pcb_reference import PCBReference, pcb_loss  # noqa: E402

REFERENCE_IMG_S = 2.6  # given: classic PCB, fp32, 384x128, batch 16, this 2-core CPU
NUM_CLASSES = 751


def make_variants(backbone: str, channels_last: bool = False):
    """name -> (model, step function(model, optimizer, img, vis, labels))."""
    def awpcn_step(model, opt, img, vis, labels):
        if getattr(model, "bench_channels_last", False):
            img = img.contiguous(memory_format=torch.channels_last)
        out = model(img)
        loss, _ = awpcn_loss(out, labels, vis if model.weighting == "adaptive" else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def pcb_step(model, opt, img, vis, labels):
        loss = pcb_loss(model(img), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    torch.manual_seed(0)
    variants = {
        "AWPCN adaptive (visibility head)": (AWPCN(NUM_CLASSES, backbone=backbone, pretrained="none"), awpcn_step),
        "AWPCN uniform (PCB ablation)": (AWPCN(NUM_CLASSES, backbone=backbone, weighting="uniform",
                                               pretrained="none"), awpcn_step),
        "PCB reference (bench/pcb_reference.py)": (PCBReference(NUM_CLASSES), pcb_step),
    }
    if channels_last:
        m = AWPCN(NUM_CLASSES, backbone=backbone, pretrained="none").to(memory_format=torch.channels_last)
        m.bench_channels_last = True
        variants["AWPCN adaptive, channels_last (train.py --channels_last)"] = (m, awpcn_step)
    return variants


def head_only_times(variants: dict, opts: dict, fmap: torch.Tensor, vis, labels, reps: int) -> dict:
    """Median seconds of a step through everything but the trunk (pooling, part blocks,
    head, losses, backward to the feature map, SGD), i.e. the code in which the variants
    differ; the trunk's output is a fixed random feature map."""
    names = [n for n in variants if "channels_last" not in n]
    times = {n: [] for n in names}
    for r in range(reps + 2):
        for name in names:
            model, _ = variants[name]
            x = fmap.detach().requires_grad_()
            t0 = time.perf_counter()
            if isinstance(model, PCBReference):
                loss = pcb_loss(model.head(x), labels)
            else:
                trunk, model.trunk = model.trunk, torch.nn.Identity()
                try:
                    out = model(x)
                finally:
                    model.trunk = trunk
                loss, _ = awpcn_loss(out, labels, vis if model.weighting == "adaptive" else None)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--backbone", default="resnet50", choices=list(BACKBONES),
                    help="AWPCN backbone (the PCB reference is always ResNet-50)")
    ap.add_argument("--channels_last", action="store_true",
                    help="also time AWPCN adaptive with channels_last model and batch")
    ap.add_argument("--head_reps", type=int, default=20, help="timed reps of the head-only steps")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 2:
        ap.error("--steps must be >= 1 and --batch >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = make_variants(args.backbone, args.channels_last)
    names = list(variants)
    opts = {name: sgd(model) for name, (model, _) in variants.items()}
    for model, _ in variants.values():
        model.train()
    g = torch.Generator().manual_seed(0)
    img = torch.randn(args.batch, 3, args.height, args.width, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)
    vis = torch.ones(args.batch, args.height)
    vis[: args.batch // 4, : args.height // 3] = 0.0   # a top occluder on a quarter of the batch

    print(f"train step: batch {args.batch}, {args.height}x{args.width}, fp32, {args.backbone} (PCB ref: resnet50), "
          f"{NUM_CLASSES} classes, SGD momentum; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.warmup} warm-up + {args.steps} timed steps per variant, interleaved", flush=True)
    times = {name: [] for name in names}
    t_start = time.perf_counter()
    for r in range(args.warmup + args.steps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            model, step = variants[name]
            t0 = time.perf_counter()
            loss = step(model, opts[name], img, vis, labels)
            dt = time.perf_counter() - t0
            if not torch.isfinite(loss):
                raise SystemExit(f"{name}: non-finite loss {loss.item()}")
            if r >= args.warmup:
                times[name].append(dt)
        if r < args.warmup:
            print(f"  round {r + 1}/{args.warmup + args.steps}: warm-up", flush=True)
        else:
            print(f"  round {r + 1}/{args.warmup + args.steps}: "
                  + ", ".join(f"{n.split(' (')[0]} {times[n][-1]:.2f} s" for n in names), flush=True)

    a, u, p = names[:3]
    med = {n: statistics.median(times[n]) for n in names}
    ips = {n: args.batch / med[n] for n in names}
    paired = lambda x, y: statistics.median(tx / ty for tx, ty in zip(times[x], times[y]))  # noqa: E731
    overhead = paired(a, u) - 1.0          # time ratio adaptive / uniform, minus 1
    vs_pcb = paired(p, a)                  # throughput ratio AWPCN adaptive / PCB = time PCB / time AWPCN
    vs_pcb_u = paired(p, u)

    print()
    w = max(len(n) for n in names)
    print(f"{'variant':<{w}}  {'s/step':>7}  {'min..max':>11}  {'img/s':>6}  {'vs PCB ref':>10}")
    for n in names:
        print(f"{n:<{w}}  {med[n]:7.2f}  {min(times[n]):5.2f}..{max(times[n]):<5.2f}  {ips[n]:6.2f}  "
              f"{ips[n] / ips[p]:9.2f}x")
    print(f"{'given figure: classic PCB, fp32, batch 16 (other day)':<{w}}  {'':>7}  {'':>11}  "
          f"{REFERENCE_IMG_S:6.2f}")
    print()
    print(f"adaptive-head overhead vs uniform: {100 * overhead:+.1f}%  (target <= 3%: "
          f"{'PASS' if overhead <= 0.03 else 'FAIL'})  [median of per-round time ratios]")
    print(f"AWPCN adaptive / PCB reference throughput: {vs_pcb:.2f}x  (target >= 1.0: "
          f"{'PASS' if vs_pcb >= 1.0 else 'FAIL'});  AWPCN uniform / PCB reference: {vs_pcb_u:.2f}x")
    if args.channels_last:
        c = names[3]
        print(f"AWPCN adaptive channels_last / NCHW: {paired(a, c):.2f}x;  / PCB reference: {paired(p, c):.2f}x")
    print(f"AWPCN adaptive here vs the given {REFERENCE_IMG_S} img/s: {ips[a] / REFERENCE_IMG_S:.2f}x "
          f"(absolute figures drift +-40% on this shared machine; quote the in-run ratios)")

    channels = BACKBONES[args.backbone][2]
    fmap = torch.randn(args.batch, channels, -(-args.height // 16), -(-args.width // 16), generator=g)
    head = head_only_times(variants, opts, fmap, vis, labels, args.head_reps)
    print(f"\nhead only (stripe pooling, part blocks, adaptive head, losses, backward to the feature map, SGD; "
          f"feature map {tuple(fmap.shape)}, median of {args.head_reps}):")
    for n, t in head.items():
        print(f"  {n:<{w}}  {1000 * t:7.1f} ms  ({100 * t / med[n]:.1f}% of its full step)")
    print(f"  adaptive - uniform: {1000 * (head[a] - head[u]):+.1f} ms = {100 * (head[a] - head[u]) / med[u]:+.2f}% "
          f"of a uniform step;  AWPCN adaptive - PCB reference: {1000 * (head[a] - head[p]):+.1f} ms "
          f"= {100 * (head[a] - head[p]) / med[p]:+.2f}% of a PCB step")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
