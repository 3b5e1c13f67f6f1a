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
import re
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


def interrupt_of(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C behind ``exc``: ``exc`` itself, or a KeyboardInterrupt it was raised from. A
    Ctrl-C that lands while a C extension initialises (matplotlib's, on its first import)
    reaches Python as ``ImportError: initialization failed`` whose ``__cause__`` is the
    KeyboardInterrupt. Only causes count, not ``__context__``: an error raised while an
    interrupt was being handled (a disk full while saving) is a real error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


@contextlib.contextmanager
def plain_interrupts():
    """Re-raise a Ctrl-C that surfaced as another exception (see :func:`interrupt_of`) as the
    KeyboardInterrupt itself, so that ``except KeyboardInterrupt`` handlers see every Ctrl-C."""
    try:
        yield
    except BaseException as exc:
        interrupt = interrupt_of(exc)
        if interrupt is None or interrupt is exc:
            raise
        raise interrupt from None


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", show: bool | None = None):
    """A tqdm progress bar with the settings every tool shares: ``show=None`` shows it on a
    terminal only (logs and CI get the tools' summary lines instead), True/False force it; it
    is cleared when done and redrawn at most once a second."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=not (sys.stderr.isatty() if show is None else show))


# --------------------------------------------------------------------------- atomic writes
# atomic_write's temp files are ".NAME.PID.tmp": the PID tells a live writer's file from one
# a killed process left (see remove_stale_temp_files).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # e.g. a PID beyond what the platform can signal
        return False
    return True


def remove_stale_temp_files(folder: str | os.PathLike, log: Callable[[str], None] = print) -> list[Path]:
    """Delete the temp files :func:`atomic_write` left in ``folder`` when its process was
    killed mid-write (SIGKILL, power cut), saying each; those of a process still running
    (writing right now) and of this process are kept. Returns the files removed."""
    folder = Path(folder)
    removed = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = TEMP_NAME.match(p.name)
        if not m or not p.is_file() or p.is_symlink():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
        log(f"removed {p}: an unfinished write of {m['name']} by process {pid}, which is no longer running")
    return removed


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


# --------------------------------------------------------------------------- dataset output folders
# Every folder a prepare.py builder writes holds this file. --overwrite replaces a folder only
# when it does: a mistyped OUT (a thesis folder, a home directory) is refused, never deleted.
OUTPUT_MARKER = ".awpcn-prepared"
_MARKER_TEXT = ("Written by AWPCN prepare.py. prepare.py --overwrite replaces a folder only when it holds "
                "this file; delete this file to protect the folder from --overwrite.\n")
# staged_folder's names beside OUT: .OUT.tmp-PID (being built), .OUT.old-PID (the previous OUT
# during the final swap). The PID tells a running build's folder from one a killed process left.
_STAGE_KINDS = ("tmp", "old")


def _stage(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}")


def _entries(folder: Path, n: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name != OUTPUT_MARKER)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _foreign(out: Path) -> str | None:
    """Why ``out`` must not be replaced, or None when it may be (missing, empty, or ours)."""
    if out.is_symlink():
        return f"is a symbolic link (to {os.readlink(out)}); give the folder itself"
    if not out.exists():
        return None
    if not out.is_dir():
        return "exists and is not a folder"
    if (out / OUTPUT_MARKER).is_file() or not any(out.iterdir()):
        return None
    return f"was not written by prepare.py (no {OUTPUT_MARKER} file; it holds {_entries(out)})"


def check_overlap(out: str | os.PathLike, sources=()) -> None:
    """Refuse an ``out`` that is, is inside, or holds one of the ``sources`` folders: building
    there would write into the source or, with --overwrite, replace it."""
    o = Path(out).resolve()
    for src in sources:
        s = Path(src).resolve()
        how = ("is the source itself" if o == s else "is inside the source" if s in o.parents
               else "holds the source" if o in s.parents else None)
        if how:
            raise UserError(f"{out}: the output {how} {src}; choose an OUT outside {src} (the source is "
                            "never modified)")


def check_output(out: str | os.PathLike, *, sources=(), overwrite: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """What every dataset builder checks about OUT before it reads its source at length.

    OUT must not overlap any of ``sources`` (:func:`check_overlap`). Staging folders an
    interrupted build left beside OUT are cleaned first (:func:`clean_stale_stages`). OUT may
    be missing or an empty folder. A non-empty OUT needs ``overwrite``, and is then replaced
    (at the end, by :func:`staged_folder`) only if it holds :data:`OUTPUT_MARKER`, the file
    every builder writes; a folder without it is the user's and is refused, never deleted.
    """
    out = Path(out)
    check_overlap(out, sources)
    clean_stale_stages(out, log)
    why = _foreign(out)
    if why:
        fix = ("move it away or choose another OUT; --overwrite replaces only a folder prepare.py wrote"
               if out.is_dir() and not out.is_symlink() else "choose another OUT")
        raise UserError(f"{out}: {why}; {fix}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it (a previous prepare.py "
                            f"output: {_entries(out)})")
        log(f"--overwrite: {out} holds a previous prepare.py output ({_entries(out)}); it is replaced once "
            "the new one is complete")
    return out


def clean_stale_stages(out: str | os.PathLike, log: Callable[[str], None] = print) -> list[Path]:
    """Deal with the staging folders :func:`staged_folder` left beside ``out`` when its process
    was killed (SIGKILL, a power cut): a ``.OUT.tmp-PID`` (an unfinished build) is removed; a
    ``.OUT.old-PID`` (the previous OUT, moved aside for the final swap) is put back when OUT is
    missing, else removed. Only real folders of exactly those names whose process is no longer
    running are touched, each said through ``log``. Returns the folders dealt with."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?P<kind>{'|'.join(_STAGE_KINDS)})-(?P<pid>[0-9]+)")
    stale = []
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        # the newest previous OUT first: it is the one to put back
        stale.append((m["kind"] != "old", -p.stat().st_mtime_ns, p, pid))
    for _, _, p, pid in sorted(stale):
        if p.name.startswith(f".{out.name}.old-") and not os.path.lexists(out):
            os.replace(p, out)
            log(f"restored {out} from {p.name}: process {pid}, no longer running, was stopped while replacing it")
        else:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                log(f"removed {p}: an unfinished prepare.py output of process {pid}, which is no longer running")
    return [p for _, _, p, _ in stale]


def _cannot_write(out: Path, exc: OSError) -> UserError:
    """An OSError about OUT itself (creating, filling or renaming its staging folder) as one line
    with the fix."""
    where = out.parent
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    why = exc.strerror or exc.__class__.__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{out}: disk full while writing it ({why}); nothing was written and the partial copy "
                         "is removed. Free some space and run again")
    if not where.is_dir():
        return UserError(f"{out}: cannot be created: {where} is a file, not a folder; choose another OUT")
    if exc.errno == errno.EROFS:
        return UserError(f"{out}: cannot write in {where}: it is on a read-only filesystem; choose an OUT on "
                         "a writable disk")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"{out}: cannot write in {where} (permission denied); choose an OUT in a folder you "
                         f"can write to, or fix the permissions of {where}")
    return UserError(f"{out}: cannot write it ({why}); choose another OUT")


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT, SIGTERM and SIGHUP back across OUT's final swap, so an interruption lands
    before it (OUT as it was) or after it (OUT complete), never between its two renames."""
    import signal

    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    except (AttributeError, OSError, ValueError):    # no POSIX signal masks on this platform
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _commit(tmp: Path, out: Path) -> None:
    why = _foreign(out)        # checked up front too; this catches what appeared while we built
    if why:
        raise UserError(f"{out}: {why}; it is left alone and nothing was written: move it away or choose "
                        "another OUT")
    old = _stage(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    with _signals_held():
        try:
            moved = os.path.lexists(out)
            if moved:
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                if moved:
                    os.replace(old, out)
                raise
        except OSError as exc:
            raise _cannot_write(out, exc) from None
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike):
    """A fresh temp folder ``.OUT.tmp-PID`` beside ``out`` to build into, holding
    :data:`OUTPUT_MARKER`. On success it replaces ``out`` by renames; on any error (Ctrl-C, or
    SIGTERM turned into KeyboardInterrupt, included) it is removed and ``out`` is left as it
    was: nothing half-written is ever visible at ``out``. ``out`` is replaced only if it is
    missing, empty or ours (:func:`check_output`). Failures of OUT itself (a parent that is
    read-only, not writable, or a file; a full disk) are one-line UserErrors with the fix.
    A SIGKILL leaves the temp folder; :func:`clean_stale_stages` removes it at the next start."""
    out = Path(out)
    tmp = _stage(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / OUTPUT_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(out, exc) from None
    try:
        yield tmp
        _commit(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or str(exc.filename or "").startswith(str(tmp))):
            raise _cannot_write(out, exc) from None
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


# --------------------------------------------------------------------------- run folders
RUN_LOCK = ".train.lock"


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is the PID it wrote (or a placeholder)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class LocksUnsupported(Exception):
    """The file system refuses flock; the text is its reason."""


def lock_file(path: str | os.PathLike):
    """Take an exclusive, non-blocking flock on ``path`` (created if missing) and write this
    process's PID into it, for the message the next process gets. Returns the open file: the
    lock lasts until it is closed or this process ends (the kernel drops it with the last
    descriptor, so a killed holder never leaves it taken).

    Raises LockHeld(holder PID) while another process holds it, LocksUnsupported where the file
    system refuses locks, ImportError where the platform has none (Windows); an OSError from
    opening the file (no such folder, no permission) passes through as it is.
    """
    import fcntl

    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.seek(0)
        holder = f.read().strip() or "(PID not yet written)"
        f.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld(holder) from None
        raise LocksUnsupported(exc.strerror) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_run(run_dir: str | os.PathLike, log: Callable[[str], None] = print):
    """Hold ``run_dir`` for writing until the returned file is closed or this process ends.

    A :func:`lock_file` on ``RUN_LOCK`` inside the folder. A second writer gets a UserError
    naming the run and the holder's PID; readers (test.py) do not lock. Returns None, after
    saying so, where the platform or file system has no locks.
    """
    path = Path(run_dir) / RUN_LOCK
    try:
        return lock_file(path)
    except ImportError:
        log(f"note: no file locks on this platform; nothing stops a second training of {run_dir}")
    except LockHeld as held:
        raise UserError(f"{run_dir} is being trained by process {held.holder} (it holds {path}); wait for it "
                        "to end or stop it, or train under another --name") from None
    except LocksUnsupported as exc:
        log(f"note: {path}: the file system refuses locks ({exc}); nothing stops a second "
            f"training of {run_dir}")
    return None


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
def run_data_dir(opts: dict) -> str | None:
    """The dataset a run was trained on, from its opts.yaml: data_root (the resolved layout
    folder train.py records) or, in an opts.yaml from before that key, data_dir; None if neither."""
    return opts.get("data_root") or opts.get("data_dir")


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
    """``auto`` → cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:N``. Any other name,
    ``cuda`` without a GPU and ``cuda:N`` beyond the GPUs present are clear errors."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"cpu|cuda(?::([0-9]+))?", str(name))
    if not m:
        raise UserError(f"--device {name!r}: not a device this code runs on; use auto, cpu, cuda or cuda:N "
                        "(N: the GPU's index, as nvidia-smi lists them)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: CUDA was requested but no CUDA device is available "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use --device cpu or check the driver with nvidia-smi"
        )
    if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}; "
                        "pick one of those or use --device cuda")
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
