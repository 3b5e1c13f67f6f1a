"""Turn data into the on-disk contract that AWPCN reads (Market-1501 layout), and check it.

    python prepare.py --synthetic OUT [--ids 300] [--seed 0] [--occlusion 0.3] [--overwrite]
    python prepare.py --check DIR
    python prepare.py --msmt17 SRC OUT [--link] [--overwrite]
    python prepare.py --occlude SRC OUT [--fraction 0.5] [--seed 0] [--val_ids 0.15]   # occlusion benchmark
    python prepare.py --partial SRC OUT [--fraction 0.5] [--seed 0] [--val_ids 0.15]   # partial-view benchmark
    (and the other builders of converters.py: --cuhk03, --folders, --occluded_reid, --partial_reid, --partial_ilids)

The synthetic set: pedestrians drawn with numpy, each identity a combination of six
horizontal body bands whose colours and textures come from a small shared palette (no
single band identifies a person), seen by six cameras with their own background,
illumination and colour cast, with scale/shift jitter, mirroring, noise and JPEG; a fraction
of images has an occluder over the top or bottom band(s), recorded in OUT/occlusion.json.

Every builder writes OUT through utils.staged_folder and checks it first with
utils.check_output: OUT may not be, be inside or hold the source; a non-empty OUT needs
--overwrite and is replaced only if a builder wrote it (it holds utils.OUTPUT_MARKER,
``.awpcn-prepared``), so a folder of the user's is refused, never deleted. Staging folders a
killed run left beside OUT are removed at the next start. Ctrl-C, SIGTERM and SIGHUP remove
the unfinished output and end with one line and status 128 + the signal (130 for Ctrl-C).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import threading
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

import converters
import datasets
import utils
from utils import UserError, check_output, cli, staged_folder

HEIGHT, WIDTH, CAMERAS, BANDS = 128, 64, 6, 6
PALETTE = np.array([[200, 40, 40], [40, 150, 60], [40, 70, 190], [225, 200, 50], [240, 240, 235],
                    [30, 30, 35], [120, 120, 125], [150, 90, 45], [160, 60, 170], [60, 190, 200]], np.float32)
TEXTURES = ("solid", "hstripes", "vstripes", "checks")
# Relative heights of the six body bands (head, shoulders, torso, waist, thighs, shins).
BAND_HEIGHTS = np.array([0.14, 0.16, 0.2, 0.14, 0.18, 0.18])
BAND_HALF_WIDTH = np.array([0.14, 0.32, 0.3, 0.27, 0.22, 0.2])


# --------------------------------------------------------------------------- synthetic
def _identity(rng: np.random.Generator) -> dict:
    return {"colour": rng.integers(0, len(PALETTE), BANDS), "texture": rng.integers(0, len(TEXTURES), BANDS),
            "second": rng.integers(0, len(PALETTE), BANDS), "period": rng.integers(3, 7, BANDS)}


def _cameras(rng: np.random.Generator) -> list[dict]:
    return [{"bg": rng.uniform(40, 200, 3).astype(np.float32), "bg2": rng.uniform(40, 200, 3).astype(np.float32),
             "gain": rng.uniform(0.65, 1.25), "cast": rng.uniform(0.85, 1.15, 3).astype(np.float32)}
            for _ in range(CAMERAS)]


def draw_person(ident: dict | None, cam: dict, rng: np.random.Generator, occlude: bool):
    """One (H, W, 3) uint8 image and the occluded row range [y0, y1) or None."""
    h, w = HEIGHT, WIDTH
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = yy / h
    img = cam["bg"] * (1 - t[..., None]) + cam["bg2"] * t[..., None]          # background gradient
    img = img + rng.normal(0, 10, (h, w, 1)).astype(np.float32)
    if ident is None:                                                         # junk: background only
        ident = _identity(rng) if rng.random() < 0.5 else None
    if ident is not None:
        scale = rng.uniform(0.82, 1.0)
        top = rng.uniform(0.0, 1.0 - scale) * h + rng.uniform(-4, 4)
        cx = w / 2 + rng.uniform(-5, 5)
        bounds = np.concatenate([[0], np.cumsum(BAND_HEIGHTS)]) * scale * h + top
        bounds[1:-1] += rng.uniform(-2.5, 2.5, BANDS - 1)                    # pose: band edges move
        mirror = rng.random() < 0.5
        for b in range(BANDS):
            rows = (yy >= bounds[b]) & (yy < bounds[b + 1])
            half = BAND_HALF_WIDTH[b] * w * rng.uniform(0.9, 1.1)
            mask = rows & (np.abs(xx - cx) < half)
            c1, c2 = PALETTE[ident["colour"][b]], PALETTE[ident["second"][b]]
            period = ident["period"][b]
            kind = TEXTURES[ident["texture"][b]]
            lx = (w - 1 - xx) if mirror else xx
            if kind == "hstripes":
                pat = ((yy - bounds[b]) // period) % 2
            elif kind == "vstripes":
                pat = (lx // period) % 2
            elif kind == "checks":
                pat = (((yy - bounds[b]) // period) + (lx // period)) % 2
            else:
                pat = np.zeros_like(yy)
            colour = np.where(pat[..., None] > 0, c2, c1)
            img = np.where(mask[..., None], colour, img)
    img = img * cam["gain"] * cam["cast"]
    img = img + rng.normal(0, 8, img.shape).astype(np.float32)
    rows = None
    if occlude:
        size = int(h * rng.uniform(0.25, 0.5))
        y0, y1 = (0, size) if rng.random() < 0.5 else (h - size, h)
        occ = rng.uniform(20, 235, 3).astype(np.float32) + rng.normal(0, 15, (y1 - y0, w, 1)).astype(np.float32)
        img[y0:y1] = occ
        rows = (y0, y1)
    return np.clip(img, 0, 255).astype(np.uint8), rows


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def plan_synthetic(ids: int = 300, seed: int = 0) -> list[tuple[str, int, int]]:
    """(split folder, pid, camera 0-based) for every image, in file order; pid 0 and -1 extra."""
    rng = np.random.default_rng([seed, 1])
    n_train = ids // 2
    plan = []
    for pid in range(1, ids + 1):
        cams = sorted(rng.choice(CAMERAS, size=int(rng.integers(4, 7)), replace=False).tolist())
        for cam in cams:
            if pid <= n_train:
                plan += [("bounding_box_train", pid, cam)] * int(rng.integers(1, 4))
            else:
                plan.append(("query", pid, cam))
                plan += [("bounding_box_test", pid, cam)] * 2
    plan += [("bounding_box_test", 0, int(c)) for c in rng.integers(0, CAMERAS, max(10, ids // 6))]
    plan += [("bounding_box_test", -1, int(c)) for c in rng.integers(0, CAMERAS, max(5, ids // 15))]
    return plan


def make_synthetic(out: str | os.PathLike, *, ids: int = 300, seed: int = 0, occlusion: float = 0.3,
                   overwrite: bool = False, log=print) -> dict:
    """Write the synthetic set to ``out`` (through a temp folder, renamed at the end)."""
    out = Path(out)
    if ids < 4:
        raise UserError(f"--ids {ids}: need at least 4 identities (half train, half test)")
    if not 0 <= occlusion <= 1:
        raise UserError(f"--occlusion {occlusion}: a probability in [0, 1] is expected")
    check_output(out, overwrite=overwrite, log=log)
    plan = plan_synthetic(ids, seed)
    rng = np.random.default_rng([seed, 2])
    idents = {pid: _identity(rng) for pid in range(1, ids + 1)}
    cams = _cameras(rng)
    truth = {}
    with staged_folder(out) as tmp:
        for sub in datasets.SPLITS.values():
            (tmp / sub).mkdir()
        for n, (sub, pid, cam) in enumerate(plan):
            r = np.random.default_rng([seed, 3, n])
            ident = idents.get(pid) if pid > 0 else (_identity(r) if pid == 0 else None)
            arr, rows = draw_person(ident, cams[cam], r, occlude=pid > 0 and r.random() < occlusion)
            name = f"{pid:04d}_c{cam + 1}s1_{n:06d}_00.jpg" if pid >= 0 else f"-1_c{cam + 1}s1_{n:06d}_00.jpg"
            (tmp / sub / name).write_bytes(_jpeg(arr, int(r.integers(75, 96))))
            truth[f"{sub}/{name}"] = list(rows) if rows else None
        (tmp / "occlusion.json").write_text(json.dumps({"height": HEIGHT, "width": WIDTH, "images": truth},
                                                       indent=0, sort_keys=True))
    counts = defaultdict(int)
    for sub, _, _ in plan:
        counts[sub] += 1
    return {"images": len(plan), **counts, "occluded": sum(v is not None for v in truth.values())}


# --------------------------------------------------------------------------- check
def _decode(path: str) -> tuple[str, str | None, str | None]:
    """(path, why it does not decode or None, a note when it is huge or None)."""
    large = []
    try:
        converters.load_image(path, large)
        return path, None, large[0] if large else None
    except UserError as exc:
        return path, str(exc).split(": ", 1)[-1], None


def _pool_worker() -> None:
    # Ctrl-C reaches the whole process group: the workers leave it to the parent, which stops
    # them, instead of each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent's Python-level SIGTERM/SIGHUP handlers are inherited by fork; a worker must die
    # at once when the pool terminates it, even while blocked on the pool's queue lock.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def check_dataset(path: str | os.PathLike, *, workers: int | None = None, log=print) -> list[str]:
    """Decode every image and report; returns the list of errors (empty = usable)."""
    root, note = datasets.resolve_root(path, need=("query", "gallery"))
    if note:
        log(note)
    test_only = not (root / datasets.SPLITS["train"]).is_dir()
    errors, warnings, splits, skipped = [], [], {}, []
    for key, sub in datasets.SPLITS.items():
        if key == "train" and test_only:
            splits[key] = []
            continue
        items, bad = datasets.scan_split(root / sub, skipped)
        splits[key] = items
        errors += [f"{p}: {why}" for p, why in bad]
    paths = [p for items in splits.values() for p, _, _ in items]
    large = []
    with Pool(workers or min(2, os.cpu_count() or 1), initializer=_pool_worker) as pool:
        # imap has no len(): the bar is told the total
        for p, why, big in utils.progress(pool.imap(_decode, paths, chunksize=64), desc="decoding", total=len(paths)):
            if why:
                errors.append(f"{p}: {why}")
            if big:
                large.append(big)
        # A clean shutdown: leaving the block alone would terminate() the workers, which can
        # kill one while it holds the task queue's lock and leave the other waiting forever.
        pool.close()
        pool.join()
    if large:
        warnings.append(converters.large_images_note(large))
    log(f"{root}")
    if test_only:
        log("test-only set: no bounding_box_train/ (test.py --data_dir evaluates on it; train.py cannot train on it)")
    if skipped:
        log(datasets.skipped_note(root, skipped))
    log("  subset   | # ids | # images | # cameras")
    for key, items in splits.items():
        # as datasets.load_dataset: pid 0 (distractor) and -1 (junk) are gallery-only
        usable = [x for x in items if x[1] > 0] if key != "gallery" else [x for x in items if x[1] != -1]
        log(f"  {key:<8} | {len({p for _, p, _ in usable}):5d} | {len(usable):8d} | "
            f"{len({c for _, _, c in usable}):9d}")
        if not usable and not (key == "train" and test_only):
            errors.append(f"{root / datasets.SPLITS[key]}: no usable images")
    cams_of = defaultdict(set)
    for _, pid, cam in splits["train"]:
        if pid > 0:
            cams_of[pid].add(cam)
    single = sorted(p for p, c in cams_of.items() if len(c) == 1)
    if single:
        warnings.append(f"{len(single)} training ids seen by a single camera: {single[:20]}"
                        + (" ..." if len(single) > 20 else ""))
    gallery = defaultdict(set)
    for _, pid, cam in splits["gallery"]:
        gallery[pid].add(cam)
    no_match = sorted({pid for _, pid, cam in splits["query"] if pid > 0 and not (gallery[pid] - {cam})})
    if no_match:
        warnings.append(f"{len(no_match)} query ids have no gallery image from another camera "
                        f"(those queries are skipped in evaluation): {no_match[:20]}" + (" ..." if len(no_match) > 20 else ""))
    if splits["query"] and len(no_match) == len({p for _, p, _ in splits["query"] if p > 0}):
        errors.append("no query has a valid gallery match: evaluation would be empty")
    for w in warnings:
        log(f"warning: {w}")
    for e in errors:
        log(f"error: {e}")
    log("OK" if not errors else f"{len(errors)} problem(s) would break training or evaluation")
    return errors


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Prepare and check re-ID datasets in the Market-1501 layout.")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--synthetic", metavar="OUT", help="generate the built-in synthetic dataset into OUT")
    mode.add_argument("--check", metavar="DIR", help="decode every image of a dataset and report problems")
    mode.add_argument("--msmt17", nargs=2, metavar=("SRC", "OUT"), help="convert MSMT17 (V1 or V2) into OUT")
    mode.add_argument("--cuhk03", nargs=2, metavar=("SRC", "OUT"),
                      help="raw CUHK03 (cuhk-03.mat + new-protocol split files) -> OUT/labeled, OUT/detected")
    mode.add_argument("--folders", nargs=2, metavar=("SRC", "OUT"),
                      help="one folder per person, SRC/<person>/[<camera>/]<image> -> train/query/gallery")
    mode.add_argument("--occluded_reid", nargs=2, metavar=("SRC", "OUT"), help="Occluded-REID -> test-only OUT")
    mode.add_argument("--partial_reid", nargs=2, metavar=("SRC", "OUT"), help="Partial-REID -> test-only OUT")
    mode.add_argument("--partial_ilids", nargs=2, metavar=("SRC", "OUT"), help="Partial-iLIDS -> test-only OUT")
    mode.add_argument("--occlude", nargs=2, metavar=("SRC", "OUT"),
                      help="occlusion benchmark: SRC's test split with real-image occluders on --fraction of "
                           "its queries (ground truth in OUT/occlusion.json)")
    mode.add_argument("--partial", nargs=2, metavar=("SRC", "OUT"),
                      help="partial-view benchmark: SRC's test split with --fraction of its queries cut to a top, "
                           "bottom or side part and resized (the kept box in OUT/partial.json)")
    ap.add_argument("--ids", type=int, default=300, help="synthetic: identities, half train and half test")
    ap.add_argument("--seed", type=int, default=0, help="synthetic, folders, occlude, partial: seed (same seed, same output)")
    ap.add_argument("--occlusion", type=float, default=0.3, help="synthetic: fraction of occluded images")
    ap.add_argument("--link", action="store_true",
                    help="msmt17: hard-link instead of copying (copies, and says so, where linking is impossible, "
                         "e.g. across filesystems)")
    ap.add_argument("--cams", default="auto", choices=["auto", "none"],
                    help="folders: auto = camera subfolders if present; none = no camera ids (see README)")
    ap.add_argument("--query_per_id", type=int, default=1, help="folders: queries per (test id, camera)")
    ap.add_argument("--test_ids", type=float, default=0.5,
                    help="folders: fraction of identities for testing (1 = all, test-only), or a count > 1")
    ap.add_argument("--probe", default="partial", choices=["partial", "occluded"],
                    help="partial_reid: which images are the queries")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="occlude, partial: fraction of queries occluded or cut (1 = all)")
    ap.add_argument("--val_ids", type=float, default=None,
                    help="occlude, partial: build it from the validation ids train.py --val_ids holds out (same fraction), "
                         "not the test split: for choosing test-time settings")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing output folder, only one that prepare.py wrote (it holds .awpcn-prepared)")
    return ap


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that the staged output is removed as
    on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt():
    if threading.current_thread() is not threading.main_thread():   # handlers can only be set there
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:     # a forked --check worker: end as the signal asks, quietly
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _folder_id(path) -> tuple | None:
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return None


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = next((v if isinstance(v, str) else v[1] for k, v in vars(args).items()
                if v and k in ("synthetic", "msmt17", "cuhk03", "folders", "occluded_reid", "partial_reid",
                               "partial_ilids", "occlude", "partial")), None)
    before = _folder_id(out) if out else None
    try:
        with _signals_interrupt(), utils.plain_interrupts():
            return _run(args)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        if out is None:
            what = "the check stopped before the end (it writes nothing)"
        elif _folder_id(out) != before and (Path(out) / utils.OUTPUT_MARKER).is_file():
            what = f"{out} had just been written completely"      # the swap is never cut in two
        else:
            what = f"nothing written to {out}"
        try:
            print(f"interrupted{by}: {what}", file=sys.stderr)
        except OSError:      # SIGHUP: the terminal may be gone
            pass
        return 128 + signum


def _run(args) -> int:
    if args.synthetic:
        stats = make_synthetic(args.synthetic, ids=args.ids, seed=args.seed, occlusion=args.occlusion,
                               overwrite=args.overwrite)
        print(f"{args.synthetic}: {stats['images']} images (train {stats['bounding_box_train']}, query "
              f"{stats['query']}, gallery {stats['bounding_box_test']}; {stats['occluded']} occluded)")
        return 0
    if args.check:
        return 1 if check_dataset(args.check) else 0
    kw = dict(overwrite=args.overwrite)
    if args.cuhk03:
        converters.convert_cuhk03(*args.cuhk03, **kw)
    elif args.folders:
        converters.convert_folders(*args.folders, cams=args.cams, query_per_id=args.query_per_id,
                                   test_ids=args.test_ids, seed=args.seed, **kw)
    elif args.occluded_reid:
        converters.convert_occluded_reid(*args.occluded_reid, **kw)
    elif args.partial_reid:
        converters.convert_partial_reid(*args.partial_reid, probe=args.probe, **kw)
    elif args.partial_ilids:
        converters.convert_partial_ilids(*args.partial_ilids, **kw)
    elif args.occlude:
        converters.make_occluded(*args.occlude, fraction=args.fraction, seed=args.seed, val_ids=args.val_ids, **kw)
    elif args.partial:
        converters.make_partial(*args.partial, fraction=args.fraction, seed=args.seed, val_ids=args.val_ids, **kw)
    if not args.msmt17:
        return 0
    converters.convert_msmt17(*args.msmt17, link=args.link, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
