"""Converters from the datasets people have to the Market-1501 layout AWPCN reads.

One function per format, called by ``prepare.py``:

- ``convert_cuhk03``: the raw CUHK03 release (``cuhk-03.mat``, MATLAB v7.3 = HDF5) and the
  new-protocol split files (Zhong et al., CVPR 2017) -> ``OUT/labeled``, ``OUT/detected``;
- ``convert_folders``: one folder per person, ``SRC/<person>/[<camera>/]<image>`` -> train,
  query and gallery;
- ``convert_occluded_reid``, ``convert_partial_reid``, ``convert_partial_ilids``: test-only
  benchmarks -> ``query/`` (the occluded or partial probes, camera 1) and
  ``bounding_box_test/`` (the whole-body images, camera 2), no ``bounding_box_train/``;
- ``convert_msmt17``: MSMT17 V1/V2 (list files) -> train, query and gallery;
- ``make_occluded``: not a converter but a builder of the same kind — an occlusion benchmark
  cut from a dataset's test split (or its validation ids), masks from ``occluders``.

Every converter reads the source without modifying it, checks OUT with
``utils.check_output`` (OUT outside the source; a non-empty OUT only with ``overwrite``, and
only one a builder wrote), writes into a temp folder beside OUT and renames it at the end (an
error or Ctrl-C leaves nothing half-converted), decodes every image it writes, and reports
only through ``log``. Bad input is a one-line UserError naming the path. Symbolic links to
folders in the source are never followed (named as skipped). Each output holds
``sources.tsv``: every written image and where it came from, tab-separated and quoted as the
csv module does (:func:`read_tsv` reads it, and ``persons.tsv``).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import shutil
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

import datasets
import occluders
from utils import UserError, check_output, check_overlap, progress, staged_folder

# What a source may hold; formats the reader does not take (datasets.IMG_EXTS) are re-encoded as PNG.
SRC_IMG_EXTS = datasets.IMG_EXTS + (".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".jfif")
TRAIN, QUERY, GALLERY = (datasets.SPLITS[k] for k in ("train", "query", "gallery"))
PROBE_CAM, GALLERY_CAM = 1, 2
SHOWN = 5

Log = Callable[[str], None]


# --------------------------------------------------------------------------- shared
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:200]


def _natural(name: str):
    """Sort key: 'cam2' before 'cam10'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t]


def _shown(names, n: int = SHOWN) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def write_tsv(path: Path, header: tuple, rows) -> None:
    """A tab-separated table, quoted by the csv module: a tab, newline or quote in a folder or
    file name stays inside its column."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def read_tsv(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``sources.tsv`` or ``persons.tsv`` as {column: value}."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_image(path, large: list) -> Image.Image:
    """datasets.load_image, with PIL's DecompressionBombWarning (an image above
    ``Image.MAX_IMAGE_PIXELS`` but under twice it, which PIL still decodes) caught and noted in
    ``large`` as "PATH (W x H)" instead of surfacing unnamed; above twice it is an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        img = datasets.load_image(path)
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            large.append(f"{path} ({img.width} x {img.height})")
        else:       # not ours to judge: pass it on as it came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return img


def large_images_note(large: list) -> str:
    return (f"{len(large)} image(s) above PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels, "
            f"read anyway: {_shown(large)}; check that they are photos and not damaged or hostile files")


def _check_target(sources, out: Path, overwrite: bool, log: Log) -> None:
    check_output(out, sources=[s for s in sources if s is not None], overwrite=overwrite, log=log)


def _linked_note(links, src: Path) -> str:
    return (f"skipped {len(links)} symbolic link(s) to folders, not followed (a link can lead out of the "
            f"source or back into it): {_shown(_rel(p, src) for p in links)}")


def _rel(path: Path, src: Path) -> str:
    try:
        return path.relative_to(src).as_posix()
    except ValueError:
        return str(path)


def _bar(items, desc: str):
    # the shared bar: on a terminal only, cleared when done
    return progress(items, desc=desc)


class _Writer:
    """Writes images into a staged dataset, checking that each decodes, and keeps the
    ``sources.tsv`` rows. Files the reader takes are copied byte for byte; other formats
    (``.tif`` ...) are re-encoded as PNG (lossless)."""

    def __init__(self, root: Path, src: Path, log: Log):
        self.root, self.src, self.rows, self.bad, self.large, self.log = root, src, [], [], [], log
        self.counts: Counter = Counter()
        self.ids: dict = defaultdict(set)
        self.n = 0

    def _dest(self, split: str, pid: int, cam: int, ext: str, stem: str | None) -> Path:
        self.n += 1
        folder = self.root / split
        folder.mkdir(parents=True, exist_ok=True)
        self.counts[split] += 1
        self.ids[split].add(pid)
        return folder / (f"{pid:04d}_c{cam}{stem}" if stem else f"{pid:04d}_c{cam}s1_{self.n:06d}_00{ext}")

    def copy(self, source: Path, split: str, pid: int, cam: int) -> None:
        try:
            img = load_image(source, self.large)
        except UserError as exc:
            self.bad.append((source, str(exc)[len(str(source)) + 2:].split("; remove")[0]))
            return
        ext = source.suffix.lower()
        if ext in datasets.IMG_EXTS:
            dest = self._dest(split, pid, cam, ext, None)
            shutil.copyfile(source, dest)
        else:
            dest = self._dest(split, pid, cam, ".png", None)
            img.save(dest)
        self.rows.append((dest.relative_to(self.root).as_posix(), source.relative_to(self.src).as_posix()))

    def array(self, arr: np.ndarray, split: str, pid: int, cam: int, stem: str, origin: str) -> None:
        """arr (H, W, 3) uint8, written as PNG named ``PID_cCAM<stem>``."""
        dest = self._dest(split, pid, cam, ".png", stem)
        Image.fromarray(arr).save(dest)
        self.rows.append((dest.relative_to(self.root).as_posix(), origin))

    def finish(self) -> None:
        if self.bad:
            (path, why), more = self.bad[0], len(self.bad) - 1
            raise UserError(f"{path}: {why}" + (f"; and {more} more: {_shown(str(p) for p, _ in self.bad[1:])}"
                                                if more else "")
                            + "; remove or replace the broken image(s) in the source and run again")
        if self.large:
            self.log(f"warning: {large_images_note(self.large)}")
        write_tsv(self.root / "sources.tsv", ("output", "source"), self.rows)


def _list_dir(folder: Path, links: list) -> tuple[list[Path], list[Path], list[Path]]:
    """(images, subfolders, other files) directly in ``folder``, each in natural order.

    A symbolic link to a folder goes to ``links``, not followed: one pointing at the source
    itself or out of it would make a "person" of everyone's images, or of someone else's."""
    images, dirs, others = [], [], []
    for entry in sorted(os.scandir(folder), key=lambda e: _natural(e.name)):
        path = Path(entry.path)
        if entry.is_symlink() and entry.is_dir():
            links.append(path)
        elif entry.is_dir(follow_symlinks=False):
            dirs.append(path)
        elif not entry.name.startswith(".") and entry.name.lower().endswith(SRC_IMG_EXTS):
            images.append(path)
        else:
            others.append(path)
    return images, dirs, others


def _files_below(folder: Path, links: list) -> list[Path]:
    """Every file below ``folder``, in natural order; symbolic links to folders go to
    ``links``, not followed (as in :func:`_list_dir`)."""
    found = []
    for root, dirs, files in os.walk(folder):        # os.walk does not descend into linked folders
        links += [Path(root, d) for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [Path(root, f) for f in files]
    return sorted(found, key=lambda f: _natural(str(f)))


def _child_dir(base: Path, name: str) -> Path | None:
    """``base/name``, matched case-insensitively (archives differ: Probe/ or probe/)."""
    if (base / name).is_dir():
        return base / name
    for p in sorted(base.iterdir()):
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def _find_layout(src: Path, names: tuple[str, ...], what: str, option: str) -> tuple[Path, dict[str, Path]]:
    """(base, {name: folder}): the folders ``names`` in ``src`` or in a folder inside it
    (an unpacked archive)."""
    if not src.is_dir():
        raise UserError(f"{src}: no such folder (expected the {what} folder, for {option})")
    for base in [src] + sorted(p for p in src.iterdir() if p.is_dir()):
        found = {n: _child_dir(base, n) for n in names}
        if all(found.values()):
            return base, found
    have = sorted(p.name + ("/" if p.is_dir() else "") for p in src.iterdir())
    missing = [n + "/" for n in names if not _child_dir(src, n)]
    raise UserError(f"{src}: not a {what} folder: missing {', '.join(missing)} "
                    f"(found: {_shown(have, 8) or 'nothing'}); point {option} at the folder holding "
                    f"{', '.join(n + '/' for n in names)}")


# --------------------------------------------------------------------------- test-only benchmarks
def _probe_gallery(src: Path, base: Path, out: Path, probes: list, gallery: list, others: list, *, what: str,
                   published: str, overwrite: bool, log: Log, links=(), empty=()) -> dict:
    """Write [(path, pid)] probes as query/ camera 1 and gallery as bounding_box_test/ camera 2.

    ``base``: the dataset folder found in ``src``; OUT must overlap neither. ``links``: symbolic
    links to folders, not followed; ``empty``: person folders without images; both are named."""
    if not probes or not gallery:
        raise UserError(f"{src}: no {'probe' if not probes else 'whole-body'} images found; not a {what} folder")
    shift = 1 if min(pid for _, pid in probes + gallery) == 0 else 0
    if shift:
        log(f"{src}: ids shifted by +1 (pid 0 means 'distractor' in the Market-1501 protocol)")
    _check_target((src, base), out, overwrite, log)
    with staged_folder(out) as tmp:
        w = _Writer(tmp, src, log)
        for split, cam, items in ((QUERY, PROBE_CAM, probes), (GALLERY, GALLERY_CAM, gallery)):
            for path, pid in _bar(items, split):
                w.copy(path, split, pid + shift, cam)
        w.finish()
    stats = {"query": w.counts[QUERY], "gallery": w.counts[GALLERY], "query_ids": len(w.ids[QUERY]),
             "gallery_ids": len(w.ids[GALLERY]), "non_images": len(others)}
    unmatched = sorted(w.ids[QUERY] - w.ids[GALLERY])
    stats["unmatched_ids"] = unmatched
    log(f"{out}: {what}, test-only: query {stats['query']} images of {stats['query_ids']} ids (camera {PROBE_CAM}), "
        f"gallery {stats['gallery']} images of {stats['gallery_ids']} ids (camera {GALLERY_CAM}); "
        f"published: {published}")
    if unmatched:
        log(f"warning: {len(unmatched)} probe ids have no whole-body image (those queries are skipped in "
            f"evaluation): {_shown(map(str, unmatched), 20)}")
    if empty:
        log(f"warning: skipped {len(empty)} person folder(s) without images: {_shown(_rel(p, src) for p in empty)}")
    if links:
        log(f"warning: {_linked_note(links, src)}")
    if others:
        log(f"skipped {len(others)} non-image file(s): {_shown(str(p.relative_to(src)) for p in others)}")
    stats["empty_folders"] = [_rel(p, src) for p in empty]
    stats["linked_folders"] = [_rel(p, src) for p in links]
    return stats


def _pid_of(path: Path, pattern: re.Pattern, expected: str) -> int:
    m = pattern.match(path.name)
    if not m:
        raise UserError(f"{path}: name does not match {expected}")
    return int(m.group(1))


def convert_occluded_reid(src, out, *, overwrite: bool = False, log: Log = print) -> dict:
    """Occluded-REID (Zhuo et al., ICME 2018): ``occluded_body_images/<PPP>/<PPP>_<NN>.tif``
    and ``whole_body_images/<PPP>/...`` -> query (occluded) and gallery (whole body)."""
    src, out = Path(src), Path(out)
    base, dirs = _find_layout(src, ("occluded_body_images", "whole_body_images"), "Occluded-REID", "--occluded_reid")
    lists, others, links, empty = {}, [], [], []
    for key, folder in dirs.items():
        images, persons, rest = _list_dir(folder, links)
        if images:
            raise UserError(f"{images[0]}: an image directly in {folder.name}/; Occluded-REID keeps one folder per "
                            "person (<PPP>/<PPP>_<NN>.tif); for <PPP>_<NNN>.jpg files use --partial_reid")
        others += rest
        items = []
        for person in persons:
            if not person.name.isdigit():
                raise UserError(f"{person}: person folder name is not a number (expected {folder.name}/<PPP>/)")
            imgs, sub, rest = _list_dir(person, links)
            others += rest + sub
            if not imgs:
                empty.append(person)
            items += [(p, int(person.name)) for p in imgs]
        lists[key] = items
    return _probe_gallery(src, base, out, lists["occluded_body_images"], lists["whole_body_images"], others,
                          what="Occluded-REID", published="200 ids, 1,000 occluded and 1,000 whole-body images",
                          overwrite=overwrite, log=log, links=links, empty=empty)


PARTIAL_REID_NAME = re.compile(r"^(\d+)_\d+\.\w+$")


def convert_partial_reid(src, out, *, probe: str = "partial", overwrite: bool = False, log: Log = print) -> dict:
    """Partial-REID (Zheng et al., ICCV 2015): ``partial_body_images/<PPP>_<NNN>.jpg``,
    ``occluded_body_images/...`` and ``whole_body_images/...``; ``probe`` picks the query folder."""
    if probe not in ("partial", "occluded"):
        raise UserError(f"--probe {probe}: expected partial or occluded")
    src, out = Path(src), Path(out)
    probe_dir = f"{probe}_body_images"
    base, dirs = _find_layout(src, (probe_dir, "whole_body_images"), "Partial-REID", "--partial_reid")
    lists, others, links = {}, [], []
    for key, folder in dirs.items():
        images, sub, rest = _list_dir(folder, links)
        if sub and not images:
            raise UserError(f"{folder}: holds folders ({_shown(p.name for p in sub)}), not <PPP>_<NNN>.jpg images; "
                            "for one folder per person (Occluded-REID) use --occluded_reid")
        others += rest + sub
        lists[key] = [(p, _pid_of(p, PARTIAL_REID_NAME, "<PPP>_<NNN>.jpg (Partial-REID)")) for p in images]
    return _probe_gallery(src, base, out, lists[probe_dir], lists["whole_body_images"], others,
                          what=f"Partial-REID ({probe} probes)",
                          published="60 ids, 300 partial and 300 whole-body images", overwrite=overwrite, log=log,
                          links=links)


PARTIAL_ILIDS_NAME = re.compile(r"^(\d+)\.\w+$")


def convert_partial_ilids(src, out, *, overwrite: bool = False, log: Log = print) -> dict:
    """Partial-iLIDS (Zheng et al., ICCV 2015): ``Probe/<N>.jpg`` and ``Gallery/<N>.jpg``, N = id."""
    src, out = Path(src), Path(out)
    base, dirs = _find_layout(src, ("Probe", "Gallery"), "Partial-iLIDS", "--partial_ilids")
    lists, others, links = {}, [], []
    for key, folder in dirs.items():
        images, sub, rest = _list_dir(folder, links)
        others += rest + sub
        lists[key] = [(p, _pid_of(p, PARTIAL_ILIDS_NAME, "<N>.jpg, N = person id (Partial-iLIDS)")) for p in images]
    return _probe_gallery(src, base, out, lists["Probe"], lists["Gallery"], others, what="Partial-iLIDS",
                          published="119 ids, 119 partial and 119 whole-body images", overwrite=overwrite, log=log,
                          links=links)


# --------------------------------------------------------------------------- occlusion benchmark
def make_occluded(src, out, *, fraction: float = 0.5, seed: int = 0, val_ids: float | None = None,
                  overwrite: bool = False, log=print) -> dict:
    """A copy of ``src``'s test split whose queries (``fraction`` of them, 1.0 = all) carry a
    hard-edged occluder (:func:`occluders.hard_alpha`) filled from a test-split gallery image
    of another identity — a source and shapes that training never produced. Deterministic in ``seed``.

    With ``val_ids`` (the fraction given to ``train.py --val_ids``) the benchmark is built from
    the validation identities that training holds out instead (their query/gallery as
    ``test.py --split val`` makes them, occluders cut from their gallery): somewhere to choose
    test-time settings on occluded queries without touching the test split.

    Writes ``out/query`` (occluded + untouched queries, same names), ``out/bounding_box_test``
    (the gallery, unchanged: hard links where possible, else copies) and ``out/occlusion.json``
    (``images``: "query/NAME" -> {"hidden_rows": per-row hidden fraction} for occluded
    queries, null for the other queries and the gallery). No training folder: a test-only set. Built in a temporary
    folder beside ``out`` and renamed at the end; ``out`` is checked as every builder's
    (``utils.check_output``): never the source, inside it or holding it, and replaced only if
    a builder wrote it.
    """
    out = Path(out)
    data, gallery = _benchmark_source(src, out, fraction=fraction, val_ids=val_ids, overwrite=overwrite, log=log)
    rng = np.random.default_rng(seed)
    donors = [(p, pid) for p, pid, _ in data.gallery if pid > 0]
    if not donors:
        raise UserError(f"{data.root / datasets.SPLITS['gallery']}: no identified gallery images to cut occluders from")
    chosen = set(rng.choice(len(data.query), int(round(fraction * len(data.query))), replace=False).tolist())
    truth, large = {}, []
    with staged_folder(out) as tmp:
        _copy_gallery(gallery, tmp, truth)
        for i, (path, pid, _) in enumerate(data.query):
            name = os.path.basename(path)
            key = f"query/{name}"
            if i not in chosen:
                shutil.copyfile(path, tmp / key)
                truth[key] = None
                continue
            img = np.asarray(load_image(path, large), dtype=np.float32)
            h, w = img.shape[:2]
            while True:
                dpath, dpid = donors[int(rng.integers(len(donors)))]
                if dpid != pid:
                    break
            donor = load_image(dpath, large)
            y0, x0, y1, x1 = occluders.source_box(donor.height, donor.width, rng.random(4).tolist())
            alpha = occluders.hard_alpha(h, w, rng)
            fill = np.asarray(donor.crop((x0, y0, x1, y1)).resize((w, h), Image.BILINEAR), dtype=np.float32)
            mixed = img * (1 - alpha[..., None]) + fill * alpha[..., None]
            Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8)).save(tmp / key, quality=95)
            truth[key] = {"hidden_rows": [round(float(v), 3) for v in alpha.mean(1)]}
        meta = {"source": str(data.root.resolve()), "seed": seed, "fraction": fraction, "val_ids": val_ids,
                # where each query's un-occluded original lies, under the same file name
                "originals": datasets.SPLITS["train" if val_ids is not None else "query"],
                "occluders": "hard-edged rectangles and convex polygons from gallery images of other "
                             f"identities of the {'validation ids' if val_ids is not None else 'test split'} "
                             "(occluders.hard_alpha)",
                "images": truth}
        (tmp / "occlusion.json").write_text(json.dumps(meta))
    n_occ = sum(v is not None for v in truth.values())
    log(f"{out}: {len(data.query)} queries ({n_occ} occluded), {len(data.gallery)} gallery images from {data.root}")
    if large:
        log(f"warning: {large_images_note(list(dict.fromkeys(large)))}")
    return {"queries": len(data.query), "occluded": n_occ}


def _benchmark_source(src, out: Path, *, fraction: float, val_ids: float | None, overwrite: bool, log):
    """The test split (or with ``val_ids`` the validation ids) a test-only benchmark is built
    from: (data, gallery image paths as the folder has them), ``out`` checked."""
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction}: expected a fraction of the queries in (0, 1]")
    check_output(out, sources=[src], overwrite=overwrite, log=log)
    if val_ids is None:
        data = datasets.load_dataset(src, log=lambda *_: None, need=("query", "gallery"))
        # The gallery folder as the source has it (distractors and junk included).
        gallery = [e.path for e in os.scandir(data.root / datasets.SPLITS["gallery"]) if e.is_file()]
    else:
        data = datasets.carve_validation(datasets.load_dataset(src, log=lambda *_: None), val_ids)[1]
        gallery = [p for p, _, _ in data.gallery]
    check_overlap(out, [data.root])     # the dataset found inside src may be a link to elsewhere
    return data, gallery


def _copy_gallery(gallery: list, tmp: Path, truth: dict) -> None:
    """tmp/query (empty) and tmp/bounding_box_test holding ``gallery`` unchanged (hard links
    where possible, else copies), each entered in ``truth`` as untouched (None)."""
    (tmp / "query").mkdir()
    gal = tmp / datasets.SPLITS["gallery"]
    gal.mkdir()
    for path in sorted(gallery, key=os.path.basename):
        name = os.path.basename(path)
        truth[f"{datasets.SPLITS['gallery']}/{name}"] = None
        try:
            os.link(path, gal / name)
        except OSError:
            shutil.copyfile(path, gal / name)


def make_partial(src, out, *, fraction: float = 0.5, seed: int = 0, val_ids: float | None = None,
                 overwrite: bool = False, log=print) -> dict:
    """A copy of ``src``'s test split whose queries (``fraction`` of them, 1.0 = all) are cut to
    a partial view — the top or bottom 40-80 % of the rows, or a side band of 40-80 % of the
    columns (kinds drawn as ``datasets.PARTIAL_KINDS``) — and resized back to the image's size,
    as a detector box cut by a desk, a car or the frame edge is; the gallery is untouched.
    Deterministic in ``seed``; ``val_ids`` builds it from the validation ids, as
    :func:`make_occluded` does.

    Writes ``out/query``, ``out/bounding_box_test`` and ``out/partial.json`` (``images``:
    "query/NAME" -> {"kind", "box": [y0, x0, y1, x1] the part of the original kept, as fractions
    of its height and width} for partial queries, null for whole queries and the gallery).
    Staged and checked like every builder.
    """
    out = Path(out)
    data, gallery = _benchmark_source(src, out, fraction=fraction, val_ids=val_ids, overwrite=overwrite, log=log)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(data.query), int(round(fraction * len(data.query))), replace=False).tolist())
    kinds, probs = list(datasets.PARTIAL_KINDS), list(datasets.PARTIAL_KINDS.values())
    truth, large, counts = {}, [], Counter()
    with staged_folder(out) as tmp:
        _copy_gallery(gallery, tmp, truth)
        for i, (path, _pid, _) in enumerate(data.query):
            key = f"query/{os.path.basename(path)}"
            if i not in chosen:
                shutil.copyfile(path, tmp / key)
                truth[key] = None
                continue
            img = load_image(path, large)
            kind = str(rng.choice(kinds, p=probs))
            keep = float(rng.uniform(0.4, 0.8))
            y0, x0, y1, x1 = datasets.partial_box(kind, keep, "left" if rng.random() < 0.5 else "right")
            w, h = img.size
            box = (round(x0 * w), round(y0 * h), max(round(x1 * w), round(x0 * w) + 1),
                   max(round(y1 * h), round(y0 * h) + 1))
            img.crop(box).resize((w, h), Image.BILINEAR).save(tmp / key, quality=95)
            truth[key] = {"kind": kind, "box": [round(box[1] / h, 4), round(box[0] / w, 4),
                                                round(box[3] / h, 4), round(box[2] / w, 4)]}
            counts[kind] += 1
        meta = {"source": str(data.root.resolve()), "seed": seed, "fraction": fraction, "val_ids": val_ids,
                "originals": datasets.SPLITS["train" if val_ids is not None else "query"],
                "views": "top or bottom 40-80 % of the rows, or a side band of 40-80 % of the columns, resized "
                         "to the image's size", "images": truth}
        (tmp / datasets.PARTIAL_FILE).write_text(json.dumps(meta))
    log(f"{out}: {len(data.query)} queries ({sum(counts.values())} partial: "
        f"{', '.join(f'{counts[k]} {k}' for k in kinds)}), {len(data.gallery)} gallery images from {data.root}")
    if large:
        log(f"warning: {large_images_note(list(dict.fromkeys(large)))}")
    return {"queries": len(data.query), "partial": sum(counts.values()), **counts}


# --------------------------------------------------------------------------- one folder per person
def _parse_test_ids(value: float) -> tuple[float | None, int | None]:
    if 0 < value <= 1:
        return float(value), None
    if value > 1 and float(value).is_integer():
        return None, int(value)
    raise UserError(f"--test_ids {value}: a fraction of the identities in (0, 1] (1 = all: a test-only set) "
                    "or a number of identities > 1")


def _pick_queries(by_cam: dict, q: int, rng: np.random.Generator) -> set:
    """Queries of one person with images from >= 2 cameras: up to ``q`` per camera, such
    that every query keeps a gallery match from another camera. by_cam {cam: [paths]}."""
    cams = sorted(by_cam, key=_natural)
    take = {c: min(q, len(by_cam[c])) for c in cams}
    left = [c for c in cams if len(by_cam[c]) > take[c]]
    if not left:      # every image taken: the camera with fewest images becomes gallery
        take[min(cams, key=lambda c: len(by_cam[c]))] = 0
    elif len(left) == 1:  # the only camera with gallery images cannot also hold queries
        take[left[0]] = 0
    picked = set()
    for c in cams:
        idx = rng.choice(len(by_cam[c]), size=take[c], replace=False) if take[c] else []
        picked |= {by_cam[c][int(i)] for i in idx}
    return picked


def _scan_persons(src: Path, cams: str) -> dict:
    """What ``SRC/<person>/[<camera>/]<image>`` holds: ``persons`` [(folder, {camera subfolder
    name or "": [image paths]})] in natural order, ``use_cams``, and what is skipped (``links``
    to folders, ``stray`` images outside a person folder, ``deeper`` ones below a camera
    folder, ``others`` non-images, ``skipped_dirs``)."""
    links = []                                          # symbolic links to folders: never followed
    stray, person_dirs, others = _list_dir(src, links)  # images at the top are no one's
    deeper = []                                        # images below <person>/<camera>/
    skipped_dirs = [p for p in person_dirs if p.name.startswith(".")]
    person_dirs = [p for p in person_dirs if not p.name.startswith(".")]
    if not person_dirs:
        raise UserError(f"{src}: no person folders (expected {src}/<person>/<image>, one folder per person)")
    listing = {p: _list_dir(p, links) for p in person_dirs}
    with_cams = [p for p, (_, subs, _) in listing.items() if any(_list_dir(s, links)[0] for s in subs)]
    flat = [p for p, (imgs, _, _) in listing.items() if imgs]
    use_cams = cams == "auto" and bool(with_cams)
    if use_cams and flat:
        raise UserError(f"{src}: {len(with_cams)} person folders hold camera subfolders "
                        f"({_shown((p.name for p in with_cams), 3)}) and {len(flat)} hold images directly "
                        f"({_shown((p.name for p in flat), 3)}); arrange them alike, or pass --cams none to "
                        "ignore the subfolders")
    persons = []
    for person, (imgs, subs, rest) in listing.items():
        others += rest
        nested = [f for sub in subs for f in _files_below(sub, links)]
        if use_cams:
            by_cam = {sub.name: _list_dir(sub, links)[0] for sub in subs}
            taken = {x for v in by_cam.values() for x in v}
            deeper += [f for f in nested if f not in taken and f.name.lower().endswith(SRC_IMG_EXTS)]
            taken |= set(deeper)
        else:
            by_cam = {"": imgs + [f for f in nested if not f.name.startswith(".")
                                  and f.name.lower().endswith(SRC_IMG_EXTS)]}
            taken = set(by_cam[""])
        others += [f for f in nested if f not in taken]
        by_cam = {c: v for c, v in by_cam.items() if v}
        if by_cam:
            persons.append((person, by_cam))
        else:
            skipped_dirs.append(person)
    links = sorted(set(links), key=lambda p: _natural(_rel(p, src)))    # some are met more than once
    if not persons:
        raise UserError(f"{src}: no images in any person folder (looked for {', '.join(SRC_IMG_EXTS)})"
                        + (f"; {_linked_note(links, src)}" if links else ""))
    return {"persons": persons, "use_cams": use_cams, "links": links, "stray": stray, "deeper": deeper,
            "others": others, "skipped_dirs": skipped_dirs}


def _choose_test_persons(src: Path, persons: list, use_cams: bool, test_ids: float, seed: int) -> tuple[set, bool]:
    """(the test persons, whether the set is test-only), drawn (seeded) among the persons that
    can be queried: images from two cameras, or two images without cameras."""
    frac, count = _parse_test_ids(test_ids)
    eligible = [p for p, by_cam in persons if (len(by_cam) >= 2 if use_cams else len(by_cam[""]) >= 2)]
    if not eligible:
        raise UserError(f"{src}: no person has {'images from two cameras' if use_cams else 'two images'}; "
                        "a query needs a gallery image of the same person")
    rng = np.random.default_rng(seed)
    n_test = count if count is not None else max(1, round(frac * len(eligible)))
    if n_test > len(eligible):
        raise UserError(f"--test_ids {test_ids}: only {len(eligible)} persons have "
                        f"{'images from two cameras' if use_cams else 'two images'}")
    test_only = frac == 1.0
    if not test_only and n_test == len(persons):
        if n_test == 1:
            raise UserError(f"{src}: one person cannot be split into training and test; pass --test_ids 1 "
                            "for a test-only set")
        n_test -= 1
    order = rng.permutation(len(eligible))
    return {eligible[int(i)] for i in order[:n_test]}, test_only


def _log_folders(log: Log, out: Path, src: Path, stats: dict, scan: dict, cam_id: dict, cam_names: list,
                 query_per_id: int, test_only: bool) -> None:
    """What convert_folders wrote and everything it skipped, said."""
    log(f"{out}: {stats['persons']} persons, {stats['images']} images -> "
        + (f"train {stats['train_ids']} ids / {stats['train']} images, " if not test_only else "test-only, ")
        + f"query {stats['query_ids']} ids / {stats['query']}, gallery {stats['gallery_ids']} ids / {stats['gallery']}")
    if scan["use_cams"]:
        log(f"cameras from the subfolders: {', '.join(f'{cam_id[c]}={c}' for c in cam_names)}; up to "
            f"{query_per_id} quer{'y' if query_per_id == 1 else 'ies'} per (test id, camera), each with a match "
            "from another camera; evaluated with the Market-1501 same-camera filter")
    else:
        log("no camera information: queries are written as camera 1 and the gallery as camera 2, so every other "
            "image of the person counts as a match, same-camera ones included (scores read higher than under the "
            "camera-filtered protocol; see README)")
    single, skipped_dirs, links = stats["single"], scan["skipped_dirs"], scan["links"]
    stray, deeper, others = scan["stray"], scan["deeper"], scan["others"]
    if single:
        why = "images from one camera" if scan["use_cams"] else "one image"
        log(f"{len(single)} person(s) with {why} cannot be both query and gallery; they went to "
            f"{'the gallery (no query)' if test_only else TRAIN + '/'}: {_shown(single)}")
    if skipped_dirs:
        log(f"skipped {len(skipped_dirs)} folder(s), hidden or without images: {_shown(p.name for p in skipped_dirs)}")
    if links:
        log(_linked_note(links, src))
    if stray:
        log(f"skipped {len(stray)} image(s) outside a person folder: {_shown(p.name for p in stray)}")
    if deeper:
        log(f"skipped {len(deeper)} image(s) below <person>/<camera>/: "
            f"{_shown(str(p.relative_to(src)) for p in deeper)}")
    if others:
        log(f"skipped {len(others)} non-image file(s): {_shown(str(p.relative_to(src)) for p in others)}")


def convert_folders(src, out, *, cams: str = "auto", query_per_id: int = 1, test_ids: float = 0.5, seed: int = 0,
                    overwrite: bool = False, log: Log = print) -> dict:
    """``SRC/<person>/<image>`` (or ``SRC/<person>/<camera>/<image>``) -> Market layout.

    Persons (natural order of folder names) become pids 1..N (``persons.tsv``). Test ids are
    drawn (seeded) among the persons that can be queried; each gets ``query_per_id`` queries
    per camera, the rest of its images go to the gallery. Without cameras (``cams="none"``,
    or no camera subfolders): queries are written as camera 1 and the gallery as camera 2, so
    the evaluator's same-camera filter never removes a match: every other image of the
    person counts (the query itself is never in the gallery).
    """
    src, out = Path(src), Path(out)
    if cams not in ("auto", "none"):
        raise UserError(f"--cams {cams}: expected auto or none")
    if query_per_id < 1:
        raise UserError(f"--query_per_id {query_per_id}: must be at least 1")
    _parse_test_ids(test_ids)
    if not src.is_dir():
        raise UserError(f"{src}: no such folder (expected one folder per person: {src}/<person>/<image>)")
    _check_target((src,), out, overwrite, log)
    scan = _scan_persons(src, cams)
    persons, use_cams = scan["persons"], scan["use_cams"]
    cam_names = sorted({c for _, by_cam in persons for c in by_cam}, key=_natural)
    cam_id = {c: i + 1 for i, c in enumerate(cam_names)} if use_cams else {"": PROBE_CAM}
    pid_of = {person: i + 1 for i, (person, _) in enumerate(persons)}
    test, test_only = _choose_test_persons(src, persons, use_cams, test_ids, seed)
    single = [p for p, by_cam in persons if not (len(by_cam) >= 2 if use_cams else len(by_cam[""]) >= 2)]
    with staged_folder(out) as tmp:
        w = _Writer(tmp, src, log)
        rows = []
        for person, by_cam in _bar(persons, "persons"):
            pid = pid_of[person]
            paths = [(x, c) for c in sorted(by_cam, key=_natural) for x in by_cam[c]]
            if person in test:
                r = np.random.default_rng([seed, pid])
                if use_cams:
                    queries = _pick_queries(by_cam, query_per_id, r)
                else:   # the query's own image never stays in the gallery; at least one image does
                    imgs = by_cam[""]
                    queries = {imgs[int(i)] for i in r.choice(len(imgs), min(query_per_id, len(imgs) - 1), False)}
                for x, c in paths:
                    is_q = x in queries
                    cam = cam_id[c] if use_cams else (PROBE_CAM if is_q else GALLERY_CAM)
                    w.copy(x, QUERY if is_q else GALLERY, pid, cam)
                split = "test"
            else:
                # A person who cannot be queried trains, or in a test-only set joins the gallery.
                target = GALLERY if test_only else TRAIN
                for x, c in paths:
                    w.copy(x, target, pid, cam_id[c] if use_cams else (GALLERY_CAM if test_only else PROBE_CAM))
                split = "gallery" if test_only else "train"
            rows.append((pid, split, person.name, len(paths)))
        w.finish()
        write_tsv(tmp / "persons.tsv", ("pid", "split", "folder", "images"), rows)
    stats = {"persons": len(persons), "images": sum(w.counts.values()), "train": w.counts[TRAIN],
             "query": w.counts[QUERY], "gallery": w.counts[GALLERY], "train_ids": len(w.ids[TRAIN]),
             "query_ids": len(w.ids[QUERY]), "gallery_ids": len(w.ids[GALLERY]),
             "cameras": len(cam_names) if use_cams else 0, "single": [p.name for p in single],
             "non_images": len(scan["others"]), "stray_images": len(scan["stray"]),
             "deeper_images": len(scan["deeper"]), "skipped_folders": [p.name for p in scan["skipped_dirs"]],
             "linked_folders": [_rel(p, src) for p in scan["links"]]}
    _log_folders(log, out, src, stats, scan, cam_id, cam_names, query_per_id, test_only)
    return stats


# --------------------------------------------------------------------------- MSMT17
# os.link errors that mean "no hard link possible here" (other filesystem, no support, link
# limit, protected_hardlinks): --link then copies instead.
LINK_FALLBACK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK)
MSMT_LISTS = {"list_train.txt": "bounding_box_train", "list_val.txt": "bounding_box_train",
              "list_query.txt": "query", "list_gallery.txt": "bounding_box_test"}


def convert_msmt17(src: str | os.PathLike, out: str | os.PathLike, *, link: bool = False,
                   overwrite: bool = False, log=print) -> dict:
    """MSMT17 V1/V2 (list files) -> Market layout; copies or hard-links, never touches ``src``.

    Labels are offset by +1: in the Market protocol pid 0 means "distractor".
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"{src}: no such folder (expected the MSMT17_V1 or MSMT17_V2 folder)")
    img_dirs = {"train": next((src / d for d in ("train", "mask_train_v2") if (src / d).is_dir()), None),
                "test": next((src / d for d in ("test", "mask_test_v2") if (src / d).is_dir()), None)}
    missing = [n for n in MSMT_LISTS if not (src / n).is_file()]
    if missing or None in img_dirs.values():
        raise UserError(f"{src}: not an MSMT17 folder: missing {', '.join(missing) or 'train/ or test/ images'}")
    check_output(out, sources=[src], overwrite=overwrite, log=log)
    counts = defaultdict(int)
    link_failed, copied = "", 0
    with staged_folder(out) as tmp:
        for list_name, sub in MSMT_LISTS.items():
            (tmp / sub).mkdir(parents=True, exist_ok=True)
            base = img_dirs["train" if sub == "bounding_box_train" else "test"]
            for n, line in enumerate((src / list_name).read_text().split("\n")):
                if not line.strip():
                    continue
                try:
                    rel, label = line.split()
                    cam = int(Path(rel).name.split("_")[2])
                    pid = int(label) + 1
                except (ValueError, IndexError):
                    raise UserError(f"{src / list_name}:{n + 1}: cannot parse {line!r} "
                                    "(expected 'PID/PID_IDX_CAM_....jpg LABEL')") from None
                source = base / rel
                if not source.is_file():
                    raise UserError(f"{src / list_name}:{n + 1}: {source} not found")
                tag = "v" if list_name == "list_val.txt" else "s"
                dest = tmp / sub / f"{pid:04d}_c{cam}{tag}1_{n:06d}_00{source.suffix.lower()}"
                linked = False
                if link and not link_failed:
                    try:
                        os.link(source, dest)
                        linked = True
                    except OSError as exc:
                        # e.g. SRC and OUT on different filesystems: copy this and every later file
                        if exc.errno not in LINK_FALLBACK_ERRNOS:
                            raise
                        link_failed = os.strerror(exc.errno)
                if not linked:
                    shutil.copyfile(source, dest)
                    copied += 1 if link else 0
                counts[sub] += 1
    log(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if copied:
        log(f"--link: cannot hard-link {src} into {out.parent} ({link_failed}); copied {copied} "
            f"file(s) instead (same result, more disk space)")
    return dict(counts)


# --------------------------------------------------------------------------- CUHK03
CUHK03_MAT = "cuhk-03.mat"
CUHK03_PROTOCOL = {"labeled": "cuhk03_new_protocol_config_labeled.mat",
                   "detected": "cuhk03_new_protocol_config_detected.mat"}
CUHK03_PUBLISHED = {"labeled": "7,368 / 1,400 / 5,328", "detected": "7,365 / 1,400 / 5,332"}
CUHK03_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)(\.\w+)?$")    # pair_person_view_image.png, 1-based
PROTOCOL_KEYS = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")


def _read_protocol(path: Path, mat_path: Path) -> dict:
    """A new-protocol split file (MATLAB v5) -> names, labels, views and 0-based split indices."""
    import scipy.io

    try:
        m = scipy.io.loadmat(str(path))
    # a truncated or damaged file fails deep inside scipy's reader, as IndexError among others
    except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError, NotImplementedError, MemoryError,
            scipy.io.matlab.MatReadError) as exc:
        raise UserError(f"{path}: not a readable MATLAB .mat file, truncated or damaged ({_one_line(exc)}); "
                        "download the split file again") from None
    missing = [k for k in PROTOCOL_KEYS if k not in m]
    if missing:
        have = sorted(k for k in m if not k.startswith("__"))
        raise UserError(f"{path}: no {', '.join(missing)} (has: {', '.join(have) or 'nothing'}); "
                        "not a CUHK03 new-protocol split file")
    fl = m["filelist"].ravel()
    names = [str(np.asarray(x).ravel()[0]).strip() if fl.dtype == object else str(x).strip() for x in fl]

    def mismatch(what: str) -> UserError:
        return UserError(f"{path}: does not match {mat_path}: {what}; use the split files published "
                         "with the new protocol, unmodified")

    labels, views = m["labels"].ravel().astype(np.int64), m["camId"].ravel().astype(np.int64)
    if len(labels) != len(names) or len(views) != len(names):
        raise mismatch(f"{len(names)} file names but {len(labels)} labels and {len(views)} camIds")
    split = {}
    for key in ("train", "query", "gallery"):
        idx = m[f"{key}_idx"].ravel().astype(np.int64) - 1
        if len(idx) and (idx.min() < 0 or idx.max() >= len(names)):
            raise mismatch(f"{key}_idx holds {int(idx.min()) + 1}..{int(idx.max()) + 1}, outside 1..{len(names)}")
        split[key] = idx
    every = np.concatenate(list(split.values()))
    if len(np.unique(every)) != len(every):
        raise mismatch("an image is listed twice in train_idx/query_idx/gallery_idx")
    train_ids, test_ids = set(labels[split["train"]].tolist()), set(labels[np.concatenate(
        [split["query"], split["gallery"]])].tolist())
    if train_ids & test_ids:
        raise mismatch(f"{len(train_ids & test_ids)} ids are in both training and test")
    return {"path": path, "names": names, "labels": labels, "views": views, "split": split,
            "unused": len(names) - len(every), "mismatch": mismatch}


@contextlib.contextmanager
def _h5_damage(mat_path: Path, what: str):
    """Reading from ``cuhk-03.mat``: h5py reports a damaged or truncated file as KeyError ("bad
    object header"), RuntimeError, OSError or ValueError; one line naming the file instead.
    Only reads go in here, so a failed write is never blamed on the source."""
    try:
        yield
    except (KeyError, RuntimeError, OSError, ValueError, IndexError, TypeError) as exc:
        raise UserError(f"{mat_path}: {what} unreadable: the file is damaged or truncated ({_one_line(exc)}); "
                        "download cuhk-03.mat again") from None


def _cuhk03_cells(f, kind: str, mat_path: Path) -> list:
    """The camera pairs of ``f[kind]`` as (persons, 10) arrays of HDF5 object references."""
    import h5py

    if kind not in f:
        raise UserError(f"{mat_path}: no '{kind}' variable (has: {', '.join(sorted(f.keys()))}); "
                        "not the raw CUHK03 cuhk-03.mat")
    pairs = f[kind]
    if not isinstance(pairs, h5py.Dataset) or pairs.dtype != h5py.ref_dtype:
        raise UserError(f"{mat_path}: '{kind}' is not a cell array of camera pairs; not the raw CUHK03 cuhk-03.mat")
    cells = []
    for ref in pairs[()].ravel():
        table = f[ref]
        # MATLAB stores arrays column-major: a persons x 10 cell reads as (10, persons).
        if not isinstance(table, h5py.Dataset) or table.dtype != h5py.ref_dtype or table.ndim != 2 \
                or table.shape[0] != 10:
            raise UserError(f"{mat_path}: '{kind}' camera pair {len(cells) + 1} is not a persons x 10 cell of "
                            f"images (shape {getattr(table, 'shape', '?')}); not the raw CUHK03 cuhk-03.mat")
        cells.append(table[()].T)
    return cells


def _cuhk03_image(f, ref) -> np.ndarray | None:
    """One cell: (H, W, 3) uint8, or None for an empty cell (a missing image)."""
    ds = f[ref]
    if ds.attrs.get("MATLAB_empty") or ds.ndim < 3 or ds.size == 0:
        return None
    arr = ds[()]
    if arr.dtype != np.uint8 or arr.shape[0] != 3:
        raise ValueError(f"dtype {arr.dtype}, shape {arr.shape}: expected uint8 (3, W, H)")
    return np.ascontiguousarray(arr.transpose(2, 1, 0))      # stored transposed: (3, W, H) -> (H, W, 3)


def convert_cuhk03(src, out, *, overwrite: bool = False, log: Log = print) -> dict:
    """Raw CUHK03 -> CUHK03-NP (new protocol, Zhong et al. CVPR 2017), ``OUT/labeled`` and
    ``OUT/detected``, each in the Market layout.

    ``src``: the folder holding ``cuhk-03.mat`` (or its ``cuhk03_release/``) and the two
    ``cuhk03_new_protocol_config_*.mat`` files, or ``cuhk-03.mat`` itself. Names are
    ``PID_cCAM_<protocol file name>``: pid = the protocol's label, camera = 2 * (pair - 1) +
    view (1..10), so a pair's two views are two cameras and the reader needs nothing else.
    """
    import h5py  # only this converter needs it

    src, out = Path(src), Path(out)
    if src.is_file():
        dirs = [src.parent, src.parent.parent]
        mat_path = src
    elif src.is_dir():
        dirs = [src, src / "cuhk03_release"]
        mat_path = next((d / CUHK03_MAT for d in dirs if (d / CUHK03_MAT).is_file()), None)
        if mat_path is None:
            raise UserError(f"{src}: no {CUHK03_MAT} here or in {src / 'cuhk03_release'} "
                            "(the raw CUHK03 release, MATLAB v7.3)")
    else:
        raise UserError(f"{src}: no such folder (expected the folder holding {CUHK03_MAT})")
    dirs = list(dict.fromkeys(dirs + [mat_path.parent]))
    protocols = {}
    for kind, name in CUHK03_PROTOCOL.items():
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is None:
            raise UserError(f"{dirs[0] / name}: not found (looked in {', '.join(map(str, dirs))}); put the CUHK03 "
                            "new-protocol split files (Zhong et al., CVPR 2017) beside cuhk-03.mat")
        protocols[kind] = _read_protocol(path, mat_path)
    _check_target([mat_path.parent, src if src.is_dir() else None] + [p["path"].parent for p in protocols.values()],
                  out, overwrite, log)
    try:
        f = h5py.File(mat_path, "r")
    except OSError as exc:
        raise UserError(f"{mat_path}: not a readable MATLAB v7.3 (HDF5) file ({_one_line(exc)}); the raw CUHK03 "
                        "release's cuhk-03.mat is one") from None
    stats = {}
    with f, staged_folder(out) as tmp:
        for kind, proto in protocols.items():
            with _h5_damage(mat_path, f"'{kind}'"):
                cells = _cuhk03_cells(f, kind, mat_path)
            stats[kind] = _write_cuhk03(f, cells, proto, tmp / kind, kind, mat_path, log)
    for kind, s in stats.items():
        log(f"{out / kind}: train {s['train']} images / {s['train_ids']} ids, query {s['query']}, gallery "
            f"{s['gallery']} / {s['test_ids']} ids (published train / query / gallery: {CUHK03_PUBLISHED[kind]})")
        if s["unused_cells"] or s["unused_names"]:
            log(f"warning: {kind}: {s['unused_cells']} images of {mat_path.name} and {s['unused_names']} names of "
                f"{protocols[kind]['path'].name} are in no split, so not written")
    return stats


def _write_cuhk03(f, cells: list, proto: dict, root: Path, kind: str, mat_path: Path, log: Log) -> dict:
    mismatch, names, labels, views = proto["mismatch"], proto["names"], proto["labels"], proto["views"]
    shift = 1 if labels.min() == 0 else 0
    if shift:
        log(f"{proto['path']}: labels shifted by +1 (pid 0 means 'distractor' in the Market-1501 protocol)")
    w = _Writer(root, mat_path.parent, log)
    owner: dict = {}
    used = set()
    jobs = [(split, i) for split, key in ((TRAIN, "train"), (QUERY, "query"), (GALLERY, "gallery"))
            for i in proto["split"][key].tolist()]
    for split, i in _bar(jobs, kind):
        name = names[i]
        m = CUHK03_NAME.match(name)
        if not m:
            raise mismatch(f"file name {name!r} (row {i + 1}) is not PAIR_PERSON_VIEW_IMAGE.png")
        pair, person, view, image = (int(g) for g in m.groups()[:4])
        if not (1 <= pair <= len(cells) and 1 <= person <= cells[pair - 1].shape[0] and 1 <= image <= 10):
            raise mismatch(f"{name} (row {i + 1}) is outside the {kind} cells of {mat_path.name}")
        if view not in (1, 2) or views[i] != view:
            raise mismatch(f"{name} (row {i + 1}) has camId {views[i]}, its name says view {view}")
        pid = int(labels[i]) + shift
        if owner.setdefault((pair, person), pid) != pid:
            raise mismatch(f"person {person} of pair {pair} has labels {owner[(pair, person)]} and {pid}")
        with _h5_damage(mat_path, f"{kind} pair {pair} person {person} image {image}"):
            img = _cuhk03_image(f, cells[pair - 1][person - 1, image - 1])
        if img is None:
            raise mismatch(f"{name} (row {i + 1}) is an empty cell of {kind} in {mat_path.name}")
        used.add((pair, person, image))
        w.array(img, split, pid, 2 * (pair - 1) + view, f"_{Path(name).stem}.png",
                f"{mat_path.name}:{kind}[pair {pair}][person {person}, image {image}]")
    if len(set(owner.values())) != len(owner):
        raise mismatch("one label names persons of two camera pairs")
    w.finish()
    with _h5_damage(mat_path, f"the unused cells of '{kind}'"):
        unused = sum(1 for p, table in enumerate(cells, 1) for (r, c), ref in np.ndenumerate(table)
                     if (p, r + 1, c + 1) not in used and _nonempty(f, ref))
    return {"train": w.counts[TRAIN], "query": w.counts[QUERY], "gallery": w.counts[GALLERY],
            "train_ids": len(w.ids[TRAIN]), "test_ids": len(w.ids[QUERY] | w.ids[GALLERY]),
            "unused_cells": unused, "unused_names": proto["unused"]}


def _nonempty(f, ref) -> bool:
    ds = f[ref]
    return not ds.attrs.get("MATLAB_empty") and ds.ndim == 3 and ds.size > 0
