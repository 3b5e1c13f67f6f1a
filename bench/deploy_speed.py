"""Deployment on a CPU: per-crop latency and throughput of every runtime, and their mAP.

    .venv/bin/python bench/deploy_speed.py [--backbones resnet50,mobilenet_v2] [--sizes 384x128,256x128]
        [--threads 1,2] [--calls 200] [--rounds 10] [--batch 32] [--batch_rounds 3]
        [--runtimes torch,ort,ort-int8,ov,ov-int8] [--calib 300] [--data ../shared/data/market1501-sub]
        [--run RUN_DIR [--which last]] [--no_flip] [--out bench/results/deploy]

Models: AWPCN with ResNet-50 at 384x128 and MobileNetV2 at 256x128 (P=6, D=256, last stride 1,
the visibility head), built by model.build_model: ResNet-50 with random weights whose BatchNorm
statistics are set on real crops (bench/extract_speed.calibrate_bn: trained-like activation
scales), MobileNetV2 with the installed ImageNet file when there is one. Latency does not
depend on the values of the weights; accuracy comes from --run.

Runtimes, each called the way inference.Extractor's loop calls it on one batch of
preprocessed crops (decoding and resizing are the same code for all of them and are left out):
  torch     PyTorch fp32 as test.py runs it: conv+BN folded, channels_last, inference_mode
            (inference.fuse_for_inference + inference.embed_batch); torch.set_num_threads(T)
  ort       onnxruntime fp32 on export.py's graph (inference.ExportedModel, T intra-op threads)
  ort-int8  onnxruntime on export.py --int8's graph (export.quantize_int8: QDQ, per-channel
            weights, calibrated on --calib training images of --data)
  ov        OpenVINO fp32 (CPU plugin, f32 precision hint, latency hint) reading the same ONNX
  ov-int8   OpenVINO reading the same int8 QDQ ONNX
Flip TTA is on (image + mirror per crop, inside the graph), as test.py extracts; --no_flip
times the single pass.

Per (model, threads): batch-1 latency over --calls calls of one real crop per runtime, in
--rounds blocks interleaved with rotating order (a pause of --settle s between blocks lets the
previous runtime's worker threads stop spinning), median and 99th percentile; then throughput
at --batch crops per call, --batch_rounds interleaved batches per runtime, median. Ratios are
against PyTorch at the same threads. Every runtime's outputs on the timed crop are compared
with PyTorch's (max |Δ| of unit part embeddings and of weights).

--run DIR: the trained run's checkpoint exported to fp32 and int8 (int8 calibrated on --data's
bounding_box_train) and the Rank-1/mAP of every runtime on --data's query/gallery, beside
PyTorch's, with the share of queries whose top-1 and top-10 gallery lists equal PyTorch's.

Prints a markdown table; writes OUT/bench.json (every figure, the CPU and versions) and
OUT/results.md. A smoke run (< 1 min): --backbones mobilenet_v2 --sizes 128x64 --calls 20
--rounds 2 --threads 1 --batch 4 --batch_rounds 1 --calib 16.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import datasets  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
from extract_speed import calibrate_bn  # noqa: E402
from inference import (Extractor, ExportedModel, embed_batch, fuse_for_inference, load_model,  # noqa: E402
                       require_runtime)
from model import BACKBONES, build_model, installed_mobilenet_v2_weights  # noqa: E402
from utils import UserError, atomic_write_text, cli  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "market1501-sub"
DEFAULT_SIZES = {"resnet50": (384, 128), "mobilenet_v2": (256, 128)}
# key -> (table name, runtime, precision)
RUNTIMES = {
    "torch": ("PyTorch fp32", "torch", "fp32"),
    "ort": ("onnxruntime fp32", "onnxruntime", "fp32"),
    "ort-int8": ("onnxruntime int8", "onnxruntime", "int8"),
    "ov": ("OpenVINO fp32", "openvino", "fp32"),
    "ov-int8": ("OpenVINO int8", "openvino", "int8"),
}
MODEL_OPTS = {"parts": 6, "embed_dim": 256, "last_stride": 1, "weighting": "adaptive", "head": "visibility",
              "num_classes": 751}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU's name, cores and the instruction-set flags int8 and bf16 speed depend on."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"name": name or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags],
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}


def versions(keys) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for rt in sorted({RUNTIMES[k][1] for k in keys} - {"torch"}):
        out[rt] = require_runtime(rt).__version__
    return out


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--sizes {text}: expected HxW, e.g. 384x128") from None
    if h < 32 or w < 32:
        raise UserError(f"--sizes {text}: at least 32x32 (the trunk downsamples by 16)")
    return h, w


def bench_model(backbone: str, calib: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """An AWPCN of ``backbone`` for timing, and where its weights come from."""
    opts = {"backbone": backbone, **MODEL_OPTS}
    mnv2 = installed_mobilenet_v2_weights() if backbone == "mobilenet_v2" else None
    torch.manual_seed(0)
    model = build_model(opts, pretrained="none", weights=str(mnv2) if mnv2 else "")
    if mnv2:
        return model.eval(), f"ImageNet trunk ({mnv2.name})"
    # Random weights: give the BatchNorms the statistics of real crops, so the activations
    # have trained-like scales (no overflow or denormals to slow a runtime down).
    normalised = (calib * 255 - datasets.TestTransform(1, 1).mean) / datasets.TestTransform(1, 1).std
    calibrate_bn(model, normalised[:16])
    return model.eval(), "random weights, BatchNorm statistics of real crops"


def crops(data: Path | None, height: int, width: int, n: int, split: str = "train") -> tuple[torch.Tensor, str]:
    """n crops (n,3,H,W) in [0,1]: evenly spaced over ``data``'s ``split`` folder, else random pixels."""
    if data is not None:
        folder = data / datasets.SPLITS[split]
        if folder.is_dir():
            x, _bad = export.load_images(export.calibration_files(folder, n), height, width)
            if len(x):
                return x, str(folder)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, height, width, generator=g), "random pixels (no --data)"


def prepare_files(model, height: int, width: int, flip: bool, calib: torch.Tensor, work: Path, keys) -> dict:
    """Export ``model`` to work/fp32.onnx and (if an int8 runtime is asked for) work/int8.onnx."""
    files = {}
    if any(RUNTIMES[k][2] == "fp32" and RUNTIMES[k][1] != "torch" for k in keys) or any(
            RUNTIMES[k][2] == "int8" for k in keys):
        t0 = time.perf_counter()
        files["fp32"] = work / "fp32.onnx"
        export.export_onnx(export.onnx_net(model, flip), files["fp32"], height, width)
        msg = f"exported in {time.perf_counter() - t0:.0f} s"
        if any(RUNTIMES[k][2] == "int8" for k in keys):
            t0 = time.perf_counter()
            files["int8"] = work / "int8.onnx"
            export.quantize_int8(files["fp32"], files["int8"], calib)
            msg += f", int8 quantised on {len(calib)} crops in {time.perf_counter() - t0:.0f} s"
        print(f"  ({msg})", flush=True)
    return files


def make_runner(key: str, fused, files: dict, threads: int, flip: bool):
    """fn(x normalised (B,3,H,W)) -> (emb, weights): one batch as the Extractor's loop runs it."""
    _, runtime, precision = RUNTIMES[key]
    if runtime == "torch":
        def run(x):
            with torch.inference_mode():
                return embed_batch(fused, x, flip=flip, channels_last=True)
        return run
    net = ExportedModel(files[precision], runtime, threads=threads)
    return lambda x: net.embed(x, flip=flip)


def interleave(runners: dict, x: torch.Tensor, calls: int, rounds: int, warmup: int, settle: float) -> dict:
    """{key: [seconds per call]}: ``calls`` calls per runner in ``rounds`` blocks, the order
    rotating every round, after ``warmup`` untimed calls each."""
    keys = list(runners)
    for k in keys:
        for _ in range(warmup):
            runners[k](x)
    times = {k: [] for k in keys}
    per = [calls // rounds + (r < calls % rounds) for r in range(rounds)]
    for r, n in enumerate(per):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            time.sleep(settle)
            fn = runners[k]
            for _ in range(n):
                t0 = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t0)
    return times


def unit_delta(ref, out) -> tuple[float, float]:
    return (float((F.normalize(ref[0], dim=-1) - F.normalize(out[0], dim=-1)).abs().max()),
            float((ref[1] - out[1]).abs().max()))


def time_config(backbone: str, height: int, width: int, args, keys, data: Path | None) -> list[dict]:
    calib, calib_src = crops(data, height, width, args.calib)
    model, weights = bench_model(backbone, calib)
    print(f"\n{backbone} {height}x{width} ({weights}; int8 calibration: {len(calib)} crops of {calib_src})",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="awpcn-deploy-") as work:
        files = prepare_files(model, height, width, not args.no_flip, calib, Path(work), keys)
        fused = fuse_for_inference(model) if "torch" in keys else None
        norm = datasets.TestTransform(height, width)
        one = calib[:1]
        batch = calib[:args.batch] if len(calib) >= args.batch else calib[torch.arange(args.batch) % len(calib)]
        x1, xb = [(x * 255 - norm.mean) / norm.std for x in (one, batch)]
        for t in args.threads:
            torch.set_num_threads(t)
            runners = {k: make_runner(k, fused, files, t, not args.no_flip) for k in keys}
            ref = runners[keys[0]](x1)
            deltas = {k: unit_delta(ref, runners[k](x1)) for k in keys}
            lat = interleave(runners, x1, args.calls, args.rounds, args.warmup, args.settle)
            tput = (interleave(runners, xb, args.batch_rounds, args.batch_rounds, 1, args.settle)
                    if args.batch_rounds and args.batch else {})
            for k in keys:
                ms = np.asarray(lat[k]) * 1e3
                rows.append({"backbone": backbone, "height": height, "width": width, "threads": t, "runtime": k,
                             "name": RUNTIMES[k][0], "weights": weights, "flip": not args.no_flip,
                             "latency_ms": {"median": float(np.median(ms)), "p99": float(np.percentile(ms, 99)),
                                            "mean": float(ms.mean()), "calls": len(ms)},
                             "throughput": ({"batch": args.batch, "img_s": args.batch / statistics.median(tput[k]),
                                             "batches": len(tput[k])} if tput else None),
                             "vs_first": {"unit_emb": deltas[k][0], "weights": deltas[k][1]}})
                r = rows[-1]
                print(f"  {t} thread(s) {r['name']:<17} batch-1 median {r['latency_ms']['median']:7.1f} ms, "
                      f"p99 {r['latency_ms']['p99']:7.1f} ms"
                      + (f"; batch {args.batch}: {r['throughput']['img_s']:6.1f} img/s" if tput else "")
                      + f"; max |Δunit emb| {deltas[k][0]:.1e}, |Δweights| {deltas[k][1]:.1e}", flush=True)
            del runners
    return rows


def latency_table(rows: list[dict], first: str) -> str:
    name = RUNTIMES[first][0]
    head = (f"| model | runtime | threads | batch-1 median ms | p99 ms | speed-up vs {name} | "
            f"batch img/s | speed-up | max Δ unit emb vs {name} |")
    lines = [head, "|" + " --- |" * 9]
    base = {(r["backbone"], r["height"], r["width"], r["threads"]): r for r in rows if r["runtime"] == first}
    for r in rows:
        b = base.get((r["backbone"], r["height"], r["width"], r["threads"]))
        lat = r["latency_ms"]
        speed = f"{b['latency_ms']['median'] / lat['median']:.2f}x" if b else "-"
        tp = r["throughput"]
        tps = f"{tp['img_s']:.1f}" if tp else "-"
        tpr = f"{tp['img_s'] / b['throughput']['img_s']:.2f}x" if tp and b and b["throughput"] else "-"
        lines.append(f"| {r['backbone']} {r['height']}x{r['width']} | {r['name']} | {r['threads']} | "
                     f"{lat['median']:.1f} | {lat['p99']:.1f} | {speed} | {tps} | {tpr} | "
                     f"{r['vs_first']['unit_emb']:.1e} |")
    return "\n".join(lines)


def top_same(d_ref: torch.Tensor, d: torch.Tensor, k: int) -> float:
    """Share of queries whose top-k gallery list (in order) equals the reference's."""
    k = min(k, d.shape[1])
    a = torch.sort(d_ref, dim=1, stable=True).indices[:, :k]
    b = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return float((a == b).all(1).float().mean())


def accuracy(args, keys, data: Path) -> list[dict]:
    """Rank-1/mAP of every runtime on the run's checkpoint, on ``data``'s query/gallery."""
    run_dir = Path(args.run)
    model, opts, ckpt = load_model(run_dir, args.which)
    height, width = int(opts["height"]), int(opts["width"])
    weighting = opts.get("weighting", "adaptive")
    test = datasets.load_dataset(data, need=("query", "gallery"), log=lambda *_: None)
    calib, calib_src = crops(data, height, width, args.calib)
    flip = not args.no_flip
    print(f"\naccuracy: {run_dir} [{args.which}, epoch {ckpt.get('epoch', '?')}], {height}x{width}, on {test.root} "
          f"({len(test.query)} queries x {len(test.gallery)} gallery; weights: {weighting}; int8 calibrated on "
          f"{len(calib)} crops of {calib_src})", flush=True)
    rows, dists = [], {}
    with tempfile.TemporaryDirectory(prefix="awpcn-deploy-") as work:
        files = prepare_files(model, height, width, flip, calib, Path(work), keys)
        for k in keys:
            name, runtime, precision = RUNTIMES[k]
            net = model if runtime == "torch" else ExportedModel(files[precision], runtime)
            ext = Extractor(net, height, width, device="cpu", flip=flip, batch_size=32)
            t0 = time.perf_counter()
            res, q, g = export.evaluate_extractor(ext, test, weighting=weighting, desc=name)
            secs = time.perf_counter() - t0
            qw, gw = evaluate.weights_for(weighting, q[1], g[1])
            dists[k] = evaluate.weighted_distance(q[0], qw, g[0], gw)
            ref = dists[keys[0]]
            rows.append({"runtime": k, "name": name, "rank1": res.rank1, "mAP": res.mAP, "ap": res.ap_formula,
                         "top1_same": top_same(ref, dists[k], 1), "top10_same": top_same(ref, dists[k], 10),
                         "seconds": secs, "images": len(test.query) + len(test.gallery)})
            print(f"  {name:<17} {evaluate.format_result(res)} ({secs:.0f} s)", flush=True)
    return rows


def accuracy_table(rows: list[dict]) -> str:
    lines = [f"| runtime | Rank-1 | mAP | ΔmAP vs {rows[0]['name']} (points) | top-1 same | top-10 same |",
             "|" + " --- |" * 6]
    base = rows[0]["mAP"]
    for r in rows:
        lines.append(f"| {r['name']} | {100 * r['rank1']:.2f} | {100 * r['mAP']:.2f} | {100 * (r['mAP'] - base):+.2f} "
                     f"| {100 * r['top1_same']:.1f}% | {100 * r['top10_same']:.1f}% |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backbones", default="resnet50,mobilenet_v2", help="comma-separated model.BACKBONES")
    ap.add_argument("--sizes", default=None,
                    help="HxW per backbone (comma-separated; one size for all), default 384x128 for ResNet-50 and "
                         "256x128 for MobileNetV2")
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, of {', '.join(RUNTIMES)}")
    ap.add_argument("--calls", type=int, default=200, help="timed batch-1 calls per runtime and thread count")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved blocks the calls are split into")
    ap.add_argument("--warmup", type=int, default=10, help="untimed batch-1 calls per runtime first")
    ap.add_argument("--settle", type=float, default=0.05, help="seconds of pause between blocks")
    ap.add_argument("--batch", type=int, default=32, help="crops per call for the throughput figure (0: skip)")
    ap.add_argument("--batch_rounds", type=int, default=3, help="timed batches per runtime and thread count")
    ap.add_argument("--calib", type=int, default=export.CALIB_IMAGES, help="int8 calibration crops")
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="Market-layout dataset: crops for timing and calibration, query/gallery for --run")
    ap.add_argument("--run", default=None, help="a trained run folder: also the mAP of every runtime on --data")
    ap.add_argument("--which", default="last", help="the run's checkpoint")
    ap.add_argument("--no_flip", action="store_true", help="time the single pass instead of flip TTA")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "deploy"),
                    help="folder for bench.json and results.md")
    return ap


def check_args(args) -> tuple[list[tuple[str, int, int]], list[str]]:
    backbones = parse_list(args.backbones)
    for b in backbones:
        if b not in BACKBONES:
            raise UserError(f"--backbones {b}: unknown; choose from {', '.join(BACKBONES)}")
    sizes = [parse_size(s) for s in parse_list(args.sizes)] if args.sizes else []
    if sizes and len(sizes) not in (1, len(backbones)):
        raise UserError(f"--sizes {args.sizes}: give one size or one per backbone ({len(backbones)})")
    configs = [(b, *(sizes[i if len(sizes) > 1 else 0] if sizes else DEFAULT_SIZES.get(b, (256, 128))))
               for i, b in enumerate(backbones)]
    keys = parse_list(args.runtimes)
    for k in keys:
        if k not in RUNTIMES:
            raise UserError(f"--runtimes {k}: unknown; choose from {', '.join(RUNTIMES)}")
        if RUNTIMES[k][1] != "torch":
            require_runtime(RUNTIMES[k][1])
    if not keys:
        raise UserError("--runtimes: name at least one runtime")
    keys = [k for k in RUNTIMES if k in keys]       # PyTorch first: the reference of every ratio
    try:
        args.threads = [int(t) for t in parse_list(args.threads)]
    except ValueError:
        raise UserError(f"--threads {args.threads}: expected comma-separated integers, e.g. 1,2") from None
    if not args.threads or min(args.threads) < 1:
        raise UserError(f"--threads {args.threads}: give positive thread counts")
    if args.calls < 1 or args.rounds < 1 or args.calls < args.rounds or args.calib < 1 or args.batch < 0:
        raise UserError("--calls >= --rounds >= 1, --calib >= 1 and --batch >= 0, please")
    if any(RUNTIMES[k][2] == "int8" for k in keys):
        export.require_quantization()
    if args.run and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such folder; --run needs a test set (query/ and bounding_box_test/)")
    return configs, keys


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configs, keys = check_args(args)
    data = Path(args.data) if Path(args.data).is_dir() else None
    cpu = cpu_info()
    t_start = time.perf_counter()
    print(f"CPU: {cpu['name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '-'} "
          f"(VNNI: {'yes' if cpu['vnni'] else 'no'}); {', '.join(f'{k} {v}' for k, v in versions(keys).items())}")
    print(f"runtimes {', '.join(RUNTIMES[k][0] for k in keys)}; threads {args.threads}; batch-1: {args.calls} calls "
          f"in {args.rounds} interleaved blocks; throughput: batch {args.batch} x {args.batch_rounds}; flip TTA "
          f"{'off' if args.no_flip else 'on'}", flush=True)
    rows = []
    for backbone, h, w in configs:
        rows += time_config(backbone, h, w, args, keys, data)
    acc = accuracy(args, keys, Path(args.data)) if args.run else []
    command = "python bench/deploy_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [f"Command: `{command.strip()}`", "",
            f"CPU: {cpu['name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '-'}; "
            + ", ".join(f"{k} {v}" for k, v in versions(keys).items()), "",
            latency_table(rows, keys[0])]
    if acc:
        text += ["", f"Accuracy of {args.run} on {args.data}:", "", accuracy_table(acc)]
    md = "\n".join(text) + "\n"
    print("\n" + md)
    out = Path(args.out)
    record = {"command": command.strip(), "cpu": cpu, "versions": versions(keys), "args": vars(args),
              "latency": rows, "accuracy": acc, "seconds": time.perf_counter() - t_start}
    atomic_write_text(out / "bench.json", json.dumps(record, indent=1))
    atomic_write_text(out / "results.md", md)
    print(f"wrote {out / 'bench.json'} and {out / 'results.md'} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
