"""Feature-extraction throughput with flip TTA: AWPCN's path vs a plain PCB extraction.

    .venv/bin/python bench/extract_speed.py [--batch 64] [--rounds 3] [--warmup 1]
        [--height 384] [--width 128] [--backbone resnet50] [--threads N] [--jit] [--compile] [--bf16]

An "image" is one image *with* its mirror (flip TTA): both passes count as one image, so
every variant does the same work per image (2 ResNet-50 passes at 384x128); the table also
shows passes/s (= 2 x img/s), the unit the given reference figures seem to use. fp32,
random weights (BatchNorm statistics calibrated on one random batch first, so the
activations have trained-like scale), in-memory batch (no data loading). Variants:

  PCB reference, plain   bench/pcb_reference.py, the classic way: ``torch.no_grad``, default
                         (NCHW) memory format, two separate forward passes per batch (image,
                         then mirror), the two 6x2048 pooled features summed.
  AWPCN, NCHW            the extraction loop's body (``inference.embed_batch``) in the
                         default memory format: ``torch.inference_mode``, image + mirror in
                         one batch of 2B, part embeddings and weights averaged.
  AWPCN, channels_last   the same with model and batch in channels_last.
  AWPCN, fused           ``inference.fuse_for_inference``: conv+BN folded, channels_last
                         (what ``inference.extract`` runs, for test.py and Extractor alike).
  AWPCN, jit (--jit)     torch.jit.trace + freeze + optimize_for_inference, for comparison.
  AWPCN, torch.compile   (--compile) inductor with ``freezing=True``, channels_last; the
                         compilation (timed and printed) is paid once per input shape.

Variants are interleaved (order rotating each round) so the drift of a shared machine hits
all alike; figures are medians over rounds, ratios medians of per-round paired ratios.
Correctness: in float64 the fused trunk must reproduce the eval-mode trunk (max abs diff of
the feature maps <= 1e-4; it is ~1e-13); in fp32 every variant's
outputs are compared with the NCHW eval-mode outputs (max abs diff relative to max |emb|
<= 1e-3, and the part cosines; channels_last alone, ~1e-4, shows the float-rounding floor).
``--bf16`` also times bf16 autocast against fp32 (channels_last) on a small batch
(``--bf16_batch``): slow on CPUs without AVX-512-BF16/AMX.

``--onnx`` times only two variants, on the same images: the PyTorch path test.py and
inference.Extractor run (fused conv+BN, channels_last) and onnxruntime (CPU, as many intra-op
threads as torch) on export.py's graph of the same model (flip TTA and normalisation inside
the graph, so the graph gets the same images un-normalised); it prints img/s, the
onnxruntime/PyTorch ratio and the max output difference. Needs requirements-export.txt.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from inference import embed_batch, fuse_for_inference  # noqa: E402
from model import BACKBONES, AWPCN  # noqa: E402
from pcb_reference import PCBReference  # noqa: E402

GIVEN = "given figures (classic PCB, fp32, batch 64, this CPU, other day): 6.0 img/s, 7.7 img/s with channels_last"
GIVEN_PLAIN, GIVEN_CL = 6.0, 7.7
NUM_CLASSES = 751
TOL = 1e-4          # fused vs plain trunk in float64: exact algebra, only rounding left
FP32_TOL = 1e-3     # fp32, relative to the embedding scale: float-rounding over 50 conv layers


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BN's running statistics to those of batch ``x``, then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None           # cumulative average: one batch -> exactly its statistics
    model.train()
    model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def pcb_plain(model, img):
    """Classic extraction: two separate passes, features summed, no_grad, NCHW."""
    with torch.no_grad():
        f = model(img)
        f = f + model(img.flip(3))
    return f, None


def awpcn_extract(model, img, channels_last: bool):
    """One batch as ``inference.extract`` runs it (image + mirror in one batch, outputs averaged)."""
    with torch.inference_mode():
        return embed_batch(model, img, flip=True, channels_last=channels_last)


def jit_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model).eval(), example, strict=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def max_diff(ref, out) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ref, out))


def onnx_variants(awpcn: nn.Module, fused: nn.Module, args) -> dict:
    """{name: fn(img) -> (emb, w)}: the fused PyTorch model and onnxruntime on export.py's graph."""
    import tempfile

    import export

    export.require_onnx()
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "awpcn.onnx"
    export.export_onnx(export.onnx_net(awpcn), path, args.height, args.width)
    sess = export.ort_session(path, threads=torch.get_num_threads())
    path.unlink()                      # the session holds the graph
    tmp.cleanup()
    print(f"(export.py graph exported and loaded by onnxruntime in {time.perf_counter() - t0:.1f} s)")
    mean = torch.tensor(export.datasets.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(export.datasets.IMAGENET_STD).view(1, 3, 1, 1)
    return {
        "AWPCN, PyTorch fused conv+BN, channels_last (test.py)": lambda x: awpcn_extract(fused, x, True),
        # The graph normalises inside: give it the same images in [0, 1] terms.
        "AWPCN, onnxruntime (export.py graph)": lambda x: export.ort_embed(sess, x * std + mean),
    }


def report_onnx(names, times, outputs, batch: int) -> None:
    torch_name, ort_name = names
    med = {n: statistics.median(times[n]) for n in names}
    ratio = statistics.median(tt / to for tt, to in zip(times[torch_name], times[ort_name]))
    print()
    w = max(len(n) for n in names)
    print(f"{'variant':<{w}}  {'s/batch':>7}  {'img/s':>6}  {'passes/s':>8}")
    for n in names:
        print(f"{n:<{w}}  {med[n]:7.2f}  {batch / med[n]:6.2f}  {2 * batch / med[n]:8.2f}")
    print(f"onnxruntime / PyTorch: {ratio:.2f}x (median of per-round paired ratios)")
    d_emb, d_w = ((a - b).abs().max().item() for a, b in zip(outputs[torch_name], outputs[ort_name]))
    print(f"max abs diff onnxruntime vs PyTorch on the timed batch: emb {d_emb:.2e} "
          f"(max |emb| {outputs[torch_name][0].abs().max().item():.3g}), weights {d_w:.2e}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="images per batch (x2 passes with the mirror)")
    ap.add_argument("--rounds", type=int, default=3, help="timed batches per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches per variant first")
    ap.add_argument("--warmup_batch", type=int, default=8, help="images in a warm-up batch")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--backbone", default="resnet50", choices=list(BACKBONES),
                    help="AWPCN backbone (the PCB reference is always ResNet-50)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--jit", action="store_true", help="also time torch.jit freeze + optimize_for_inference")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile (inductor, freezing); needs a C++ compiler (the compilation time is "
                         "printed)")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast vs fp32 on a small batch")
    ap.add_argument("--bf16_batch", type=int, default=4)
    ap.add_argument("--onnx", action="store_true",
                    help="only PyTorch (fused, what test.py runs) vs onnxruntime on export.py's graph")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1:
        ap.error("--rounds and --batch must be >= 1")
    return args


def build_variants(args, img: torch.Tensor, calib: torch.Tensor):
    """-> ({name: fn(img) -> outputs}, the eval-mode AWPCN, its channels_last copy, seconds to fuse)."""
    torch.manual_seed(0)
    pcb = PCBReference(NUM_CLASSES)
    if not args.onnx:
        calibrate_bn(pcb, calib)
    awpcn = AWPCN(NUM_CLASSES, backbone=args.backbone, pretrained="none")
    calibrate_bn(awpcn, calib)
    awpcn_cl = copy.deepcopy(awpcn).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    fused = fuse_for_inference(awpcn)
    t_fuse = time.perf_counter() - t0

    variants = {
        "PCB reference, plain (2 passes, NCHW, no_grad)": lambda x: pcb_plain(pcb, x),
        "AWPCN, NCHW (test.py extract default)": lambda x: awpcn_extract(awpcn, x, False),
        "AWPCN, channels_last": lambda x: awpcn_extract(awpcn_cl, x, True),
        "AWPCN, fused conv+BN, channels_last": lambda x: awpcn_extract(fused, x, True),
    }
    if args.onnx:
        variants = onnx_variants(awpcn, fused, args)
    if args.compile:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True              # fold weights/BN, prepack for oneDNN
        t0 = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(awpcn_cl))
        awpcn_extract(compiled, img, True)
        print(f"(torch.compile, inductor with freezing, first batch incl. compilation: "
              f"{time.perf_counter() - t0:.1f} s)")
        variants["AWPCN, torch.compile (freezing), channels_last"] = lambda x: awpcn_extract(compiled, x, True)
    if args.jit:
        t0 = time.perf_counter()
        try:
            jitted = jit_model(awpcn, img[:2])
            awpcn_extract(jitted, img[:1], False)
        except RuntimeError as exc:   # e.g. oneDNN's adaptive pooling needs rows divisible by parts
            print(f"(jit variant skipped: {str(exc).strip().splitlines()[-1][:150]})")
        else:
            print(f"(jit trace + freeze + optimize_for_inference: {time.perf_counter() - t0:.1f} s)")
            variants["AWPCN, jit freeze + optimize_for_inference"] = lambda x: awpcn_extract(jitted, x, False)
    return variants, awpcn, awpcn_cl, t_fuse


def time_interleaved(variants: dict, img: torch.Tensor, args) -> tuple[dict, dict]:
    """Warm-up, then timed rounds with the order rotating each round -> ({name: [s]}, {name: last outputs})."""
    names = list(variants)
    times = {n: [] for n in names}
    outputs = {}
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            out = variants[name](img if r >= args.warmup else img[: args.warmup_batch])
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt)
            outputs[name] = out
        if r < args.warmup:
            print(f"  round {r + 1}/{args.warmup + args.rounds}: warm-up", flush=True)
        else:
            print(f"  round {r + 1}/{args.warmup + args.rounds}: "
                  + ", ".join(f"{n.split(' (')[0]} {times[n][-1]:.1f} s" for n in names), flush=True)
    return times, outputs


def report_speed(times: dict, batch: int) -> None:
    """The table against the PCB reference (the first variant) and the target ratios."""
    names = list(times)
    ref = names[0]
    med = {n: statistics.median(times[n]) for n in names}
    ips = {n: batch / med[n] for n in names}
    ratio = {n: statistics.median(tr / tn for tr, tn in zip(times[ref], times[n])) for n in names}

    print()
    w = max(len(n) for n in names)
    print(f"{'variant':<{w}}  {'s/batch':>7}  {'img/s':>6}  {'passes/s':>8}  {'vs PCB ref':>10}")
    for n in names:
        print(f"{n:<{w}}  {med[n]:7.2f}  {ips[n]:6.2f}  {2 * ips[n]:8.2f}  {ratio[n]:9.2f}x")
    print(GIVEN)
    print(f"  PCB reference here: {ips[ref]:.2f} img/s with flip = {2 * ips[ref]:.2f} passes/s; given {GIVEN_PLAIN} "
          f"(it matches passes/s better, i.e. it likely counts each pass, not image + mirror); absolute figures "
          f"drift +-40% on this shared machine, quote the in-run ratios")
    best = "AWPCN, fused conv+BN, channels_last"
    for n in ("AWPCN, channels_last", best):
        print(f"{n} / PCB reference: {ratio[n]:.2f}x (target >= 1.2: {'PASS' if ratio[n] >= 1.2 else 'FAIL'})")
    print(f"fusion gain over channels_last alone: "
          f"{statistics.median(tc / tf for tc, tf in zip(times['AWPCN, channels_last'], times[best])):.2f}x")


def report_correctness(awpcn: nn.Module, img: torch.Tensor, outputs: dict) -> None:
    """Fusion in float64 against the eval-mode trunk, then every fp32 variant against NCHW."""
    # Fusion is exact algebra: in float64 the fused model must reproduce the eval-mode model.
    # (The AWPCN head computes in float32, so the check is on the trunk, the part that is fused.)
    trunk64 = copy.deepcopy(awpcn.trunk).double().eval()
    fused64 = fuse_for_inference(trunk64, channels_last=False)
    with torch.inference_mode():
        x64 = img[:2].double()
        d64 = (trunk64(x64) - fused64(x64)).abs().max().item()
    print(f"\ncorrectness of fuse_for_inference in float64 (trunk feature maps of 2 images): "
          f"max abs diff {d64:.2e} ({'PASS' if d64 <= TOL else 'FAIL'} at {TOL:g})")
    base = outputs["AWPCN, NCHW (test.py extract default)"]
    scale = max(1.0, base[0].abs().max().item())
    print(f"fp32 outputs vs AWPCN NCHW (max |emb| {scale:.3g}; channels_last alone shows the float-rounding "
          f"floor of a different conv algorithm over 50 layers):")
    for n in list(outputs)[2:]:
        d = max_diff(base, outputs[n])
        cos = torch.nn.functional.cosine_similarity(base[0], outputs[n][0], dim=-1).min().item()
        print(f"  {n}: max abs diff {d:.2e}, relative to max |emb| {d / scale:.1e} "
              f"({'PASS' if d / scale <= FP32_TOL else 'FAIL'} at {FP32_TOL:g}); min part cosine {cos:.7f}")


def report_bf16(awpcn_cl: nn.Module, small: torch.Tensor) -> None:
    """One timed batch of bf16 autocast against fp32 (channels_last), and their output difference."""
    def bf16_run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return awpcn_extract(awpcn_cl, small, True)

    res = {}
    for name, fn in (("fp32", lambda: awpcn_extract(awpcn_cl, small, True)), ("bf16 autocast", bf16_run)):
        fn()                                     # warm-up
        t0 = time.perf_counter()
        out = fn()
        res[name] = (time.perf_counter() - t0, out)
    tf, tb = res["fp32"][0], res["bf16 autocast"][0]
    d = max_diff(res["fp32"][1], res["bf16 autocast"][1])
    print(f"\nbf16 autocast vs fp32 (AWPCN channels_last, batch {small.shape[0]}, 1 timed batch each): "
          f"fp32 {small.shape[0] / tf:.2f} img/s, bf16 {small.shape[0] / tb:.2f} img/s "
          f"({tb / tf:.1f}x slower), max abs emb diff {d:.2e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    img = torch.randn(args.batch, 3, args.height, args.width, generator=g)
    calib = torch.randn(8, 3, args.height, args.width, generator=g)
    variants, awpcn, awpcn_cl, t_fuse = build_variants(args, img, calib)

    print(f"extraction with flip TTA: batch {args.batch} (+ mirrors), {args.height}x{args.width}, fp32, "
          f"{args.backbone}{'' if args.onnx else ' (PCB ref: resnet50)'}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.warmup} warm-up + {args.rounds} timed batches per variant, interleaved; "
          f"fuse_for_inference took {t_fuse:.2f} s", flush=True)
    times, outputs = time_interleaved(variants, img, args)
    if args.onnx:
        report_onnx(list(variants), times, outputs, args.batch)
    else:
        report_speed(times, args.batch)
        report_correctness(awpcn, img, outputs)
        if args.bf16:
            report_bf16(awpcn_cl, img[: args.bf16_batch])
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
