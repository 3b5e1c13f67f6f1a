"""Export a trained AWPCN run to ONNX and verify it against PyTorch.

    python export.py [--name RUN] [--which last] [--out model/RUN/awpcn.onnx] [--opset 17]
                     [--batch dynamic|N] [--no_flip] [--images DIR]

The graph (conv+BN folded, as test.py runs it):
  input   ``images``  float32 (N, 3, H, W), RGB, values in [0, 1], H x W = the run's input size
          (resize before; the ImageNet mean/std normalisation is inside the graph: do not
          normalise);
  outputs ``emb``     float32 (N, P, D) part embeddings,
          ``weights`` float32 (N, P) part weights (rows sum to 1).
Flip test-time augmentation is inside the graph as in test.py (each image and its mirror,
embeddings and weights averaged), so the outputs are test.py's features; ``--no_flip``
exports the single pass instead (half the work, features of the image alone). Rank with
the weighted part distance (evaluate.weighted_distance; README "Export").

    python export.py --name RUN --int8 [--calib 300] [--calib_data DIR] [--eval_data DIR]
                     [--max_map_loss 1.0] [--reduce_range]

After writing, the file is checked with onnxruntime (CPU) against PyTorch on random batches
and on real images (the run's dataset, or --images DIR). Printed: max |Δemb| (raw, beside
max |emb|), max |Δ| of the unit-normalised part embeddings and max |Δweights|; the last two
must be <= 1e-4, and the ranking of a small gallery must be identical. The raw |Δemb| is
not a criterion because it scales with the embeddings: on ResNet-50 at 384x128 PyTorch's own
fp32 paths (NCHW vs channels_last, folded vs not) differ by ~6e-4 on embeddings of size ~400
(1.6e-6 relative), as does onnxruntime; the distance only sees unit part vectors and the
weights. A failure deletes the file and says why. Needs requirements-export.txt.

``--int8`` then writes ``awpcn.int8.onnx`` beside it (``NAME.int8.onnx`` for ``--out NAME.onnx``):
onnxruntime's post-training static quantisation, QDQ format, per-channel int8 weights and
uint8 activations, the trunk only (the part pooling and the embedding and weight heads stay
fp32: a negligible share of the time, so int8 there could only cost accuracy), MinMax ranges calibrated on ``--calib`` images of the run's training split (evenly
spaced over the sorted file list, so deterministic). It is verified against an accuracy budget,
not 1e-4: Rank-1 and mAP of fp32 and int8 on the run's test split (or ``--eval_data DIR``),
printed side by side, and the file is refused (not kept; exit status 2) when int8 loses more
than ``--max_map_loss`` points of mAP. The fp32 file is kept either way. docs/deploy.md.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets
import evaluate
from inference import Extractor, ExportedModel, embed_batch, find_run, fuse_for_inference, load_model
from utils import UserError, add_run_arguments, cli, run_data_dir

TOL = 1e-4                  # max |Δemb|, |Δweights| between onnxruntime and PyTorch
REAL_QUERIES, REAL_GALLERY = 8, 16
INSTALL = "pip install -r requirements-export.txt"
CALIB_IMAGES = 300          # int8 calibration images: a few hundred, as onnxruntime's examples use
CALIB_BATCH = 16
MAX_MAP_LOSS = 1.0          # points of mAP int8 may lose against fp32
# Node-name prefix of the trunk's operators in the exported graph (OnnxNet.net.trunk): what
# --int8 quantises.
TRUNK_SCOPE = "/net/trunk/"


def require_onnx():
    """(onnx, onnxruntime) modules, or a one-line UserError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"ONNX export needs the optional packages onnx and onnxruntime "
                        f"({exc.name or exc} is not installed): {INSTALL}") from None
    return onnx, onnxruntime


class OnnxNet(nn.Module):
    """images (N,3,H,W) RGB in [0,1] -> (emb (N,P,D), weights (N,P)): normalisation, the folded
    network and (``flip``) flip TTA, through inference.embed_batch like test.py."""

    def __init__(self, fused: nn.Module, flip: bool = True):
        super().__init__()
        self.net, self.flip = fused, flip
        self.register_buffer("mean", torch.tensor(datasets.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(datasets.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):
        return embed_batch(self.net, (images - self.mean) / self.std, flip=self.flip, channels_last=False)


def onnx_net(model: nn.Module, flip: bool = True) -> OnnxNet:
    """The exportable network of an AWPCN model (a folded copy; ``model`` is left untouched)."""
    return OnnxNet(fuse_for_inference(model.cpu(), channels_last=False), flip).eval()


def _adaptive_avg_pool2d(g, x, output_size):
    """ONNX for adaptive average pooling into any bins (the built-in export only handles bin
    counts that divide the map, e.g. not 6 stripes of an 8-row map at 128x64): mean over each
    bin's slice of rows and columns, the bins PyTorch uses ([floor(i*h/n), ceil((i+1)*h/n)))."""
    from torch.onnx import symbolic_helper as sh

    out_h, out_w = sh._parse_arg(output_size, "is")
    try:
        _, _, h, w = x.type().varyingSizes()       # None for the dynamic batch dimension
    except (RuntimeError, ValueError, TypeError, AttributeError):
        h = w = None
    if h is None or w is None:
        return sh._unimplemented("adaptive_avg_pool2d", "the feature map's height and width must be static", x)

    def const(v):
        return g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64))

    def mean(v, axis):
        if g.opset >= 18:       # axes became an input in opset 18
            return g.op("ReduceMean", v, const(axis), keepdims_i=1)
        return g.op("ReduceMean", v, axes_i=[axis], keepdims_i=1)

    def bins(v, axis, size, n):
        if n == 1:
            return mean(v, axis)
        pieces = [mean(g.op("Slice", v, const(i * size // n), const(-(-(i + 1) * size // n)), const(axis)), axis)
                  for i in range(n)]
        return g.op("Concat", *pieces, axis_i=axis)

    return bins(bins(x, 3, w, out_w), 2, h, out_h)


@contextmanager
def _exact_adaptive_pooling(opset: int):
    torch.onnx.register_custom_op_symbolic("aten::adaptive_avg_pool2d", _adaptive_avg_pool2d, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::adaptive_avg_pool2d", opset)


def graph_metadata(net: OnnxNet, height: int, width: int) -> dict:
    """The metadata every exported graph carries: what inference.ExportedModel reads (flip_tta,
    parts, weighting) and what a reader of the file needs to use it."""
    return {"input": f"images float32 (N,3,{height},{width}) RGB in [0,1]; normalisation inside",
            "outputs": "emb (N,P,D) part embeddings; weights (N,P) part weights",
            "flip_tta": "in graph" if net.flip else "none", "parts": str(net.net.parts),
            "weighting": str(net.net.weighting),
            "distance": "D = sum_i w_i(q) w_i(g) (1 - cos(q_i, g_i)) / sum_j w_j(q) w_j(g)"}


def export_onnx(net: OnnxNet, path: str | os.PathLike, height: int, width: int, *, opset: int = 17,
                batch="dynamic", meta: dict | None = None) -> None:
    """Write ``net`` to ``path`` as ONNX: input ``images`` (N,3,height,width), outputs ``emb``,
    ``weights``; N dynamic or the fixed ``batch``; metadata :func:`graph_metadata` and ``meta``."""
    onnx, _ = require_onnx()
    example = torch.rand(2 if batch == "dynamic" else int(batch), 3, height, width)
    dynamic = ({"images": {0: "batch"}, "emb": {0: "batch"}, "weights": {0: "batch"}}
               if batch == "dynamic" else None)
    # The TorchScript-based exporter: the torch.export-based one (dynamo=True) needs the
    # onnxscript package besides; this one is in every torch that requirements.txt allows.
    kw = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), _exact_adaptive_pooling(opset), torch.no_grad():
        warnings.simplefilter("ignore")     # its deprecation notice and tracer notes on the flip TTA split
        torch.onnx.export(net, (example,), str(path), input_names=["images"], output_names=["emb", "weights"],
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, **kw)
    proto = onnx.load(str(path))
    for k, v in {**graph_metadata(net, height, width), **(meta or {})}.items():
        proto.metadata_props.add(key=k, value=str(v))
    onnx.save(proto, str(path))


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default onnxruntime's)."""
    _, ort = require_onnx()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_embed(sess, x: torch.Tensor, batch="dynamic") -> tuple[torch.Tensor, torch.Tensor]:
    """Run the exported graph on x (N,3,H,W) in [0,1] -> (emb (N,P,D), weights (N,P)); a fixed-batch
    graph gets chunks of ``batch``, the last one padded by repeating its first image."""
    x = x.float().contiguous()
    step = x.shape[0] if batch == "dynamic" else int(batch)
    embs, ws = [], []
    for s in range(0, x.shape[0], max(step, 1)):
        chunk = x[s:s + step]
        n = chunk.shape[0]
        if n < step:
            chunk = torch.cat([chunk, chunk[:1].expand(step - n, *chunk.shape[1:])])
        emb, w = sess.run(["emb", "weights"], {"images": chunk.numpy()})
        embs.append(torch.from_numpy(emb[:n]))
        ws.append(torch.from_numpy(w[:n]))
    return torch.cat(embs), torch.cat(ws)


def real_images(folders, height: int, width: int, limits) -> tuple[list[torch.Tensor], list[str]]:
    """Up to limits[i] images from folders[i] (recursive, sorted), resized to height x width as
    (n,3,H,W) float tensors in [0,1]; notes on what was skipped or missing."""
    batches, notes = [], []
    for folder, limit in zip(folders, limits):
        folder = Path(folder)
        if not folder.is_dir():
            notes.append(f"{folder}: not found")
            batches.append(torch.empty(0, 3, height, width))
            continue
        x, bad = load_images(_image_files(folder), height, width, limit)
        if bad:
            notes.append(f"{folder}: skipped {bad} undecodable image(s)")
        batches.append(x)
    return batches, notes


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in datasets.IMG_EXTS)


def load_images(paths, height: int, width: int, limit: int | None = None) -> tuple[torch.Tensor, int]:
    """The first ``limit`` decodable images of ``paths`` as (n,3,height,width) float in [0, 1]
    (datasets.load_image, PIL bilinear resize: test.py's pixels before normalisation) and the
    number of undecodable files skipped on the way."""
    from PIL import Image

    rows, bad = [], 0
    for p in paths:
        if limit is not None and len(rows) == limit:
            break
        try:
            img = datasets.load_image(p)
        except UserError:
            bad += 1
            continue
        img = img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR)
        rows.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255)
    return (torch.stack(rows) if rows else torch.empty(0, 3, height, width)), bad


def _real_batches(images: str | None, opts: dict, height: int, width: int):
    """(queries, gallery, notes): real images for the check, from ``images`` (one folder, split
    REAL_QUERIES / REAL_GALLERY) or else the run's dataset query/ and gallery folders."""
    if images:
        (both,), notes = real_images([images], height, width, (REAL_QUERIES + REAL_GALLERY,))
        return both[:REAL_QUERIES], both[REAL_QUERIES:], notes
    try:
        root, _ = datasets.resolve_root(run_data_dir(opts) or "")
    except UserError as exc:
        empty = torch.empty(0, 3, height, width)
        return empty, empty, [f"the run's dataset: {exc}"]
    (q, gal), notes = real_images([root / datasets.SPLITS["query"], root / datasets.SPLITS["gallery"]],
                                  height, width, (REAL_QUERIES, REAL_GALLERY))
    return q, gal, notes


def _ranking(q, g) -> torch.Tensor:
    dist = evaluate.weighted_distance(q[0], q[1], g[0], g[1])
    return torch.sort(dist, dim=1, stable=True).indices


def verify(sess, ext: Extractor, batch, real: tuple[torch.Tensor, torch.Tensor], *, seed: int = 0) -> dict:
    """Compare onnxruntime with PyTorch (``ext``, the extractor test.py's numbers come from).

    Random batches (sizes 1 and 7 for a dynamic graph, else ``batch``) and ``real`` =
    (queries (Q,3,H,W), gallery (G,3,H,W)) in [0,1]. Returns the max |Δemb| (raw), |Δ| of the
    unit-normalised part embeddings (what the distance compares), |Δweights|, the batch sizes
    tried and whether the gallery ranking of every query is identical (of the real images;
    of the last random batch when there are none).
    """
    g = torch.Generator().manual_seed(seed)
    sizes = (1, 7) if batch == "dynamic" else (int(batch),)
    d_emb = d_unit = d_w = 0.0
    outs = []
    for n in sizes:
        x = torch.rand(n, 3, ext.height, ext.width, generator=g)
        outs.append((x, ort_embed(sess, x, batch), ext(x)))
    q, gal = real
    if len(q) and len(gal):
        outs.append((None, ort_embed(sess, torch.cat([q, gal]), batch), ext(torch.cat([q, gal]))))
    for _x, (oe, ow), (te, tw) in outs:
        d_emb = max(d_emb, float((oe - te).abs().max()))
        d_unit = max(d_unit, float((F.normalize(oe, dim=-1) - F.normalize(te, dim=-1)).abs().max()))
        d_w = max(d_w, float((ow - tw).abs().max()))
    (oe, ow), (te, tw) = outs[-1][1], outs[-1][2]
    nq = len(q) if len(q) and len(gal) else max(1, len(oe) // 3)
    same = torch.equal(_ranking((oe[:nq], ow[:nq]), (oe[nq:], ow[nq:])), _ranking((te[:nq], tw[:nq]), (te[nq:], tw[nq:])))
    return {"emb": d_emb, "unit": d_unit, "weights": d_w, "sizes": sizes, "ranking_same": same, "queries": nq,
            "gallery": len(oe) - nq, "real": bool(len(q) and len(gal)),
            "emb_scale": float(outs[-1][2][0].abs().max())}


def claim_destination(out: Path) -> tuple[Path, list[Path]]:
    """Check that ``out`` can be written before minutes of exporting, and create the empty
    temp file beside it that the export fills. Returns (temp file, folders created for it,
    deepest first, to remove again if the export fails). A folder, a path under a file, a
    read-only or unwritable place is a one-line UserError and nothing is created."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file path, e.g. --out {out / 'awpcn.onnx'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break
    made = [p for p in out.parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder {out.parent} ({exc.strerror or exc}); "
                        "choose another --out") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    except OSError as exc:
        _remove_quietly(tmp, made)
        raise UserError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc}); "
                        "choose another --out") from None
    return tmp, made


def _remove_quietly(tmp: Path, made: list[Path]) -> None:
    """Undo claim_destination. Its own errors are swallowed: on a read-only filesystem the
    unlink fails too, and that must not hide the error that brought us here."""
    for path in [tmp, *made]:
        try:
            path.rmdir() if path != tmp else path.unlink(missing_ok=True)
        except OSError:
            pass


# --------------------------------------------------------------------------- int8
def int8_path(out: Path) -> Path:
    """Where --int8 writes beside the fp32 file: awpcn.onnx -> awpcn.int8.onnx."""
    stem = out.name[:-len(".onnx")] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".int8.onnx")


def require_quantization():
    """(onnxruntime.quantization, quant_pre_process), or a one-line UserError saying what to install."""
    require_onnx()
    try:
        from onnxruntime import quantization
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise UserError(f"--int8 needs onnxruntime's quantisation tools ({exc.name or exc} is not installed): "
                        f"{INSTALL}") from None
    return quantization, quant_pre_process


def calibration_files(folder: str | os.PathLike, n: int) -> list[Path]:
    """``n`` image files under ``folder``, evenly spaced over the sorted list: deterministic, and
    in a Market-layout folder (files sorted by identity) spread over every identity."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder for the int8 calibration images; pass --calib_data DIR "
                        "(training images of the run's dataset)")
    files = _image_files(folder)
    if not files:
        raise UserError(f"{folder}: no images to calibrate int8 with; pass --calib_data DIR")
    if n >= len(files):
        return files
    return [files[i * len(files) // n] for i in range(n)]


def quantize_int8(fp32: str | os.PathLike, dest: str | os.PathLike, images: torch.Tensor, *, batch="dynamic",
                  reduce_range: bool = False) -> int:
    """Write the int8 graph of export.py's ``fp32`` file to ``dest`` (not atomically: give a temp
    path): static QDQ quantisation of the trunk, per-channel int8 weights, uint8 activations,
    MinMax ranges over ``images`` (N,3,H,W) in [0, 1] fed through the graph ``CALIB_BATCH`` (or
    the fixed ``batch``) at a time."""
    onnx, _ = require_onnx()
    q, quant_pre_process = require_quantization()
    step = CALIB_BATCH if batch == "dynamic" else int(batch)

    class Batches(q.CalibrationDataReader):
        def __init__(self):
            self.starts = iter(range(0, images.shape[0], step))

        def get_next(self):
            s = next(self.starts, None)
            if s is None:
                return None
            chunk = images[s:s + step]
            if batch != "dynamic" and chunk.shape[0] < step:     # a repeated image leaves min/max as they are
                chunk = torch.cat([chunk, chunk[:1].expand(step - chunk.shape[0], *chunk.shape[1:])])
            return {"images": chunk.float().contiguous().numpy()}

    with tempfile.TemporaryDirectory(prefix="awpcn-int8-") as work:
        pre = Path(work) / "pre.onnx"
        # The quantiser needs every tensor's shape to place the QDQ pairs and per-channel axes
        # (and warns without this step): symbolic shape inference + onnxruntime's basic graph
        # optimisations, what onnxruntime documents as the pre-processing for quantisation.
        quant_pre_process(str(fp32), str(pre))
        nodes = onnx.load(str(pre)).graph.node
        trunk = [n for n in nodes if n.name.startswith(TRUNK_SCOPE)]
        if not any(n.op_type == "Conv" for n in trunk):
            raise UserError(f"{fp32}: no convolution named {TRUNK_SCOPE}... in the graph, so the trunk to quantise "
                            "cannot be found; export it with this export.py first")
        head = [n.name for n in nodes if not n.name.startswith(TRUNK_SCOPE)]
        del nodes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # uint8 activations: OpenVINO's int8 kernels take them (signed activations made its
            # outputs drift several times further from fp32 than onnxruntime's, in a probe), and
            # u8 x s8 is onnxruntime's fast path on x86.
            q.quantize_static(str(pre), str(dest), Batches(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                              reduce_range=reduce_range, activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
                              nodes_to_exclude=head)


def int8_convolutions(proto) -> tuple[int, int]:
    """(convolutions whose weights are int8, all convolutions) of an ONNX graph."""
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    return sum(len(n.input) > 1 and n.input[1] in dequantized for n in convs), len(convs)


def evaluate_extractor(ext: Extractor, data, *, weighting: str, ap: str = evaluate.DEFAULT_AP, desc: str = ""):
    """Rank-1/mAP of ``ext`` on ``data`` (a datasets.ReIDData with query and gallery) through
    evaluate.evaluate_features, as test.py ranks. Returns (evaluate.Result, (q_emb, q_w),
    (g_emb, g_w))."""
    q = ext([p for p, _, _ in data.query], desc=f"{desc} query".strip())
    g = ext([p for p, _, _ in data.gallery], desc=f"{desc} gallery".strip())
    qw, gw = evaluate.weights_for(weighting, q[1], g[1])
    res = evaluate.evaluate_features(q[0], qw, g[0], gw, [pid for _, pid, _ in data.query],
                                     [pid for _, pid, _ in data.gallery], [c for _, _, c in data.query],
                                     [c for _, _, c in data.gallery], ap=ap)
    return res, q, g


def _int8_inputs(args: argparse.Namespace, run_dir: Path, opts: dict):
    """Checked before minutes of exporting: (calibration files, test data of the int8 check)."""
    require_quantization()
    if args.calib < 1:
        raise UserError(f"--calib {args.calib}: must be at least 1 (int8 calibration images)")
    trained_on = run_data_dir(opts)
    if not (args.calib_data and args.eval_data) and not trained_on:
        raise UserError(f"{run_dir / 'opts.yaml'}: no data_root or data_dir key, so the run's dataset is unknown; "
                        "pass --calib_data DIR and --eval_data DIR")
    if args.calib_data:
        calib_dir = Path(args.calib_data)
    else:
        root, _ = datasets.resolve_root(trained_on, need=("train",))
        calib_dir = root / datasets.SPLITS["train"]
    files = calibration_files(calib_dir, args.calib)
    data = datasets.load_dataset(args.eval_data or trained_on, need=("query", "gallery"))
    return calib_dir, files, data


def export_int8(args: argparse.Namespace, out: Path, opts: dict, calib_dir: Path, files: list[Path], data) -> Path:
    """Quantise the verified fp32 graph ``out`` (see quantize_int8), compare Rank-1/mAP of fp32
    and int8 on ``data`` and keep the int8 file beside ``out`` only within --max_map_loss."""
    height, width = int(opts["height"]), int(opts["width"])
    dest = int8_path(out)
    tmp, made = claim_destination(dest)
    try:
        onnx, ort = require_onnx()
        t0 = time.perf_counter()
        images, bad = load_images(files, height, width)
        if not len(images):
            raise UserError(f"{calib_dir}: none of the {len(files)} calibration images can be decoded; "
                            "pass --calib_data DIR")
        quantize_int8(out, tmp, images, batch=args.batch, reduce_range=args.reduce_range)
        proto = onnx.load(str(tmp))
        n_int8, n_conv = int8_convolutions(proto)
        proto.metadata_props.add(key="quantization", value=(
            f"int8 static QDQ (onnxruntime {ort.__version__}): trunk only, per-channel int8 weights"
            f"{' (reduce_range)' if args.reduce_range else ''}, uint8 activations, MinMax on {len(images)} images "
            f"of {calib_dir}"))
        onnx.save(proto, str(tmp))
        del proto
        t_quant = time.perf_counter() - t0
        print(f"int8: {n_int8} of {n_conv} convolutions quantised, calibrated on {len(images)} images of {calib_dir}"
              + (f" ({bad} undecodable skipped)" if bad else "") + f" in {t_quant:.0f} s; checking accuracy on "
              f"{data.root} ({len(data.query)} queries x {len(data.gallery)} gallery)", flush=True)
        weighting = opts.get("weighting", "adaptive")
        results = {}
        for name, path in (("fp32", out), ("int8", tmp)):
            ext = Extractor(ExportedModel(path, "onnxruntime"), height, width, flip=not args.no_flip, batch_size=32)
            results[name] = evaluate_extractor(ext, data, weighting=weighting, desc=name)[0]
            del ext
    except BaseException:
        _remove_quietly(tmp, made)
        raise
    r32, r8 = results["fp32"], results["int8"]
    loss = 100 * (r32.mAP - r8.mAP)
    formula = evaluate.AP_FORMULAS[r32.ap_formula]
    print(f"int8 vs fp32 (onnxruntime; weights: {weighting}; AP: {formula}):")
    print(f"  {'':<5} {'Rank-1':>7} {'mAP':>7}")
    for name, r in results.items():
        print(f"  {name:<5} {100 * r.rank1:6.2f}% {100 * r.mAP:6.2f}%")
    summary = (f"fp32 Rank-1 {100 * r32.rank1:.2f}% mAP {100 * r32.mAP:.2f}%, int8 Rank-1 {100 * r8.rank1:.2f}% "
               f"mAP {100 * r8.mAP:.2f}% on {data.root}")
    if loss > args.max_map_loss:
        _remove_quietly(tmp, made)
        raise UserError(f"{dest}: int8 loses {loss:.2f} points of mAP (> --max_map_loss {args.max_map_loss:g}); "
                        f"file not kept ({out} is). {summary}. Try more calibration images (--calib), "
                        "--reduce_range (CPUs without VNNI), or deploy the fp32 file")
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        _remove_quietly(tmp, made)
        raise UserError(f"{dest}: cannot put the int8 graph there ({exc.strerror or exc}); nothing written") from None
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB): mAP {-loss:+.2f} points vs fp32 "
          f"(allowed loss {args.max_map_loss:g}); {summary}")
    return dest


# --------------------------------------------------------------------------- command line
def run_export(args: argparse.Namespace) -> Path:
    onnx, ort = require_onnx()
    run_dir = find_run(args.runs_dir, args.name)
    model, opts, ckpt = load_model(run_dir, args.which)
    height, width = int(opts["height"]), int(opts["width"])
    out = Path(args.out) if args.out else run_dir / "awpcn.onnx"
    flip = not args.no_flip
    int8_inputs = _int8_inputs(args, run_dir, opts) if args.int8 else None
    ext = Extractor(model, height, width, device="cpu", flip=flip)
    net = onnx_net(model, flip)

    tmp, made = claim_destination(out)
    try:
        try:
            # The run, checkpoint and epoch: inference.Extractor.from_run refuses a stale export by them.
            meta = {"awpcn_run": str(run_dir), "checkpoint": f"{args.which}.pt", "epoch": str(ckpt.get("epoch", "?"))}
            export_onnx(net, tmp, height, width, opset=args.opset, batch=args.batch, meta=meta)
            onnx.checker.check_model(str(tmp))
        except Exception as exc:  # exporter errors come in many types; all mean "not exported"
            raise UserError(f"{run_dir / (args.which + '.pt')}: ONNX export failed ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:300]}); nothing written to {out}") from None

        q, gal, notes = _real_batches(args.images, opts, height, width)
        try:
            sess = ort_session(tmp)
        except Exception as exc:  # onnxruntime's own exception types
            raise UserError(f"{out}: onnxruntime cannot load the exported graph ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:300]}); nothing written") from None
        res = verify(sess, ext, args.batch, (q, gal))
        del sess
    except BaseException:
        _remove_quietly(tmp, made)
        raise

    sizes = ", ".join(map(str, res["sizes"]))
    what = (f"{res['queries']} real queries x {res['gallery']} real gallery images"
            if res["real"] else f"{res['queries']} x {res['gallery']} random images (no real images: "
                                f"{'; '.join(notes) or 'none found'}; pass --images DIR)")
    report = (f"onnxruntime {ort.__version__} (CPU) vs PyTorch {torch.__version__}: random batches of {sizes}"
              + (f" and {len(q) + len(gal)} real images" if res["real"] else "")
              + f": max |Δemb| {res['emb']:.2e} (max |emb| {res['emb_scale']:.3g}), max |Δemb/‖emb‖| "
              f"{res['unit']:.2e}, max |Δweights| {res['weights']:.2e} (limit {TOL:g} on the last two); "
              f"ranking of {what}: {'identical' if res['ranking_same'] else 'DIFFERENT'}")
    failed = [f"max |Δemb/‖emb‖| {res['unit']:.2e} > {TOL:g}"] * (res["unit"] > TOL) \
        + [f"max |Δweights| {res['weights']:.2e} > {TOL:g}"] * (res["weights"] > TOL) \
        + ["the gallery ranking differs"] * (not res["ranking_same"])
    if failed:
        _remove_quietly(tmp, made)
        raise UserError(f"{out}: the exported graph does not match PyTorch ({'; '.join(failed)}); file deleted. "
                        f"{report}")
    try:
        os.replace(tmp, out)
    except OSError as exc:      # out turned into a folder, or the place went away, while we exported
        _remove_quietly(tmp, made)
        raise UserError(f"--out {out}: cannot put the verified graph there ({exc.strerror or exc}); "
                        "nothing written, choose another --out") from None
    batch = "dynamic batch" if args.batch == "dynamic" else f"fixed batch {args.batch}"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; opset {args.opset}, {batch}; input images float32 "
          f"(N,3,{height},{width}) RGB in [0,1], normalised inside; outputs emb (N,{opts['parts']},"
          f"{opts.get('embed_dim', '?')}), weights (N,{opts['parts']}); flip TTA "
          f"{'inside the graph' if flip else 'not applied'})")
    for note in notes:
        print(f"note: {note}")
    print(f"verified: {report}", flush=True)
    if int8_inputs:
        export_int8(args, out, opts, *int8_inputs)
    return out


def _batch(value: str):
    if value == "dynamic":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected 'dynamic' or a positive batch size")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Export a trained AWPCN run to ONNX, verified against PyTorch.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--out", default=None, help="ONNX file to write (default: RUNS_DIR/NAME/awpcn.onnx)")
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    ap.add_argument("--batch", type=_batch, default="dynamic", help="'dynamic' batch size or a fixed N")
    ap.add_argument("--no_flip", action="store_true",
                    help="export the single pass (no flip TTA in the graph): half the work, not test.py's features")
    ap.add_argument("--images", default=None,
                    help="folder of real images for the check (default: the run's dataset query/gallery)")
    g = ap.add_argument_group("int8 (docs/deploy.md)")
    g.add_argument("--int8", action="store_true",
                   help="also write NAME.int8.onnx beside the fp32 file: static int8 quantisation, kept only within "
                        "--max_map_loss")
    g.add_argument("--calib", type=int, default=CALIB_IMAGES, help="calibration images (evenly spaced over the folder)")
    g.add_argument("--calib_data", default=None,
                   help="folder of calibration images (default: the run's dataset's bounding_box_train)")
    g.add_argument("--eval_data", default=None,
                   help="dataset whose query/gallery check the int8 accuracy (default: the run's dataset)")
    g.add_argument("--max_map_loss", type=float, default=MAX_MAP_LOSS,
                   help="refuse the int8 file when it loses more mAP than this (points) against fp32")
    g.add_argument("--reduce_range", action="store_true",
                   help="7-bit weights: avoids the u8 x s8 saturation of CPUs without VNNI (AVX2 only)")
    return ap


@cli
def main(argv=None) -> int:
    run_export(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
