"""Using a trained AWPCN outside the scripts: conv+BN folding, model loading, the one
feature-extraction loop (:func:`extract`) and an extractor built on it.

    from inference import Extractor
    ext = Extractor.from_run("model/market")      # opts.yaml + last.pt of a run
    emb, w = ext(["a.jpg", "b.jpg"])               # (2, P, D) float32, (2, P) float32
    d = ext.distance(ext(crops, bgr=True), (emb, w))   # (len(crops), 2) weighted part distance

:class:`Extractor` computes the numbers test.py computes for the same image: the same
checkpoint loading (:func:`load_model`), decoding (``datasets.load_image``), resize and
normalisation (``datasets.TestTransform``), folded network and flip TTA (:func:`embed_batch`),
through the same loop (:func:`extract`); :func:`features_of` gives a dataset's query and
gallery features in the layout features.pt holds.

``Extractor.from_run(run, runtime="onnxruntime" | "openvino")`` runs export.py's ONNX graph
(``awpcn.onnx``, or ``int8=True``: ``awpcn.int8.onnx``) instead of PyTorch, through the same
loop and the same preprocessing (:class:`ExportedModel`; docs/deploy.md).

:func:`fuse_for_inference` folds every BatchNorm2d of the trunk into the convolution in
front of it (``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``,
using the BN's running statistics, i.e. exactly what eval mode computes) and replaces the BN
by ``nn.Identity``. The outputs are the eval-mode outputs up to float rounding (~1e-6
relative); each BN's separate pass over its activation map is gone. It also converts the
copy to channels_last, the faster memory format for convolutions on CPU (oneDNN) and on
recent GPUs. The copy must only be used for inference: the folded model has no BN to train
and no running statistics to update.
"""
from __future__ import annotations

import copy
import importlib
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader

import datasets
import evaluate
from model import AWPCN, BACKBONES, HEADS, RUN_KEYS, WEIGHTINGS, build_model
from utils import UserError, load_checkpoint, load_yaml, select_device
from utils import progress as progress_bar

__all__ = ["fuse_for_inference", "fuse_conv_bn_pairs", "find_run", "check_options", "load_options", "load_model",
           "add_eval_arguments", "embed_batch", "extract", "features_of", "Extractor", "ExportedModel",
           "RUNTIMES", "EXPORT_FILE", "INT8_FILE", "require_runtime"]


def _pairs_in(module: nn.Module):
    """(conv name, bn name) pairs of direct children where a BatchNorm2d follows a Conv2d.

    For an ``nn.Sequential``: consecutive children. For any other module (a torchvision
    Bottleneck / BasicBlock): the ``convK`` / ``bnK`` naming convention, which those blocks
    apply in exactly that order (conv -> its bn) in their forward.
    """
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        names = list(children)
        for a, b in zip(names, names[1:]):
            if isinstance(children[a], nn.Conv2d) and isinstance(children[b], nn.BatchNorm2d):
                yield a, b
        return
    for name, child in children.items():
        if isinstance(child, nn.Conv2d) and name.startswith("conv"):
            bn = "bn" + name[len("conv"):]
            if isinstance(children.get(bn), nn.BatchNorm2d):
                yield name, bn


def fuse_conv_bn_pairs(module: nn.Module) -> int:
    """Fold, in place and recursively, each BatchNorm2d into its preceding Conv2d.

    ``module`` must be in eval mode. Returns the number of pairs folded.
    """
    if any(m.training for m in module.modules()):
        raise ValueError("fuse_conv_bn_pairs needs an eval-mode module (BN running statistics are folded)")
    return _fuse(module)


def _fuse(module: nn.Module) -> int:
    count = 0
    for conv_name, bn_name in list(_pairs_in(module)):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # a BN using batch statistics at eval cannot be folded
        setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(module, bn_name, nn.Identity().eval())
        count += 1
    for child in module.children():
        count += _fuse(child)
    return count


@torch.no_grad()
def fuse_for_inference(model: nn.Module, *, channels_last: bool = True, inplace: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with conv+BN folded (and channels_last weights).

    Works on an :class:`model.AWPCN` (its ``trunk``) and on any module built from
    torchvision ResNet pieces. The per-part head (a BatchNorm1d after a batched matmul)
    is left as is: it is a negligible share of the time. ``inplace=True`` modifies and
    returns ``model`` itself (saves one copy of the weights; ``model`` can no longer train).
    """
    fused = model if inplace else copy.deepcopy(model)
    fused.eval()
    fuse_conv_bn_pairs(fused)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


# --------------------------------------------------------------------------- runs
def file_stamp(path: str | os.PathLike, st: os.stat_result | None = None) -> list[int]:
    """What tells a file's content changed without reading it: size, mtime, and the inode and
    ctime, which ``touch -r`` / ``cp -p`` cannot set back (a same-size replacement with its
    mtime restored keeps size and mtime). ``st``: a stat already taken."""
    st = st or os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def find_run(runs_dir: str | os.PathLike, name: str) -> Path:
    """``runs_dir/name`` if it holds a trained run (an opts.yaml); else a UserError listing the runs there."""
    run_dir = Path(runs_dir) / name
    if not (run_dir / "opts.yaml").is_file():
        root = Path(runs_dir)
        runs = sorted(p.name for p in root.iterdir() if (p / "opts.yaml").is_file()) if root.is_dir() else []
        raise UserError(f"{run_dir}: no trained run here (no opts.yaml). "
                        + (f"Runs in {root}: {', '.join(runs)}" if runs else f"{root} holds no runs; train one with train.py"))
    return run_dir


# RUN_KEYS (model.py): what defines the network and its input; a checkpoint only reproduces its
# numbers under these, so opts.yaml must say what the checkpoint was trained with.
# Without these no tool can rebuild the model, whatever the checkpoint stores.
REQUIRED_KEYS = ("backbone", "parts", "num_classes", "height", "width")
_INT, _NUMBER, _STR = "an integer", "a number", "a string"
OPTION_TYPES = {"backbone": _STR, "parts": _INT, "embed_dim": _INT, "weighting": _STR, "head": _STR,
                "temperature": _NUMBER, "dropout": _NUMBER, "last_stride": _INT, "num_classes": _INT,
                "height": _INT, "width": _INT, "data_root": _STR, "data_dir": _STR, "val_ids": _NUMBER}
OPTION_CHOICES = {"backbone": tuple(BACKBONES), "weighting": WEIGHTINGS, "head": HEADS, "last_stride": (1, 2)}


def _type_ok(value, kind: str) -> bool:
    if isinstance(value, bool):       # YAML's yes/no: a bool is an int to Python, never a size
        return False
    return isinstance(value, {_INT: int, _NUMBER: (int, float), _STR: str}[kind])


def check_options(opts: dict, path: Path, stored: dict | None = None, ckpt_name: str = "the checkpoint") -> None:
    """Refuse an opts.yaml (at ``path``) that lacks a key, holds a value of the wrong type or
    choice, or disagrees with ``stored`` (the options saved inside the checkpoint) on a key of
    :data:`RUN_KEYS`. Every message names opts.yaml, the key, both values and the fix."""
    stored = stored if isinstance(stored, dict) else {}

    def fix(key):
        if key in stored:
            return f"set it back to `{key}: {stored[key]!r}` ({ckpt_name} was trained with that)"
        return "restore the opts.yaml train.py wrote, or retrain the run"

    for key in REQUIRED_KEYS + tuple(k for k in RUN_KEYS if k in stored):
        if key not in opts:
            raise UserError(f"{path}: no {key!r} key; {fix(key)}")
    for key, kind in OPTION_TYPES.items():
        if key not in opts or (opts[key] is None and key in ("data_root", "data_dir", "val_ids")):
            continue
        value = opts[key]
        if not _type_ok(value, kind):
            raise UserError(f"{path}: {key} is {value!r} ({type(value).__name__}), expected {kind}; {fix(key)}")
        if key in OPTION_CHOICES and value not in OPTION_CHOICES[key]:
            raise UserError(f"{path}: {key} is {value!r}, expected one of "
                            f"{', '.join(map(str, OPTION_CHOICES[key]))}; {fix(key)}")
    for key in ("parts", "embed_dim", "num_classes", "height", "width"):
        if key in opts and opts[key] < 1:
            raise UserError(f"{path}: {key} is {opts[key]!r}, expected at least 1; {fix(key)}")
    differs = [key for key in RUN_KEYS if key in stored and stored[key] != opts[key]]
    if differs:
        raise UserError(f"{path} disagrees with {ckpt_name} (hand-edited, or copied from another run?): "
                        + "; ".join(f"{k} is {opts[k]!r} in opts.yaml but {stored[k]!r} in the checkpoint"
                                    for k in differs)
                        + ". Set opts.yaml back to the checkpoint's values (a run's size and model are fixed "
                          "once trained; train a new run for others)")


def load_options(run_dir: str | os.PathLike, which: str = "last") -> tuple[dict, dict]:
    """(opts, checkpoint) of a run, opts.yaml checked against the checkpoint (:func:`check_options`)."""
    opts_path = Path(run_dir) / "opts.yaml"
    opts = load_yaml(opts_path)
    ckpt = load_checkpoint(Path(run_dir) / f"{which}.pt")
    check_options(opts, opts_path, ckpt.get("opts"), f"{which}.pt")
    return opts, ckpt


def run_options(run_dir: str | os.PathLike, which: str = "last") -> dict:
    """A run's opts.yaml for display, held to the checkpoint's own options as every tool holds
    it (:func:`load_options`); {} when there is none. Without the checkpoint (features kept,
    checkpoints deleted) only its keys and types can be checked."""
    path = Path(run_dir) / "opts.yaml"
    if not path.is_file():
        return {}
    if (Path(run_dir) / f"{which}.pt").is_file():
        return load_options(run_dir, which)[0]
    opts = load_yaml(path)
    check_options(opts, path)
    return opts


def load_model(run_dir: Path, which: str = "last") -> tuple[AWPCN, dict, dict]:
    """Rebuild the run's model from opts.yaml and load a checkpoint. Returns (model, opts, ckpt).

    Every tool loads a run here, so an opts.yaml that does not describe the checkpoint (see
    :func:`check_options`) is refused by all of them alike.
    """
    opts, ckpt = load_options(run_dir, which)
    opts_path = Path(run_dir) / "opts.yaml"
    model = build_model(opts, pretrained="none", weights="")
    state = ckpt.get("model") or {}
    own = model.state_dict()
    diffs = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if diffs or missing or unexpected:
        raise UserError(
            f"{run_dir / (which + '.pt')} does not fit the model described by {opts_path}: "
            + "; ".join(diffs[:3] + [f"{len(missing)} missing keys {missing[:2]}"] * bool(missing)
                        + [f"{len(unexpected)} unexpected keys {unexpected[:2]}"] * bool(unexpected)))
    model.load_state_dict(state)
    return model, opts, ckpt


# --------------------------------------------------------------------------- command lines
def add_eval_arguments(ap, *, weighting_help: str, ap_formula: bool = True, rerank: bool = True) -> None:
    """--weighting (model.WEIGHTINGS, default None: the run's own), and unless turned off --ap
    (evaluate.AP_FORMULAS) and --rerank (at evaluate.RERANK_SETTINGS): the words every tool
    that ranks a run's features uses. Here, not in utils.py next to add_run_arguments: the
    words belong to model.py and evaluate.py, which import utils."""
    ap.add_argument("--weighting", default=None, choices=WEIGHTINGS, help=weighting_help)
    if ap_formula:
        ap.add_argument("--ap", default=evaluate.DEFAULT_AP, choices=list(evaluate.AP_FORMULAS),
                        help="official: Market-1501 trapezoid AP; standard: torchreid/fast-reid AP")
    if rerank:
        ap.add_argument("--rerank", action="store_true",
                        help=f"also report k-reciprocal re-ranking ({evaluate.RERANK_SETTINGS})")


# --------------------------------------------------------------------------- extraction
def embed_batch(model: nn.Module, img: torch.Tensor, *, flip: bool = True, channels_last: bool = True,
                amp_ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """img (B,3,H,W) normalised, on the model's device -> emb (B,P,D) float32, weights (B,P) float32.

    Flip TTA: the image and its mirror go through the network in one batch of 2B; their part
    embeddings and weights are averaged. The body of :func:`extract`'s loop, and the graph
    export.py traces; no grad handling here: callers run it under ``torch.inference_mode``.
    """
    n = img.shape[0]
    if flip:
        img = torch.cat([img, img.flip(3)])
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    with amp_ctx if amp_ctx is not None else nullcontext():
        emb, w = model(img)
    emb, w = emb.float(), w.float()
    if flip:
        emb, w = (emb[:n] + emb[n:]) / 2, (w[:n] + w[n:]) / 2
    return emb, w


_EMPTY = "an image of height or width 0 has no pixels to embed; drop empty crops before extracting"


def _describe(x) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(x, np.ndarray) else "torch tensor"
        return f"{kind} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def _is_pil(x) -> bool:
    from PIL import Image
    return isinstance(x, Image.Image)


def _as_items(images, bgr: bool, skip_bad: bool = False):
    """-> ("tensor", (N,3,H,W) float tensor) or ("list", [item, ...]), types checked up front
    (with ``skip_bad``, a missing path is left for the extraction to report as one bad item)."""
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != 3:
            raise UserError(f"images: {_describe(images)}; expected a float tensor (N,3,H,W) with values in "
                            "[0, 1] (uint8 pixels: divide by 255, or pass HxWx3 numpy arrays)")
        if x.shape[0] and 0 in x.shape[2:]:
            raise UserError(f"images: {_describe(images)}: {_EMPTY}")
        if x.numel():
            lo, hi = float(x.min()), float(x.max())
            if not (0.0 <= lo and hi <= 1.0):   # also catches NaN
                raise UserError(f"images: tensor values span [{lo:.4g}, {hi:.4g}]; expected unnormalised RGB "
                                "in [0, 1] (the extractor normalises; undo any mean/std normalisation first)")
        return "tensor", x[:, [2, 1, 0]] if bgr else x
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (str, os.PathLike, np.ndarray)) or _is_pil(images):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise UserError(f"images: {_describe(images)}; expected a list of paths, PIL images or HxWx3 uint8 "
                        "numpy arrays, or a float tensor (N,3,H,W) in [0, 1]")
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            if not skip_bad and not Path(item).is_file():
                raise UserError(f"images[{i}]: {item}: no such file")
        elif isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise UserError(f"images[{i}]: {_describe(item)}; expected HxWx3 uint8 (RGB, or BGR with "
                                "bgr=True)")
            if 0 in item.shape:
                raise UserError(f"images[{i}]: {_describe(item)}: {_EMPTY}")
        elif _is_pil(item):
            if 0 in item.size:
                raise UserError(f"images[{i}]: PIL image of size {item.size[0]}x{item.size[1]}: {_EMPTY}")
        else:
            raise UserError(f"images[{i}]: {_describe(item)}; expected a path, a PIL image or an HxWx3 "
                            "uint8 numpy array")
    return "list", list(images)


class _Images(torch.utils.data.Dataset):
    """List items -> (3,H,W) normalised as ``datasets.TestTransform`` makes them (the numbers of
    every extraction, whoever asks), or, with ``skip_bad``, the reason an item cannot be read."""

    def __init__(self, items: list, transform: datasets.TestTransform, bgr: bool, skip_bad: bool):
        self.items, self.transform, self.bgr, self.skip_bad = items, transform, bgr, skip_bad

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            return self._tensor(i, self.items[i]), None
        except UserError as exc:
            if not self.skip_bad:
                raise
            return None, (i, str(exc))

    def _tensor(self, i: int, item) -> torch.Tensor:
        if isinstance(item, (str, os.PathLike)):
            if not Path(item).is_file():
                raise UserError(f"images[{i}]: {item}: no such file")
            img = datasets.load_image(item)
        elif isinstance(item, np.ndarray):
            from PIL import Image
            img = Image.fromarray(np.ascontiguousarray(item[:, :, ::-1] if self.bgr else item), "RGB")
        else:
            try:
                img = datasets.to_rgb(item)
            except (OSError, ValueError) as exc:
                raise UserError(f"images[{i}]: PIL image ({item.mode}, {item.size}) cannot be decoded: {exc}") from None
        return self.transform.to_tensor(img)


def _stack(rows) -> tuple[torch.Tensor | None, list, int]:
    """DataLoader collate of :class:`_Images` rows: (the good ones stacked or None, [(index,
    reason)] of the bad ones, how many items the batch covered)."""
    good = [x for x, _ in rows if x is not None]
    return (torch.stack(good) if good else None), [bad for _, bad in rows if bad is not None], len(rows)


def _tensor_batches(x: torch.Tensor, transform: datasets.TestTransform, batch_size: int, device):
    """Batches of a float tensor in [0, 1], resized to the transform's size and normalised."""
    width, height = transform.size
    for s in range(0, x.shape[0], batch_size):
        b = x[s:s + batch_size].to(device, torch.float32)
        if tuple(b.shape[2:]) != (height, width):
            b = F.interpolate(b, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        # The same arithmetic as TestTransform on 0..255 pixels.
        yield (b * 255).sub_(transform.mean.to(b.device)).div_(transform.std.to(b.device)), [], b.shape[0]


@torch.inference_mode()
def extract(net: nn.Module, images, height: int, width: int, *, device, batch_size: int = 64, workers: int = 0,
            flip: bool = True, amp: bool = False, bgr: bool = False, skip_bad: bool = False,
            progress: bool | None = None, desc: str = "extract") -> tuple[torch.Tensor, torch.Tensor, list]:
    """The one feature-extraction loop: test.py, the benchmarks and :class:`Extractor` all run it.

    ``net``: an AWPCN as :func:`fuse_for_inference` returns it (eval mode, channels_last), on
    ``device``, or an :class:`ExportedModel` (CPU; ``amp`` does not apply). ``images``: what :class:`Extractor` takes (image paths, PIL images, HxWx3 uint8
    arrays, a float tensor in [0, 1]). Images are decoded and resized to ``height`` x ``width``
    (``workers`` loader processes; 0 = in this process, the only choice for in-memory images),
    ``batch_size`` at a time, through :func:`embed_batch` (flip TTA unless ``flip=False``;
    ``amp``: fp16 autocast on CUDA, bf16 on CPU).

    Returns (emb (N,P,D) float32, weights (N,P) float32, bad) on the CPU. A bad item (a path
    that is not an image, a wrong type) is a UserError naming it; with ``skip_bad`` an
    undecodable or missing file is left out instead and listed in ``bad`` as (index, reason).
    ``progress``: a bar (None: on a terminal, when there is more than one batch to wait for).
    """
    kind, items = _as_items(images, bgr, skip_bad)
    device = torch.device(device)
    transform = datasets.TestTransform(height, width)
    if kind == "tensor":
        batches = _tensor_batches(items, transform, batch_size, device)
    else:
        batches = DataLoader(_Images(items, transform, bgr, skip_bad), batch_size=batch_size, shuffle=False,
                             num_workers=workers, pin_memory=device.type == "cuda", collate_fn=_stack)
    amp_ctx = (torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
               if amp else nullcontext())
    if progress is None and len(items) <= batch_size:
        progress = False
    embs, weights, bad = [], [], []
    with progress_bar(desc=desc, total=len(items), unit="img", show=progress) as bar:
        for x, bad_rows, count in batches:
            bad += bad_rows
            if x is not None:
                if isinstance(net, ExportedModel):
                    emb, w = net.embed(x, flip=flip)
                else:
                    emb, w = embed_batch(net, x.to(device, non_blocking=True), flip=flip, channels_last=True,
                                         amp_ctx=amp_ctx)
                embs.append(emb.cpu())
                weights.append(w.cpu())
            bar.update(count)
    if not embs:
        return torch.empty(0, net.parts, net.embed_dim), torch.empty(0, net.parts), bad
    return torch.cat(embs), torch.cat(weights), bad


def features_of(model: AWPCN, opts: dict, data, *, device, batchsize: int = 128, workers: int = 2,
                flip: bool = True, amp: bool = False) -> tuple[dict, float]:
    """Query and gallery features of an in-memory model on ``data`` (a datasets.ReIDData), in
    the layout features.pt holds (without the run's name, checkpoint and epoch), and the
    extraction seconds. ``model`` is moved to ``device``, its weights left as they are (a folded
    copy extracts)."""
    # Folded conv+BN and channels_last: the faster network (docs/performance.md, bench/extract_speed.py).
    net = fuse_for_inference(model.to(device))
    kw = dict(device=device, batch_size=batchsize, workers=workers, flip=flip, amp=amp)
    t0 = time.perf_counter()
    qf, qw, _ = extract(net, [p for p, _, _ in data.query], opts["height"], opts["width"], desc="query", **kw)
    gf, gw, _ = extract(net, [p for p, _, _ in data.gallery], opts["height"], opts["width"], desc="gallery", **kw)
    t_extract = time.perf_counter() - t0
    features = {
        "data_root": str(data.root), "parts": int(opts["parts"]), "weighting": opts.get("weighting", "adaptive"),
        "query": {"emb": qf, "weights": qw, "pids": torch.tensor([p for _, p, _ in data.query]),
                  "cams": torch.tensor([c for _, _, c in data.query]), "paths": [p for p, _, _ in data.query]},
        "gallery": {"emb": gf, "weights": gw, "pids": torch.tensor([p for _, p, _ in data.gallery]),
                    "cams": torch.tensor([c for _, _, c in data.gallery]), "paths": [p for p, _, _ in data.gallery]},
    }
    return features, t_extract


# --------------------------------------------------------------------------- exported graphs
RUNTIMES = ("torch", "onnxruntime", "openvino")
EXPORT_FILE, INT8_FILE = "awpcn.onnx", "awpcn.int8.onnx"       # what export.py writes into a run
_INSTALL_EXPORT = "pip install -r requirements-export.txt"


def require_runtime(runtime: str):
    """The module of an exported-graph runtime ("onnxruntime" or "openvino"), or a one-line
    UserError naming the pip package to install."""
    if runtime not in RUNTIMES[1:]:
        raise UserError(f"runtime={runtime!r}: expected one of {', '.join(map(repr, RUNTIMES))}")
    try:
        return importlib.import_module(runtime)
    except ImportError:
        # The PyPI names are the module names for both runtimes.
        raise UserError(f"runtime={runtime!r} needs the {runtime} package, which is not installed: "
                        f"pip install {runtime} (or {_INSTALL_EXPORT})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


class ExportedModel:
    """export.py's ONNX graph (fp32 or int8) loaded in onnxruntime or OpenVINO, on the CPU.

    ``model(x)``: x (N,3,H,W) float32 RGB in [0, 1] at the graph's size -> (emb (N,P,D),
    weights (N,P)) float32 CPU tensors, the graph's outputs (flip TTA inside when
    ``flip_in_graph``; a fixed-batch graph gets chunks of its batch, the last padded with its
    first image). :meth:`embed` is what :func:`extract`'s loop calls instead of
    :func:`embed_batch`. ``threads``: the runtime's intra-op threads (default: the runtime's).

    Attributes: path, runtime, threads, height, width, parts, embed_dim, batch (None: dynamic),
    flip_in_graph, weighting, meta (the file's metadata, as export.py wrote it), precision
    ("fp32" or "int8").
    """

    def __init__(self, path: str | os.PathLike, runtime: str = "onnxruntime", *, threads: int | None = None):
        self.path, self.runtime = Path(path), runtime
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UserError(f"threads={threads!r}: expected a positive number of threads (or None: the "
                            "runtime's default)")
        self.threads = threads
        module = require_runtime(runtime)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file; export.py writes it (python export.py --name RUN, "
                            "--int8 for the int8 file)")
        try:
            load = self._load_onnxruntime if runtime == "onnxruntime" else self._load_openvino
            shape, emb_shape, meta = load(module)
        except UserError:
            raise
        except Exception as exc:  # each runtime has its own exception types; all mean "cannot load"
            raise UserError(f"{self.path}: {runtime} cannot load it ({_first_line(exc)}); is it a file export.py "
                            "wrote? Export it again with export.py") from None
        if "flip_tta" not in meta or "parts" not in meta or len(shape) != 4 or not all(
                isinstance(d, int) for d in shape[1:]):
            raise UserError(f"{self.path}: not an AWPCN graph export.py wrote (no flip_tta/parts metadata or no "
                            "fixed (3,H,W) input); export it with export.py")
        self.meta = meta
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.height, self.width = shape[2], shape[3]
        self.flip_in_graph = meta["flip_tta"] == "in graph"
        self.parts = int(meta["parts"])
        self.weighting = meta.get("weighting", "adaptive")
        self.precision = "int8" if meta.get("quantization") else "fp32"
        d = emb_shape[-1] if emb_shape else None
        # An output size the runtime cannot tell statically comes from one pass over a blank image.
        self.embed_dim = d if isinstance(d, int) else int(self(torch.zeros(1, 3, self.height, self.width))[0].shape[-1])
        mean_std = datasets.TestTransform(self.height, self.width)
        self._mean, self._std = mean_std.mean[None], mean_std.std[None]      # (1,3,1,1), 0..255 scale

    def _load_onnxruntime(self, ort):
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self._run = lambda x: sess.run(["emb", "weights"], {"images": x})
        outputs = {o.name: o.shape for o in sess.get_outputs()}
        return sess.get_inputs()[0].shape, outputs.get("emb"), dict(sess.get_modelmeta().custom_metadata_map)

    def _load_openvino(self, ov):
        core = ov.Core()
        model = core.read_model(str(self.path))
        # f32: OpenVINO's CPU plugin would otherwise run in bf16 on CPUs that have it (AMX,
        # AVX512-BF16), and the fp32 file would not give PyTorch's numbers. An int8 file keeps its
        # int8 layers either way.
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        out_emb, out_w = compiled.output("emb"), compiled.output("weights")

        def run(x):
            res = request.infer({"images": x})
            return res[out_emb].copy(), res[out_w].copy()      # the request's buffers are reused by the next call
        self._run = run
        meta = ({k: v.astype(str) for k, v in model.get_rt_info()["framework"].items()}
                if model.has_rt_info("framework") else {})

        def dims(partial):
            return [d.get_length() if d.is_static else None for d in partial]
        emb = next(o for o in model.outputs if "emb" in o.get_names())
        return dims(model.inputs[0].get_partial_shape()), dims(emb.get_partial_shape()), meta

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N,3,H,W) float RGB in [0, 1] -> (emb (N,P,D), weights (N,P)) float32, the graph's outputs."""
        x = x.detach().to("cpu", torch.float32).contiguous()
        step = self.batch or max(x.shape[0], 1)
        embs, ws = [], []
        for s in range(0, x.shape[0], step):
            chunk = x[s:s + step]
            n = chunk.shape[0]
            if n < step:
                chunk = torch.cat([chunk, chunk[:1].expand(step - n, *chunk.shape[1:])])
            emb, w = self._run(chunk.numpy())
            embs.append(torch.from_numpy(np.asarray(emb[:n], np.float32)))
            ws.append(torch.from_numpy(np.asarray(w[:n], np.float32)))
        if not embs:
            return torch.empty(0, self.parts, self.embed_dim), torch.empty(0, self.parts)
        return torch.cat(embs), torch.cat(ws)

    def embed(self, x: torch.Tensor, *, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W) normalised as :func:`extract` makes it -> (emb (B,P,D), weights (B,P)).

        The graph normalises inside, so the batch goes back to [0, 1] first (the same mean/std
        tensors; ~1e-7 of rounding). Flip TTA: inside the graph when it has it; else
        :func:`embed_batch` adds the mirror around the graph, as PyTorch does.
        """
        if not flip and self.flip_in_graph:
            raise UserError(f"{self.path}: flip TTA is inside this graph, so flip=False cannot be honoured; "
                            "export the single pass with export.py --no_flip")
        x01 = (x.to("cpu", torch.float32) * self._std + self._mean) / 255
        return embed_batch(self, x01, flip=flip and not self.flip_in_graph, channels_last=False)


def _exported_file(run_dir: Path, which: str, int8: bool, model_file) -> Path:
    """The exported graph a run's extractor loads, or a UserError naming the export.py command."""
    path = Path(model_file) if model_file else run_dir / (INT8_FILE if int8 else EXPORT_FILE)
    if not path.is_file():
        command = (f"python export.py --runs_dir {run_dir.parent} --name {run_dir.name}"
                   + (f" --which {which}" if which != "last" else "") + (" --out PATH" if model_file else "")
                   + (" --int8" if int8 or ".int8." in path.name else ""))
        raise UserError(f"{path}: no exported model; make it with `{command}`")
    return path


def _check_export_fits(net: ExportedModel, run_dir: Path, which: str, opts: dict, ckpt: dict) -> None:
    """Refuse a graph of another size or parts than the run, or one exported from another
    checkpoint or epoch (a stale export after more training): it would give other numbers."""
    problems = []
    if (net.height, net.width) != (int(opts["height"]), int(opts["width"])):
        problems.append(f"its input is {net.height}x{net.width}, the run's {opts['height']}x{opts['width']}")
    if net.parts != int(opts["parts"]):
        problems.append(f"it has {net.parts} parts, the run {opts['parts']}")
    exported = (net.meta.get("checkpoint"), net.meta.get("epoch"))
    current = (f"{which}.pt", str(ckpt.get("epoch", "?")))
    if exported != current:
        problems.append(f"it was exported from {exported[0]} at epoch {exported[1]}, and {run_dir / current[0]} "
                        f"is at epoch {current[1]}")
    if problems:
        raise UserError(f"{net.path} does not match the run {run_dir} ({'; '.join(problems)}); export it again: "
                        f"python export.py --runs_dir {run_dir.parent} --name {run_dir.name}"
                        + (f" --which {which}" if which != "last" else "")
                        + (" --int8" if net.precision == "int8" else ""))


class Extractor:
    """Part embeddings and weights of your own images with a trained AWPCN run.

    ``ext(images)`` -> (emb (N,P,D) float32, weights (N,P) float32) on the CPU, where
    ``images`` is any of:

    * a list of image paths (str or os.PathLike), PIL images, or HxWx3 uint8 numpy arrays
      (RGB; ``bgr=True`` for OpenCV frames), mixed freely; one such item alone also works;
    * an (N,H,W,3) uint8 numpy array (a batch of the above);
    * a float tensor (N,3,H,W) or (3,H,W) in [0, 1], RGB (``bgr=True`` swaps the channels).

    Images are resized to the run's input size, normalised, batched ``batch_size`` at a time
    and run without grad through the folded network (flip TTA unless ``flip=False``), by
    :func:`extract`, the loop test.py runs. Paths, PIL images and numpy arrays give test.py's
    numbers for the same image (same decoding, PIL bilinear resize, normalisation and network;
    batched differently, they differ by float rounding, ~1e-7); so does a tensor at the run's
    size (it is scaled by 255 in float). A tensor of another size is resized with torch's
    antialiased bilinear interpolation, close to PIL's but not identical. Bad input (wrong type,
    dtype, shape, value range, a path that is not an image) is a :class:`utils.UserError`
    naming the item.

    ``model`` is an AWPCN (``runtime == "torch"``) or an :class:`ExportedModel` (export.py's
    graph in onnxruntime or OpenVINO: ``runtime`` is its runtime): the same call, the same
    preprocessing, the same outputs (fp32 files: PyTorch's to ~1e-5 on unit part embeddings and
    weights; int8 files: within export.py's accuracy budget). ``from_run(..., runtime=...)``
    makes either.
    """

    def __init__(self, model: AWPCN | ExportedModel, height: int, width: int, *, device="cpu", flip: bool = True,
                 batch_size: int = 64, identity: dict | None = None):
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}: must be at least 1")
        self.height, self.width, self.flip, self.batch_size = int(height), int(width), bool(flip), int(batch_size)
        self.parts, self.embed_dim = int(model.parts), int(model.embed_dim)
        self.weighting = model.weighting
        self.run_dir = self.which = self.epoch = self.opts = None      # set by from_run
        if isinstance(model, ExportedModel):
            if str(device) not in ("cpu", "auto"):
                raise UserError(f"device={device!r}: runtime {model.runtime!r} runs on the CPU here; use "
                                "device='cpu' (or runtime='torch' for a GPU)")
            if (self.height, self.width) != (model.height, model.width):
                raise UserError(f"{model.path}: the graph takes {model.height}x{model.width} images, not "
                                f"{self.height}x{self.width}")
            if not self.flip and model.flip_in_graph:
                raise UserError(f"{model.path}: flip TTA is inside this graph, so flip=False cannot be honoured; "
                                "export the single pass with export.py --no_flip")
            self.runtime, self.device, self.model = model.runtime, torch.device("cpu"), model
        else:
            self.runtime = "torch"
            self.device = select_device(device) if isinstance(device, str) else torch.device(device)
            # The network test.py runs: conv+BN folded, channels_last (bench/extract_speed.py).
            self.model = fuse_for_inference(model.to(self.device))
        # What determines the numbers this extractor produces (e.g. for a feature cache key).
        self.identity = {"height": self.height, "width": self.width, "flip": self.flip, **(identity or {})}

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, which: str = "last", device="auto", flip: bool = True,
                 batch_size: int = 64, *, runtime: str = "torch", int8: bool = False,
                 model_file: str | os.PathLike | None = None, threads: int | None = None) -> "Extractor":
        """Load ``run_dir`` (a folder with opts.yaml and ``which``.pt, e.g. model/market).

        ``runtime="onnxruntime"`` or ``"openvino"``: run export.py's graph of that checkpoint
        instead of PyTorch, on the CPU — ``run_dir/awpcn.onnx``, ``int8=True``:
        ``run_dir/awpcn.int8.onnx``, or ``model_file``; ``threads``: the runtime's intra-op
        threads. A graph of another checkpoint, epoch, size or part count is refused.
        """
        run_dir = find_run(Path(run_dir).parent, Path(run_dir).name)
        if runtime == "torch" and (int8 or model_file is not None or threads is not None):
            raise UserError("int8, model_file and threads are for runtime='onnxruntime' or 'openvino' (export.py's "
                            "graph); PyTorch's thread count is process-wide: torch.set_num_threads(N)")
        if runtime != "torch":
            require_runtime(runtime)
            opts, ckpt = load_options(run_dir, which)
            net = ExportedModel(_exported_file(run_dir, which, int8, model_file), runtime, threads=threads)
            _check_export_fits(net, run_dir, which, opts, ckpt)
        else:
            net, opts, ckpt = load_model(run_dir, which)
        ident = {"run": str(run_dir.resolve()), "which": which, "epoch": int(ckpt.get("epoch", 0))}
        for key, path in (("checkpoint", run_dir / f"{which}.pt"), ("opts", run_dir / "opts.yaml")):
            ident[key] = file_stamp(path)
        if runtime != "torch":
            ident.update(runtime=runtime, model_file=str(net.path.resolve()), model_stamp=file_stamp(net.path))
        ext = cls(net, opts["height"], opts["width"], device=device, flip=flip, batch_size=batch_size,
                  identity=ident)
        ext.run_dir, ext.which, ext.epoch, ext.opts = run_dir, which, ident["epoch"], opts
        return ext

    @classmethod
    def from_file(cls, path: str | os.PathLike, runtime: str = "onnxruntime", *, flip: bool = True,
                  batch_size: int = 64, threads: int | None = None) -> "Extractor":
        """An extractor on an exported graph alone (no run folder, no PyTorch checkpoint): the
        input size, parts and flip TTA come from the file export.py wrote."""
        net = ExportedModel(path, runtime, threads=threads)
        return cls(net, net.height, net.width, flip=flip, batch_size=batch_size,
                   identity={"runtime": runtime, "model_file": str(net.path.resolve()),
                             "model_stamp": file_stamp(net.path)})

    def __call__(self, images, *, bgr: bool = False, progress: bool | None = None,
                 desc: str = "extract") -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (emb (N,P,D) float32, weights (N,P) float32), CPU tensors; see the class doc."""
        emb, w, _bad = extract(self.model, images, self.height, self.width, device=self.device,
                               batch_size=self.batch_size, flip=self.flip, bgr=bgr, progress=progress, desc=desc)
        return emb, w

    def extract_files(self, paths, *, progress: bool | None = None, desc: str = "extract"):
        """Like ``ext(paths)`` but a file that cannot be decoded is skipped, not an error.

        Returns (emb (M,P,D), weights (M,P), bad [(index into paths, reason)]): the rows are
        the paths not in ``bad``, in order.
        """
        return extract(self.model, [str(p) for p in paths], self.height, self.width, device=self.device,
                       batch_size=self.batch_size, flip=self.flip, skip_bad=True, progress=progress, desc=desc)

    def distance(self, a, b, *, weighting: str = "adaptive") -> torch.Tensor:
        """Weighted part distance (``evaluate.weighted_distance``) between two ``ext(...)`` results.

        a = (emb (Q,P,D), weights (Q,P)), b = (emb (G,P,D), weights (G,P)) -> (Q,G) float32 in
        [0, 2], smaller = more alike. ``weighting="uniform"`` ranks with equal part weights
        (the PCB ablation of an adaptive run).
        """
        if weighting not in WEIGHTINGS:
            raise UserError(f"distance(weighting={weighting!r}): expected one of {', '.join(map(repr, WEIGHTINGS))}")
        for name, pair in (("a", a), ("b", b)):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(t, torch.Tensor) for t in pair) and pair[0].dim() == 3
                    and pair[1].dim() == 2 and pair[0].shape[:2] == pair[1].shape):
                raise UserError(f"distance({name}=...): expected the (emb (N,P,D), weights (N,P)) pair that "
                                f"ext(images) returns, got {_describe(pair)}")
        if a[0].shape[1:] != b[0].shape[1:]:
            raise UserError(f"distance: a has emb of shape {tuple(a[0].shape)} and b {tuple(b[0].shape)}; the parts "
                            "(P) and embedding size (D) must agree: compare features of the same run (this "
                            f"extractor gives P={self.parts}, D={self.embed_dim})")
        qw, gw = evaluate.weights_for(weighting, a[1], b[1])
        return evaluate.weighted_distance(a[0], qw, b[0], gw)
