"""Search a folder of your own images with one image: listing, a feature cache, ranking.

The library behind ``demo.py --query IMAGE --gallery DIR``. Images under the folder may have
any names (no pid or camera needed); every ``datasets.IMG_EXTS`` file under it, at any depth,
is a gallery image. Gallery features are cached in ``RUN/search_cache/<key>.pt`` (key: the
folder, the checkpoint name and the flip setting). The file records the checkpoint's and
opts.yaml's stamp and each image's relative path and stamp (``inference.file_stamp``: size,
modification time, inode and status-change time, so a same-size replacement whose mtime was
set back with ``touch -r`` still counts as changed): a changed checkpoint discards the whole
cache, and a changed, added or removed image is re-extracted or dropped alone. A file that
cannot be read (a dangling link, one removed while the search runs) is listed and skipped.

Beyond one folder held in memory: :func:`index_folder` syncs a folder into a persistent
``gallery_index.GalleryIndex`` (new and changed images extracted, vanished ones removed) and
:func:`search_index` answers a query from it. Open set: ``RUN/threshold.json`` (written by
``test.py --split val --calibrate FMR``) holds the distance below which two images count as the
same person; :func:`resolve_threshold` reads it for a search, which then answers "no match"
rather than name the nearest stranger.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

import datasets
import gallery_index
from inference import Extractor, file_stamp
from utils import UserError, atomic_write, atomic_write_text

CACHE_DIR = "search_cache"
CACHE_FORMAT = 2    # 2: entries carry inode and ctime besides size and mtime
LISTED = 5          # names shown in a "skipped ..." note; the rest are counted
THRESHOLD_FILE = "threshold.json"
THRESHOLD_FORMAT = 1
SAVE_EVERY = 50_000  # index_folder commits the index every this many added images


def list_images(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(images, other files) under ``folder``, recursively, sorted by relative path.

    Images: a ``datasets.IMG_EXTS`` extension and not hidden. Symbolic links to folders are
    not followed (no loops).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--gallery {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            ok = name.lower().endswith(datasets.IMG_EXTS) and not name.startswith(".")
            (images if ok else others).append(Path(dirpath) / name)
    return images, others


def _named(paths, root: Path) -> str:
    names = [os.path.relpath(p, root) for p in paths]
    return ", ".join(names[:LISTED]) + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def _load_cache(path: Path, identity: dict, log: Callable[[str], None]) -> dict:
    """{(relpath, *file_stamp): (emb (P,D), weights (P,))} from a valid cache file, else {}."""
    if not path.is_file():
        return {}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or unsafe: rebuild it either way
        log(f"note: {path}: unreadable feature cache ({type(exc).__name__}); extracting again")
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        log(f"note: {path}: not a feature cache of this version; extracting again")
        return {}
    if data.get("identity") != identity:
        log(f"note: {path}: the checkpoint (or its opts.yaml) changed since the cache was written; extracting again")
        return {}
    return {tuple(f): (e, w) for f, e, w in zip(data["files"], data["emb"], data["weights"])}


def gallery_features(ext: Extractor, folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     *, log: Callable[[str], None] = print) -> dict:
    """Features of every image under ``folder``, reusing and updating the cache in ``cache_dir``.

    Returns {"paths": [str] (G,), "emb": (G,P,D), "weights": (G,P), "cached": int,
    "extracted": int, "bad": [(path, reason)], "unreadable": [(path, reason)], "others": [Path]};
    undecodable images are left out of ``paths`` and listed in ``bad``, files that cannot be
    read at all (gone, a dangling link) in ``unreadable``.
    """
    folder = Path(folder)
    listed, others = list_images(folder)
    images, entries, unreadable = [], [], []
    for p in listed:
        try:
            st = p.stat()
        except OSError as exc:
            unreadable.append((str(p), _unreadable(p, exc)))
            continue
        images.append(p)
        entries.append((os.path.relpath(p, folder), *file_stamp(p, st)))
    identity = {"folder": str(folder.resolve()), **ext.identity}
    cache_path = None
    cached = {}
    if cache_dir is not None and "checkpoint" not in identity:
        # An extractor not made by Extractor.from_run cannot say which weights it holds.
        log("note: no feature cache: the extractor does not come from Extractor.from_run")
        cache_dir = None
    if cache_dir is not None:
        name = json.dumps({k: identity.get(k) for k in ("folder", "run", "which", "flip", "height", "width")},
                          sort_keys=True)
        cache_path = Path(cache_dir) / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.pt"
        cached = _load_cache(cache_path, identity, log)
    todo = [i for i, e in enumerate(entries) if e not in cached]
    emb_new, w_new, bad = ext.extract_files([images[i] for i in todo], desc="gallery")
    bad_rows = {todo[j] for j, _ in bad}
    # Gone between the listing and the extraction: unreadable, not a broken image.
    gone = [(j, why) for j, why in bad if not images[todo[j]].is_file()]
    unreadable += [(str(images[todo[j]]), "removed while the search ran") for j, _ in gone]
    bad = [b for b in bad if b not in gone]
    fresh = iter(zip(emb_new, w_new))
    rows = {}
    for i in todo:
        if i not in bad_rows:
            rows[i] = next(fresh)
    keep = [i for i in range(len(entries)) if i not in bad_rows]
    feats = [cached[entries[i]] if entries[i] in cached else rows[i] for i in keep]
    emb = torch.stack([f[0] for f in feats]) if feats else torch.empty(0, ext.parts, ext.embed_dim)
    weights = torch.stack([f[1] for f in feats]) if feats else torch.empty(0, ext.parts)
    files = [list(entries[i]) for i in keep]
    if cache_path is not None and (todo or len(cached) != len(keep)):
        state = {"format": CACHE_FORMAT, "identity": identity, "files": files, "emb": emb, "weights": weights}
        atomic_write(cache_path, lambda f: torch.save(state, f))
    return {"paths": [str(images[i]) for i in keep], "emb": emb, "weights": weights,
            "cached": len(keep) - (len(todo) - len(bad_rows)), "extracted": len(todo) - len(bad_rows),
            "bad": [(str(images[todo[j]]), why) for j, why in bad], "unreadable": unreadable, "others": others,
            "cache": cache_path}


def _unreadable(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "dangling symbolic link" if path.is_symlink() else "removed while the search ran"
    return exc.strerror or type(exc).__name__


def search(ext: Extractor, query: str | os.PathLike, folder: str | os.PathLike, *, topk: int = 10,
           weighting: str = "adaptive", cache_dir: str | os.PathLike | None = None,
           log: Callable[[str], None] = print) -> dict:
    """Rank every image under ``folder`` against the image ``query``.

    The query file itself, when it lies in the folder, is left out. Returns {"query": str,
    "query_emb": (1,P,D), "query_weights": (1,P), "order": (k,) indices into "paths",
    "dists": (k,) float32, plus what :func:`gallery_features` returns}.
    """
    query = Path(query)
    if not query.is_file():
        raise UserError(f"--query {query}: {'not a file' if query.exists() else 'no such file'}")
    try:
        qf, qw = ext([query])
    except UserError as exc:
        raise UserError(f"--query {query}: not an image ({exc})") from None
    gal = gallery_features(ext, folder, cache_dir, log=log)
    same = [i for i, p in enumerate(gal["paths"]) if Path(p).resolve() == query.resolve()]
    gal["self"] = [gal["paths"][i] for i in same]
    if gal["paths"] and len(same) == len(gal["paths"]):
        raise UserError(f"--gallery {folder}: the gallery is empty apart from the query itself "
                        f"({_named(gal['self'], Path(folder))}); put the images to search among in it")
    if not gal["paths"]:
        raise UserError(f"--gallery {folder}: no images to rank (looked for {', '.join(datasets.IMG_EXTS)} files "
                        f"at any depth; found {len(gal['others'])} other file(s), {len(gal['bad'])} undecodable, "
                        f"{len(gal['unreadable'])} unreadable)")
    dist = ext.distance((qf, qw), (gal["emb"], gal["weights"]), weighting=weighting)[0]
    dist[same] = float("inf")
    k = min(topk, len(gal["paths"]) - len(same))
    # Stable sort: ties go to the earlier path, as evaluate.py breaks ties by gallery order.
    order = torch.sort(dist, stable=True).indices[:k]
    return {**gal, "query": str(query), "query_emb": qf, "query_weights": qw, "order": order, "dists": dist[order]}


def _reason(message: str, path: str) -> str:
    """'cannot decode image (...)' out of datasets.load_image's message (which names the path
    and a fix meant for datasets)."""
    why = message[len(path) + 2:] if message.startswith(f"{path}: ") else message
    return why.split("; remove or replace")[0][:120]


def notes(res: dict, folder: str | os.PathLike) -> list[str]:
    """What was left out of a :func:`search`, one line each (nothing dropped silently)."""
    folder = Path(folder)
    out = []
    if res["bad"]:
        out.append(f"skipped {len(res['bad'])} image(s) that cannot be decoded: "
                   + "; ".join(f"{os.path.relpath(p, folder)} ({_reason(why, p)})"
                               for p, why in res["bad"][:LISTED])
                   + (f" and {len(res['bad']) - LISTED} more" if len(res["bad"]) > LISTED else ""))
    if res.get("unreadable"):
        out.append(f"skipped {len(res['unreadable'])} file(s) that cannot be read: "
                   + "; ".join(f"{os.path.relpath(p, folder)} ({why})" for p, why in res["unreadable"][:LISTED])
                   + (f" and {len(res['unreadable']) - LISTED} more" if len(res["unreadable"]) > LISTED else ""))
    if res["others"]:
        out.append(f"ignored {len(res['others'])} non-image file(s) (not {'/'.join(datasets.IMG_EXTS)}): "
                   + _named(res["others"], folder))
    if res.get("self"):
        out.append(f"left out the query itself: {_named(res['self'], folder)}")
    return out


# --------------------------------------------------------------------------- open set
def save_threshold(run_dir: str | os.PathLike, record: dict) -> Path:
    """Write ``RUN/threshold.json`` atomically: {"threshold", "fmr", "weighting", "identity", ...}."""
    path = Path(run_dir) / THRESHOLD_FILE
    atomic_write_text(path, json.dumps({"format": THRESHOLD_FORMAT, **record}, indent=1) + "\n")
    return path


def load_threshold(run_dir: str | os.PathLike, identity, weighting: str) -> dict | None:
    """The run's calibrated threshold record, or None when it has none. Refused (UserError) when it
    was calibrated for another checkpoint or another weighting than the search uses. ``identity``:
    the search's (``gallery_index.run_identity``), or a function returning it (called only when
    the file exists: hashing a checkpoint takes a moment)."""
    path = Path(run_dir) / THRESHOLD_FILE
    if not path.is_file():
        return None
    identity = identity() if callable(identity) else identity
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); recalibrate with python test.py --name {Path(run_dir).name} "
                        "--split val --calibrate 0.01") from None
    fix = (f"recalibrate with python test.py --name {Path(run_dir).name} --split val --calibrate {rec.get('fmr', 0.01)}"
           if isinstance(rec, dict) else "")
    if not isinstance(rec, dict) or rec.get("format") != THRESHOLD_FORMAT or "threshold" not in rec:
        raise UserError(f"{path}: not a threshold file of this version; recalibrate with python test.py --name "
                        f"{Path(run_dir).name} --split val --calibrate 0.01")
    differs = gallery_index.identity_differs(rec.get("identity", {}), identity)
    if differs:
        raise UserError(f"{path} was calibrated for {gallery_index.describe_identity(rec.get('identity', {}))}, but "
                        f"the search runs {gallery_index.describe_identity(identity)} (differs in {', '.join(differs)}); "
                        f"{fix}, or pass --threshold none")
    if rec.get("weighting") != weighting:
        raise UserError(f"{path} was calibrated with {rec.get('weighting')} weights, the search ranks with {weighting}; "
                        f"{fix} --weighting {weighting}, or pass --threshold none")
    return rec


def resolve_threshold(value: str | float | None, run_dir, identity, weighting: str) -> tuple[float | None, str]:
    """A search's threshold from ``--threshold``: "auto" (the run's threshold.json when there is
    one, else none), "none", or a distance. Returns (threshold or None, a line saying where it
    comes from)."""
    if value is None or value == "auto":
        rec = load_threshold(run_dir, identity, weighting)
        if rec is None:
            return None, (f"no threshold: {Path(run_dir) / THRESHOLD_FILE} does not exist, so the nearest images are "
                          "listed however far they are; calibrate one with test.py --split val --calibrate 0.01")
        return float(rec["threshold"]), (f"threshold d < {rec['threshold']:.4f}: false-match rate "
                                         f"{100 * rec['fmr']:g}% on the validation ids (TMR {100 * rec['tmr']:.1f}%), "
                                         f"{Path(run_dir) / THRESHOLD_FILE}")
    if value == "none":
        return None, "no threshold (--threshold none): the nearest images are listed however far they are"
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--threshold {value}: expected auto, none or a distance in (0, 2]") from None
    if not 0 < t <= 2:
        raise UserError(f"--threshold {value}: expected a distance in (0, 2] (weighted part distances lie in [0, 2])")
    return t, f"threshold d < {t:.4f} (--threshold)"


# --------------------------------------------------------------------------- persistent index
def open_or_create_index(ext: Extractor, index_dir: str | os.PathLike, *, expected: int = 0,
                         weighting: str | None = None, kind: str = "auto", milvus: str | None = None,
                         log: Callable[[str], None] = print) -> gallery_index.GalleryIndex:
    """The index in ``index_dir`` opened for writing (refused if another run's), or a new one for
    this extractor's run: ``kind``, ``milvus`` (None: faiss; "lite" or a URI: Milvus), sized for
    ``expected`` images, ranking with ``weighting`` (default: the run's)."""
    ident = gallery_index.run_identity(ext)
    index_dir = Path(index_dir)
    if (index_dir / gallery_index.META).is_file():
        idx = gallery_index.GalleryIndex.open(index_dir, ident, write=True, log=log)
        if weighting and weighting != idx.meta["weighting"]:
            idx.close()
            raise UserError(f"{index_dir}: built to rank with {idx.meta['weighting']} weights, not {weighting}; "
                            f"drop --weighting, or build another index with --weighting {weighting}")
        return idx
    return gallery_index.GalleryIndex.create(
        index_dir, ident, parts=ext.parts, dim=ext.embed_dim, weighting=weighting or ext.weighting, kind=kind,
        expected=expected, backend="milvus" if milvus else "faiss", uri=milvus, log=log)


def index_folder(ext: Extractor, folder: str | os.PathLike, index_dir: str | os.PathLike, *,
                 weighting: str | None = None, kind: str = "auto", milvus: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Sync every image under ``folder`` into the index in ``index_dir`` (created when missing).

    New images are extracted and added, changed ones (``inference.file_stamp``) re-extracted,
    vanished ones removed; the rest is left as it is, without a rebuild. Names are the paths as
    listed (``folder`` joined with the relative path). Committed every SAVE_EVERY added images and
    at the end. Returns {"index": the GalleryIndex (closed), "description": what it holds (one
    line), "added", "removed", "unchanged": int,
    "bad": [(path, reason)], "unreadable": [(path, reason)], "others": [Path]}.
    """
    folder = Path(folder)
    listed, others = list_images(folder)
    root = str(folder.resolve())
    stamps, unreadable = {}, []
    for p in listed:
        try:
            stamps[os.path.relpath(p, folder)] = file_stamp(p)
        except OSError as exc:
            unreadable.append((str(p), _unreadable(p, exc)))
    idx = open_or_create_index(ext, index_dir, expected=len(stamps), weighting=weighting, kind=kind,
                               milvus=milvus, log=log)
    added, bad = 0, []
    with idx:
        known = dict(idx.sources.get(root, {}))           # relpath -> [*stamp, id]
        stale = [rel for rel, rec in known.items() if rel not in stamps or rec[:-1] != stamps[rel]]
        removed = idx.remove(ids=[known[rel][-1] for rel in stale]) if stale else 0
        for rel in stale:
            del known[rel]
        todo = [rel for rel in stamps if rel not in known]
        unchanged = len(known)
        since = 0
        for s in range(0, len(todo), 4096):
            rels = todo[s:s + 4096]
            out = gallery_index.add_images(idx, ext, [str(folder / r) for r in rels], log=log)
            gone = {j for j, _ in out["bad"]}
            for j, why in out["bad"]:
                path = folder / rels[j]
                (unreadable if not path.is_file() else bad).append(
                    (str(path), "removed while the index was built" if not path.is_file() else why))
            kept = [r for j, r in enumerate(rels) if j not in gone]
            for rel, i in zip(kept, out["ids"].tolist()):
                known[rel] = [*stamps[rel], i]
            added += len(kept)
            since += len(kept)
            if since >= SAVE_EVERY:
                idx.sources[root] = known
                idx.save()
                since = 0
        idx.sources[root] = known
        if added or removed or idx.meta["version"] == 0:
            idx.save()
        description = idx.describe()
    return {"index": idx, "description": description, "added": added, "removed": removed, "unchanged": unchanged, "bad": bad,
            "unreadable": unreadable, "others": others}


def search_index(ext: Extractor, query: str | os.PathLike, index_dir: str | os.PathLike, *, topk: int = 10,
                 threshold: float | None = None, candidates: int | None = None, nprobe: int | None = None,
                 ef: int | None = None, passes: int = gallery_index.DEFAULT_PASSES, weighting: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """The ``topk`` nearest images of the image ``query`` in the index in ``index_dir``.

    The query file itself, when the index holds it, is left out (as in :func:`search`). With
    ``threshold`` only distances below it are answers; none means nobody in the gallery.
    ``candidates``, ``nprobe``, ``ef``, ``passes``: as :meth:`gallery_index.GalleryIndex.search`.
    Returns {"hits": gallery_index.Hits (1 row), "query": str, "query_emb" (1,P,D),
    "query_weights" (1,P), "index": the GalleryIndex (closed), "description": what it holds,
    "self": [names left out]}.
    """
    query = Path(query)
    if not query.is_file():
        raise UserError(f"--query {query}: {'not a file' if query.exists() else 'no such file'}")
    ident = gallery_index.run_identity(ext)
    idx = gallery_index.GalleryIndex.open(index_dir, ident, log=log)
    try:
        if weighting and weighting != idx.meta["weighting"]:
            raise UserError(f"{index_dir}: built to rank with {idx.meta['weighting']} weights, not {weighting}; "
                            "drop --weighting, or build another index with that weighting")
        try:
            qf, qw = ext([query])
        except UserError as exc:
            raise UserError(f"--query {query}: not an image ({exc})") from None
        hits = idx.search(qf, qw, topk + 1, candidates=candidates, nprobe=nprobe, ef=ef, passes=passes,
                          threshold=threshold)
        description = idx.describe()
    finally:
        idx.close()
    me = query.resolve()
    row = [j for j, name in enumerate(hits.names[0]) if not (name and Path(name).resolve() == me)][:topk]
    left = [name for name in hits.names[0] if name and Path(name).resolve() == me]
    hits = gallery_index.Hits(hits.ids[:, row], hits.dists[:, row], [[hits.names[0][j] for j in row]],
                              hits.weights[:, row], threshold)
    return {"hits": hits, "query": str(query), "query_emb": qf, "query_weights": qw, "index": idx,
            "description": description, "self": left}
