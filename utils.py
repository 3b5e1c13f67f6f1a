"""Everything that touches disk or the terminal for AWPCN, so the math never has to.

One place for each of: the user-facing error type, atomic writes, the checkpoint
format and its safe loading, run folders with ``opts.yaml``, logging, seeding,
device selection and saving figures.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

CHECKPOINT_FORMAT = 1
# The run name train.py writes and test.py / demo.py read when --name is not given.
DEFAULT_RUN = "awpcn"


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file).

    Entry points print its message without a traceback and exit with status 2.
    The message names the file or value at fault and says what to do.
    """


def add_run_arguments(ap, which: str | None = "checkpoint: last, epoch_NNN or interrupted") -> None:
    """--name and --runs_dir of a finished run, as train.py names it, and ``--which`` (the
    checkpoint, with this help) unless ``which`` is None."""
    ap.add_argument("--name", default=DEFAULT_RUN, help="run name (folder under --runs_dir); train.py's default")
    ap.add_argument("--runs_dir", default="model", help="folder holding run folders")
    if which:
        ap.add_argument("--which", default="last", help=which)


def cli(main: Callable[..., Any]) -> Callable[..., int]:
    """Wrap an entry point's ``main`` so a :class:`UserError` becomes one line on stderr."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return int(rc or 0)

    return wrapper


# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temp file beside it, then rename.

    A crash, Ctrl-C or a full disk leaves the previous version of ``path`` intact and
    no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{path}: disk full while writing; the previous version (if any) is intact. "
                "Free some space and run again."
            ) from exc
        raise


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike):
    """A fresh temp folder beside ``out`` to build into; on success it replaces ``out`` by
    renames, on any error (Ctrl-C included) it is removed and ``out`` is left as it was —
    nothing half-written is ever visible at ``out``."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists():
                os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """Save a matplotlib figure atomically; the format follows the file suffix."""
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format="jpeg" if fmt == "jpg" else fmt, **kwargs)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- yaml
def save_yaml(path: str | os.PathLike, data: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc}); restore it or retrain the run") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write a checkpoint atomically. ``state`` holds tensors, numbers, strings, lists, dicts."""
    import torch

    state = {"format": CHECKPOINT_FORMAT, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint as data only (``weights_only=True``); code inside is refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        listing = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        raise UserError(
            f"{path}: checkpoint not found"
            + (f"; this folder has: {', '.join(listing)}" if listing else "")
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path}: refused to load: it is not a plain-data checkpoint (it asks to run code "
            f"or build objects when unpickled: {str(exc).splitlines()[0][:200]}). "
            "Only load checkpoints you trust; AWPCN never executes code from a checkpoint."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(
            f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:200]}); "
            "it may be truncated: use another checkpoint of the run or retrain"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path}: not an AWPCN checkpoint (format {state.get('format') if isinstance(state, dict) else None!r}, "
            f"expected {CHECKPOINT_FORMAT})"
        )
    return state


# --------------------------------------------------------------------------- features
FEATURES_FILE = "features.pt"
FEATURES_FORMAT = 1


def save_features(run_dir: str | os.PathLike, features: dict) -> Path:
    """Write test.py's extracted features (the file demo.py reads) atomically."""
    import torch

    path = Path(run_dir) / FEATURES_FILE
    features = {"format": FEATURES_FORMAT, **features}
    atomic_write(path, lambda f: torch.save(features, f))
    return path


def load_features(run_dir: str | os.PathLike) -> dict:
    """Load ``RUN/features.pt`` as plain data; a missing run or file lists what exists."""
    import torch

    run_dir = Path(run_dir)
    path = run_dir / FEATURES_FILE
    if not path.is_file():
        root = run_dir.parent
        runs = sorted(p.name for p in root.iterdir() if (p / FEATURES_FILE).is_file()) if root.is_dir() else []
        have = f"runs with features: {', '.join(runs)}" if runs else f"no run in {root} has features yet"
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: no such run ({have})")
        raise UserError(f"{path}: no features yet; run python test.py --name {run_dir.name} first ({have})")
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or unsafe: either way the fix is to rewrite it
        raise UserError(f"{path}: unreadable ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); "
                        "run test.py again to rewrite it") from None
    if not isinstance(feats, dict) or feats.get("format") != FEATURES_FORMAT:
        raise UserError(f"{path}: not an AWPCN features file; run test.py again to rewrite it")
    return feats


# --------------------------------------------------------------------------- misc
def same_dataset(trained_on: str | os.PathLike, tested_on: str | os.PathLike) -> bool:
    """Whether a run's training folder is the folder it is tested on (else: cross-dataset)."""
    return Path(trained_on).expanduser().resolve() == Path(tested_on).expanduser().resolve()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str = "auto"):
    """``auto`` → cuda if available else cpu; ``cuda`` without a GPU is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: CUDA was requested but no CUDA device is available "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use --device cpu or check the driver with nvidia-smi"
        )
    return torch.device(name)


def get_logger(log_file: str | os.PathLike | None = None, name: str = "awpcn") -> logging.Logger:
    """A logger printing to stdout and, when given, appending to ``log_file``."""
    logger = logging.getLogger(f"{name}.{log_file}" if log_file else name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
        if log_file:
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            logger.addHandler(fh)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)
