"""A persistent gallery index for the weighted part distance: faiss on one machine, Milvus past it.

The weighted part similarity ``sim = sum_i w_i(q) w_i(g) cos(q_i, g_i) / sum_i w_i(q) w_i(g)``
is a ratio of two inner products. Each image is stored as one vector (:func:`stored_vectors`):
``x = concat_i(w_i u_i) / ||w||`` (``evaluate.index_vectors``, unit part embeddings u_i), a small
tail ``TAIL * w / ||w||`` and zero padding, with its weights and name beside it. The inner
product of two ``x`` is ``sim * cos(w(q), w(g))``; a candidate's score and its weights give the
exact distance back (``evaluate.distance_from_scores``). A search (:meth:`GalleryIndex.search`)
fetches ``candidates`` by score, re-scores them exactly, then asks again with the query vector
``[x, -(tau / TAIL) w / ||w||]``, whose score ``cos(w(q), w(g)) * (sim - tau)`` is positive exactly
for images more similar than tau (the k-th best found so far), whatever their weights; answers
are ranked by the exact distance, ties to the lower id (the image added first, as the evaluator
breaks ties by gallery order). A flat faiss index skips all this: it scans every stored vector
and gives every image's exact distance.

Kinds (``kind="auto"`` picks by size, :func:`choose_kind`: flat, then hnsw, then ivfpq once the
full vectors pass the memory budget; ``ivf`` on request):

* ``flat``: every image's exact distance (the vectors of a faiss ``IndexFlatIP`` behind an id
  map, read in place by one matrix product per block): the evaluator's ranking.
* ``hnsw``: a graph over the full vectors (``HNSW32,Flat``), ``ef`` candidates explored per
  query, scores exact. faiss cannot take an image out of the graph, so a removed image is a
  tombstone (filtered out of every search) until the graph is rebuilt, which an "auto" index
  does when a quarter of it is tombstones.
* ``ivf``: an inverted file of full vectors (``IVF<nlist>,Flat``; an HNSW coarse quantizer
  from 1024 lists): ``nprobe`` lists are scanned per query, scores exact, removal in place.
* ``ivfpq``: product-quantised vectors (``IVF<nlist>,PQ<m>``, m bytes per image): scores are
  approximate. With ``store="float16"`` the full vectors are also kept, in half precision, in an
  append-only file on disk (memory-mapped, only the candidates' rows are read) and the
  candidates are re-scored from them; without, the re-score uses the PQ score and exact weights.

On disk (faiss): ``meta.json`` (format, the run's identity, kind, sizes, the current version),
and per version ``index.V.faiss``, ``rows.V.npz`` (ids, weights, store rows, HNSW tombstones), ``names.V.json``,
``sources.V.json`` (what :func:`search.index_folder` synced), plus ``vectors.f16`` for the
store. A save writes version V+1's files (each through ``utils.atomic_write``), then replaces
meta.json, the commit point, then deletes version V-1: a crash at any moment leaves the last
committed version whole, and a reader opening the index mid-update still finds its version. One
writer at a time (a lock file); readers take no lock. The Milvus backend keeps the images in a
collection (``milvus.db`` inside the folder for Milvus Lite, or a server by URI) and the same
meta.json locally; the run's identity is also a property of the collection.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import evaluate
from utils import LockHeld, LocksUnsupported, UserError, atomic_write, atomic_write_text, lock_file, progress, remove_stale_temp_files

FORMAT = 1
META = "meta.json"
LOCK = ".index.lock"
STORE = "vectors.f16"
KINDS = ("flat", "ivf", "hnsw", "ivfpq")   # ordered: auto grows from left to right
BACKENDS = ("faiss", "milvus")
STORES = (None, "float16")
# auto: exact (flat) below this many images, an inverted file above. bench/index_speed.py
# measures the crossing (docs/search.md): batch-1 flat latency grows linearly with the gallery.
FLAT_MAX = 50_000
# auto: past this many bytes of full vectors (N x P*D x 4) an IVF index is product-quantised.
MEMORY_BUDGET = 8 << 30
DEFAULT_CANDIDATES = 100      # candidates re-scored per query (at least 10 x k)
# Lists scanned per query (ivf, ivfpq); chosen on the 10M run of docs/search.md, where 16
# lists lost a fifth of the exact top 10 for little less latency.
DEFAULT_NPROBE = 64
DEFAULT_EF = 128              # HNSW efSearch (at least the candidates asked for)
DEFAULT_PASSES = 3            # candidate passes at most (1: the index's ranking alone; docs/search.md)
HNSW_M = 32                   # graph neighbours per image
HNSW_EF_CONSTRUCTION = 64
TOMBSTONE_REBUILD = 0.25      # auto: rebuild an HNSW graph when this share of it is removed images
TRAIN_PER_LIST = 40           # faiss wants >= 39 training vectors per inverted list
MAX_TRAIN = 256 * 4096        # vectors handed to k-means at most (faiss subsamples too)
HNSW_QUANTIZER_FROM = 1024    # lists from which the coarse quantizer is an HNSW graph
CONES = 256                   # weight directions that bound cos(w(q), w(g)) for the later passes
CONE_SAMPLE = 8192            # images whose weights place the cones' centres
MILVUS_LITE_DB = "milvus.db"
MILVUS_BATCH = 2000           # rows per insert call (gRPC messages stay well below 64 MB)
MILVUS_MAX_TOPK = 16384
NAME_MAX = 4096               # bytes of a name in Milvus (VARCHAR max_length)
# What must agree for two sets of features to be comparable (the run's path may differ: a
# copied run holds the same checkpoint).
# "precision": an int8 graph's features are not the fp32 network's (fp32 runtimes agree to 1e-5).
IDENTITY_KEYS = ("checkpoint_sha256", "source", "flip", "height", "width", "parts", "embed_dim", "precision")
_VERSIONED = re.compile(r"^(index|rows|names|sources)\.(\d+)\.(faiss|npz|json)$")


# --------------------------------------------------------------------------- identity
def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file's bytes: what names the weights, wherever the run lives."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def run_identity_of(run_dir: str | os.PathLike, which: str, *, epoch: int, flip: bool, height: int, width: int,
                    parts: int, embed_dim: int, precision: str = "fp32") -> dict:
    """The identity of features made by checkpoint ``run_dir/which.pt``: what an index or a
    threshold file records, and what :func:`check_identity` compares."""
    run_dir = Path(run_dir)
    return {"run": run_dir.name, "path": str(run_dir.resolve()), "which": which, "epoch": int(epoch),
            "checkpoint_sha256": checkpoint_sha256(run_dir / f"{which}.pt"), "flip": bool(flip),
            "height": int(height), "width": int(width), "parts": int(parts), "embed_dim": int(embed_dim),
            "precision": precision}


def run_identity(ext) -> dict:
    """:func:`run_identity_of` for an ``inference.Extractor`` made by ``Extractor.from_run``."""
    if getattr(ext, "run_dir", None) is None:
        raise UserError("the extractor does not come from Extractor.from_run, so nothing says which checkpoint "
                        "made its features; load it with Extractor.from_run(RUN_DIR) to use a gallery index")
    return run_identity_of(ext.run_dir, ext.which, epoch=ext.epoch, flip=ext.flip, height=ext.height,
                           width=ext.width, parts=ext.parts, embed_dim=ext.embed_dim,
                           precision=getattr(ext.model, "precision", "fp32"))


def describe_identity(ident: dict) -> str:
    """'run market (last.pt, epoch 60, checkpoint 1a2b3c4d5e6f)' or the synthetic source's name."""
    if "checkpoint_sha256" not in ident:
        return f"source {ident.get('source', '?')!r}"
    return (f"run {ident.get('run', '?')!r} ({ident.get('which', '?')}.pt, epoch {ident.get('epoch', '?')}, "
            f"checkpoint {str(ident['checkpoint_sha256'])[:12]}"
            + ("" if ident.get("flip", True) else ", no flip")
            + (f", {ident['precision']}" if ident.get("precision", "fp32") != "fp32" else "") + ")")


def identity_differs(stored: dict, given: dict) -> list[str]:
    """The :data:`IDENTITY_KEYS` on which two identities disagree."""
    return [k for k in IDENTITY_KEYS if (k in stored or k in given) and stored.get(k) != given.get(k)]


# --------------------------------------------------------------------------- vectors
TAIL = 0.1   # scale of the weight tail of a stored vector (see stored_vectors)


def vector_dim(parts: int, dim: int) -> int:
    """Length of a stored vector: the P*D index vector, the P-value weight tail, zeros up to a
    multiple of 32 (so that PQ finds 8-value sub-vectors: 6 x 256 + 6 -> 1568 = 196 x 8)."""
    return -(-(parts * dim + parts) // 32) * 32


def stored_vectors(emb, w):
    """emb (N,P,D), w (N,P) -> (N, vector_dim(P, D)) float32 ``[x, eps w / ||w||, 0...]`` (x:
    ``evaluate.index_vectors``, eps = TAIL): the tail is small so that it barely moves the
    inverted lists' clustering.

    Against a query vector ``[x(q), -(tau / eps) w(q) / ||w(q)||]`` the inner product is
    ``cos(w(q), w(g)) * (sim(q,g) - tau)``: with tau = 0 the index score, with tau = the k-th
    best similarity found so far it is positive exactly for the images that belong in the
    top k, however differently they weigh their stripes (the second pass of
    :meth:`GalleryIndex.search`).
    """
    numpy = isinstance(emb, np.ndarray)      # a query at search time (see evaluate.index_vectors)
    w = np.asarray(w, dtype=np.float32) if numpy else torch.as_tensor(w).float()
    x, norm = evaluate.index_vectors(emb, w)
    n, p = w.shape
    d = vector_dim(p, x.shape[1] // max(p, 1))
    z = np.zeros((n, d), np.float32) if numpy else torch.zeros(n, d)
    z[:, :x.shape[1]] = x
    z[:, x.shape[1]:x.shape[1] + p] = TAIL * w / norm.clip(min=float(np.finfo(np.float32).tiny))[:, None]
    return z


def query_vectors(stored: np.ndarray, parts: int, dim: int, tau: np.ndarray | None = None) -> np.ndarray:
    """The query vectors ``[x, -(tau / eps) w / ||w||, 0...]`` from the queries' own
    ``stored_vectors`` (Q, vector_dim) numpy (a new array; tau (Q,) or None: 0)."""
    z = stored.copy()
    tail = slice(parts * dim, parts * dim + parts)
    if tau is None:
        z[:, tail] = 0
    else:
        z[:, tail] *= -np.asarray(tau, dtype=np.float32)[:, None] / TAIL ** 2
    return z


def _unit_rows(w: np.ndarray) -> np.ndarray:
    """(N,P) -> (N,P) float32 rows divided by their norm (all-zero rows stay zero)."""
    w = np.asarray(w, dtype=np.float32)
    n = np.sqrt((w * w).sum(1, keepdims=True))
    return np.divide(w, n, out=np.zeros_like(w), where=n > 0)


class WeightCones:
    """A lower bound of ``cos(w(q), w(g))`` over every image g of a gallery, for any query q.

    The images' unit weight vectors are grouped into cones around ``centres`` (k-means on a
    sample); ``cos[c]`` is the cosine of the widest member of cone c (2: empty). Angles obey
    the triangle inequality, so every member g of cone c has
    ``angle(w(q), w(g)) <= angle(w(q), centre_c) + arccos(cos[c])``. Images whose weights are all
    zero are left out (their similarity is 0 to every query). Adding images widens the cones;
    removing them leaves the bound valid (only looser).
    """

    def __init__(self, w: np.ndarray, cones: int = CONES, sample: int = CONE_SAMPLE, seed: int = 0):
        unit = _unit_rows(w)
        unit = unit[(unit != 0).any(1)]
        rng = np.random.default_rng(seed)
        pick = unit[rng.choice(len(unit), min(len(unit), sample), replace=False)] if len(unit) else unit
        centres = pick[rng.choice(len(pick), min(len(pick), cones), replace=False)] if len(pick) else pick
        for _ in range(10 if len(pick) else 0):  # spherical k-means, a few rounds: a bound needs no optimum
            a = (pick @ centres.T).argmax(1)
            sums = np.zeros_like(centres)
            np.add.at(sums, a, pick)
            keep = (sums != 0).any(1)
            centres = np.where(keep[:, None], _unit_rows(sums), centres)
        self.centres = centres
        self.cos = np.full(len(centres), 2.0, np.float32)
        self.add(w)

    def add(self, w: np.ndarray, block: int = 65536) -> None:
        """Widen the cones to hold the images of weights w (N,P)."""
        if not len(self.centres):
            return
        for s in range(0, len(w), block):
            unit = _unit_rows(w[s:s + block])
            unit = unit[(unit != 0).any(1)]
            dots = unit @ self.centres.T
            a = dots.argmax(1)
            np.minimum.at(self.cos, a, dots[np.arange(len(a)), a])

    def lower(self, qw: np.ndarray) -> np.ndarray:
        """qw (Q,P) -> (Q,) float32: cos(w(q), w(g)) is at least this for every image g (1 when
        the gallery has none with a non-zero weight)."""
        used = self.cos <= 1
        if not used.any():
            return np.ones(len(qw), np.float32)
        ang = (np.arccos(np.clip(_unit_rows(qw) @ self.centres[used].T, -1, 1))
               + np.arccos(np.clip(self.cos[used], -1, 1)))
        return np.cos(np.minimum(ang, np.pi)).min(1).astype(np.float32)


def unseen_bound(tau: np.ndarray, low: np.ndarray, cos_lower: np.ndarray) -> np.ndarray:
    """The highest similarity an image a candidate pass did not return can have.

    A pass with query tail tau returns the K images of highest score ``cos(w(q), w(g)) (sim - tau)``
    (:func:`stored_vectors`); ``low`` (Q,) is the K-th of them (+inf where it returned fewer than
    K), ``cos_lower`` (Q,) a lower bound of ``cos(w(q), w(g))`` (:class:`WeightCones`). An image
    not returned scores at most ``low``, so its ``sim <= tau + low / cos`` (``tau + low`` when
    ``low <= 0``, since cos <= 1). Exact for an exact index; a graph or inverted-list index may
    miss images it would score higher, and the bound is then as approximate as the index.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(low <= 0, tau + low, np.where(cos_lower > 0, tau + low / cos_lower, np.inf))
    return np.where(np.isnan(up), np.inf, up)


# --------------------------------------------------------------------------- sizes
def choose_kind(n: int, dim: int, memory_budget: int = MEMORY_BUDGET) -> str:
    """flat below FLAT_MAX images, hnsw while its full vectors fit ``memory_budget`` bytes, ivfpq above."""
    if n < FLAT_MAX:
        return "flat"
    return "hnsw" if n * dim * 4 <= memory_budget else "ivfpq"


def nlist_for(n: int, train: int | None = None) -> int:
    """Inverted lists for ``n`` images: the power of two nearest 2 sqrt(n), in [16, 4096], and at
    most ``train // TRAIN_PER_LIST`` when only ``train`` vectors are there to train on."""
    nl = 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1)))
    nl = min(max(nl, 16), 4096)
    if train is not None:
        while nl > 16 and nl * TRAIN_PER_LIST > train:
            nl //= 2
    return nl


def pq_m_for(dim: int) -> int:
    """PQ sub-quantisers: the largest divisor of ``dim`` at most dim / 8 (8-d sub-vectors, 8 bits each)."""
    for m in range(max(dim // 8, 1), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _memory(kind: str, n: int, dim: int, parts: int, nlist: int, pq_m: int) -> int:
    """Bytes of RAM an index of ``n`` images holds (vectors or codes, ids, weights; names apart)."""
    per = {"flat": 4 * dim, "ivf": 4 * dim, "hnsw": 4 * dim + 2 * HNSW_M * 4 + 16, "ivfpq": pq_m}[kind]
    fixed = 0 if kind in ("flat", "hnsw") else nlist * dim * 4 + (256 * dim * 4 if kind == "ivfpq" else 0)
    return n * (per + 8 + 8 + 4 * parts) + fixed


# --------------------------------------------------------------------------- results
@dataclass
class Hits:
    """A search's answer for Q queries, k columns each, nearest first.

    ids (Q,k) int64 (-1 pads a row when the index holds fewer images); dists (Q,k) float32
    weighted part distances (+inf on pads); names: Q lists of k names ("" on pads); weights
    (Q,k,P) the images' part weights; threshold: the distance below which an image counts as
    the same person (None: no threshold, every image counts).
    """

    ids: np.ndarray
    dists: np.ndarray
    names: list
    weights: np.ndarray
    threshold: float | None = None

    def within(self) -> np.ndarray:
        """(Q,k) bool: a real image, nearer than the threshold (when there is one)."""
        ok = self.ids >= 0
        return ok & (self.dists < self.threshold) if self.threshold is not None else ok

    def matches(self, i: int = 0) -> list[tuple[int, str, float]]:
        """Query ``i``'s answer: [(id, name, distance)] within the threshold; [] means nobody."""
        keep = self.within()[i]
        return [(int(self.ids[i, j]), self.names[i][j], float(self.dists[i, j])) for j in np.flatnonzero(keep)]


# --------------------------------------------------------------------------- the index
class GalleryIndex:
    """A persistent gallery of part features, searched without scanning it all; see the module doc.

    Make one with :meth:`create` or :meth:`open` (``write=True`` to change it). ``add`` returns
    the new images' ids, ``remove`` takes ids or names, ``search`` answers :class:`Hits`;
    changes are written by :meth:`save` (a ``with`` block saves on success and discards on an
    error). ``identity``: what made the features (:func:`run_identity`); opening with another
    run's identity is refused.
    """

    def __init__(self, folder: Path, meta: dict, engine, *, lock=None, created: bool | str = False,
                 sources: dict | None = None, log: Callable[[str], None] = print):
        self.folder, self.meta, self.engine, self.log = folder, meta, engine, log
        self._lock, self._created, self._dirty = lock, created is not False, created is not False
        self._made_folder = created is True
        self.sources = sources if sources is not None else {}

    # ---- construction
    @classmethod
    def create(cls, folder: str | os.PathLike, identity: dict, *, parts: int, dim: int,
               weighting: str = "adaptive", kind: str = "auto", expected: int = 0, backend: str = "faiss",
               uri: str | None = None, collection: str | None = None, nprobe: int = DEFAULT_NPROBE,
               ef: int = DEFAULT_EF,
               pq_m: int | None = None, store: str | None = None, num_shards: int = 1,
               memory_budget: int = MEMORY_BUDGET, log: Callable[[str], None] = print) -> "GalleryIndex":
        """A new, empty index in ``folder`` (missing or empty), for features of P=``parts`` parts
        of D=``dim`` values, weighted ``weighting`` ("adaptive" or "uniform").

        kind: "auto" (by size: ``expected`` images, re-chosen as the index grows), "flat", "ivf"
        or "ivfpq"; backend "faiss" or "milvus" (``uri``: "lite" or None for Milvus Lite in
        ``folder/milvus.db``, else a server such as http://host:19530; ``collection`` its name;
        ``num_shards`` fixed at creation); ``store``: None or "float16" (ivfpq, faiss: the full
        vectors on disk for an exact re-score). Nothing is committed before the first save.
        """
        folder = Path(folder)
        if kind not in ("auto",) + KINDS:
            raise UserError(f"index kind {kind!r}: expected auto, {', '.join(KINDS)}")
        if backend not in BACKENDS:
            raise UserError(f"index backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if weighting not in ("adaptive", "uniform"):
            raise UserError(f"weighting {weighting!r}: expected adaptive or uniform")
        if store not in STORES:
            raise UserError(f"store {store!r}: expected None or 'float16'")
        if store and backend != "faiss":
            raise UserError("store='float16' is for the faiss backend; Milvus keeps the full vectors itself")
        if nprobe < 1 or ef < 1:
            raise UserError(f"nprobe {nprobe}, ef {ef}: must be at least 1")
        if (folder / META).is_file():
            raise UserError(f"{folder} already holds a gallery index; open it to add images, or choose another folder")
        created = _prepare_new_folder(folder, log)
        d = vector_dim(parts, dim)
        meta = {"format": FORMAT, "identity": identity, "parts": int(parts), "embed_dim": int(dim),
                "weighting": weighting, "backend": backend, "policy": kind,
                "kind": None if kind == "auto" else kind, "expected": int(expected), "nlist": None,
                "nprobe": int(nprobe), "ef_search": int(ef), "pq_m": int(pq_m or pq_m_for(d)), "store": store,
                "memory_budget": int(memory_budget), "version": 0, "count": 0, "next_id": 0,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        lock = _lock(folder)
        try:
            if backend == "faiss":
                engine = _FaissEngine(folder, meta, log)
            else:
                if meta["kind"] is None:
                    meta["kind"] = choose_kind(max(expected, 1), d, memory_budget)
                meta["uri"] = MILVUS_LITE_DB if uri in (None, "lite") else uri
                meta["collection"] = collection or _collection_name(folder)
                meta["num_shards"] = int(num_shards)
                if meta["kind"] == "ivfpq" and "://" not in meta["uri"]:
                    raise UserError("Milvus Lite has no IVF_PQ index; use kind flat, ivf or hnsw there, or a Milvus "
                                    "server (--milvus http://host:19530) for ivfpq")
                engine = _MilvusEngine.create(folder, meta, log)
        except BaseException:
            lock.close()
            shutil.rmtree(folder, ignore_errors=True) if created else _remove_ours(folder)
            raise
        return cls(folder, meta, engine, lock=lock, created=created if created else "in place", log=log)

    @classmethod
    def open(cls, folder: str | os.PathLike, identity: dict | None = None, *, write: bool = False,
             log: Callable[[str], None] = print) -> "GalleryIndex":
        """The index in ``folder``; refused when ``identity`` is another run's. ``write``: lock it
        for changes (one writer at a time)."""
        folder = Path(folder)
        lock = _lock(folder) if write and (folder / META).is_file() else None
        if lock is not None:     # temp files of a writer that was killed mid-save
            remove_stale_temp_files(folder, log)
        try:
            for attempt in range(3):
                meta = read_meta(folder)
                if identity is not None:
                    check_identity(folder, meta["identity"], identity)
                try:
                    sources = _read_json(folder / f"sources.{meta['version']}.json", {}) if meta["version"] else {}
                    if meta["backend"] == "faiss":
                        engine = _FaissEngine.load(folder, meta, log, write=write)
                    else:
                        engine = _MilvusEngine.open(folder, meta, log)
                        if identity is not None:
                            check_identity(folder, engine.identity(), identity, where="its Milvus collection")
                    break
                except FileNotFoundError:
                    if attempt == 2:      # a writer replaced the version three times while we read it
                        raise
                    time.sleep(0.05)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        return cls(folder, meta, engine, lock=lock, sources=sources, log=log)

    # ---- context
    def __enter__(self) -> "GalleryIndex":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._dirty and self._lock is not None:
                self.save()
            self.close()
        else:
            self.close(discard=True)

    def close(self, discard: bool = False) -> None:
        """Release the index; with ``discard`` a never-saved new index is removed again."""
        never_saved = self.meta["version"] == 0
        self.engine.close(discard=discard)
        if discard and self._created and never_saved:
            if self.meta["backend"] == "milvus":
                self.engine.drop()
            if self._made_folder:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                _remove_ours(self.folder)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---- properties
    def __len__(self) -> int:
        return self.engine.count()

    @property
    def kind(self) -> str:
        return self.meta["kind"] or "(not yet chosen)"

    @property
    def identity(self) -> dict:
        return self.meta["identity"]

    def memory_bytes(self) -> int:
        """RAM the index holds: vectors or codes, ids, weights (names and the on-disk store apart).
        For Milvus, what its servers hold for this collection (the same formula)."""
        m = self.meta
        return _memory(m["kind"] or "flat", len(self), vector_dim(m["parts"], m["embed_dim"]), m["parts"], m["nlist"] or 0,
                       m["pq_m"])

    def describe(self) -> str:
        m = self.meta
        where = f"Milvus {m['uri']} collection {m['collection']}" if m["backend"] == "milvus" else "faiss"
        lists = f", {m['nlist']} lists, nprobe {m['nprobe']}" if m["kind"] in ("ivf", "ivfpq") and m["nlist"] else ""
        lists += f", ef {m['ef_search']}" if m["kind"] == "hnsw" else ""
        pq = f", PQ{m['pq_m']}" + (" + float16 store" if m["store"] else "") if m["kind"] == "ivfpq" else ""
        return (f"{self.folder}: {len(self):,} images, {self.kind}{lists}{pq} ({where}), weights {m['weighting']}, "
                f"{describe_identity(m['identity'])}")

    def check_identity(self, identity: dict) -> None:
        check_identity(self.folder, self.meta["identity"], identity)

    # ---- changes
    def _writable(self) -> None:
        if self._lock is None:
            raise UserError(f"{self.folder}: opened for reading; open it with write=True to change it")

    def add(self, emb, weights, names=None) -> np.ndarray:
        """Add images: emb (N,P,D), weights (N,P) (what ``Extractor`` returns), names: N strings
        (default ""). Returns their ids (N,) int64. No rebuild: the vectors join the index."""
        self._writable()
        emb, weights = torch.as_tensor(emb), torch.as_tensor(weights)
        p, dim = self.meta["parts"], self.meta["embed_dim"]
        if emb.dim() != 3 or tuple(emb.shape[1:]) != (p, dim) or tuple(weights.shape) != (emb.shape[0], p):
            raise UserError(f"{self.folder}: expected emb (N,{p},{dim}) and weights (N,{p}) (this index's parts and "
                            f"embedding size), got {tuple(emb.shape)} and {tuple(weights.shape)}")
        n = emb.shape[0]
        names = [""] * n if names is None else [str(s) for s in names]
        if len(names) != n:
            raise UserError(f"{self.folder}: {n} images but {len(names)} names")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        weights = weights.float()
        x = stored_vectors(emb, evaluate.weights_for(self.meta["weighting"], weights, weights)[0])
        self._dirty = True
        # the learned weights are stored (shown beside the images); "uniform" replaces them when ranking
        return self.engine.add(np.ascontiguousarray(x.numpy()), np.ascontiguousarray(weights.numpy()), names)

    def train(self, emb, weights) -> None:
        """Train an empty ivf/ivfpq index on a sample (otherwise the first adds train it)."""
        self._writable()
        w = evaluate.weights_for(self.meta["weighting"], torch.as_tensor(weights), torch.as_tensor(weights))[0]
        x = stored_vectors(torch.as_tensor(emb), w)
        self.engine.train(np.ascontiguousarray(x.numpy()))
        self._dirty = True

    def remove(self, ids=None, names=None) -> int:
        """Remove images by id and/or by name (every image of that name); returns how many went.
        No rebuild: the index drops them where they are."""
        self._writable()
        rm = np.asarray([] if ids is None else ids, dtype=np.int64).reshape(-1)
        if names:
            rm = np.concatenate([rm, self.engine.ids_named([str(s) for s in names])])
        if rm.size == 0:
            return 0
        self._dirty = True
        return self.engine.remove(np.unique(rm))

    def save(self) -> None:
        """Commit every change (a new version; see the module doc). An "auto" index that has
        outgrown its kind (or its lists, by 4x) is re-indexed first, from its exact vectors."""
        self._writable()
        self.engine.flush()
        self._grow()
        v = self.meta["version"] + 1
        try:
            files = self.engine.save(v)
            meta = dict(self.meta, **self.engine.meta_update(), version=v, count=len(self),
                        saved=time.strftime("%Y-%m-%d %H:%M:%S"))
            atomic_write_text(self.folder / f"sources.{v}.json", json.dumps(self.sources))
            atomic_write_text(self.folder / META, json.dumps(meta, indent=1))
        except BaseException:
            # version v was never committed: its files go (meta.json still names v - 1)
            try:
                committed = json.loads((self.folder / META).read_text(encoding="utf-8")).get("version") == v
            except (OSError, ValueError):
                committed = False
            if committed:           # interrupted just after the commit: the new version stands
                raise
            for p in self.folder.iterdir():
                m = _VERSIONED.match(p.name)
                if m and int(m[2]) == v:
                    p.unlink(missing_ok=True)
            raise
        self.meta.clear()
        self.meta.update(meta)         # the same dict the engine reads
        self._dirty = self._created = False
        # Versions before the previous one: a reader may still be opening the previous one.
        for p in self.folder.iterdir():
            m = _VERSIONED.match(p.name)
            if m and int(m[2]) < v - 1 and (p.name not in files):
                p.unlink(missing_ok=True)

    def _grow(self) -> None:
        m = self.meta
        if m["policy"] != "auto" or m["backend"] != "faiss":
            return
        n, d = len(self), vector_dim(m["parts"], m["embed_dim"])
        if m["kind"] is None:
            return
        want = choose_kind(n, d, m["memory_budget"])
        more_lists = m["kind"] in ("ivf", "ivfpq") and nlist_for(n) >= 4 * (m["nlist"] or nlist_for(n))
        tombstones = m["kind"] == "hnsw" and self.engine.tombstones() > TOMBSTONE_REBUILD * max(n, 1)
        if KINDS.index(want) > KINDS.index(m["kind"]) or (want == m["kind"] and (more_lists or tombstones)):
            if not self.engine.can_reindex():
                self.log(f"note: {self.folder}: {n:,} images would be better served by a {want} index, but this "
                         f"{m['kind']} index keeps no exact vectors to re-index from; rebuild it from the images")
                return
            self.reindex(want)

    def reindex(self, kind: str) -> None:
        """Rebuild the faiss index as ``kind`` from its own exact vectors (flat, ivf, or ivfpq with
        a float16 store), keeping ids, names and weights. Holds both indexes meanwhile."""
        self._writable()
        if kind not in KINDS:
            raise UserError(f"index kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.log(f"re-indexing {len(self):,} images of {self.folder} as {kind} (was {self.meta['kind']})")
        self.engine.reindex(kind)
        self.meta["kind"] = kind
        self._dirty = True

    # ---- queries
    def search(self, emb, weights, k: int = 10, *, candidates: int | None = None, threshold: float | None = None,
               nprobe: int | None = None, ef: int | None = None, rescore: str = "auto", passes: int = DEFAULT_PASSES) -> Hits:
        """The k nearest images of each query: emb (Q,P,D), weights (Q,P) -> :class:`Hits`.

        Pass 1 fetches ``candidates`` (default max(DEFAULT_CANDIDATES, 10 k)) by index score and
        re-ranks them by the exact weighted distance. Later passes (up to ``passes``, adaptive
        weights) ask again, for 2k candidates, with tau = the k-th best similarity found so far
        (or 1 - threshold, if larger), which favours the images whose similarity passes tau
        whatever their stripes' weights (see :func:`stored_vectors`); a row asks again only
        while its k-th best improves and an image the last pass did not return could still
        beat it (:func:`unseen_bound` with the gallery's :class:`WeightCones`); the candidate
        sets are merged. ``nprobe`` (ivf, ivfpq: lists scanned) and ``ef`` (hnsw: efSearch)
        override the index's; ``threshold``: only distances below it are answers (none:
        nobody). ``rescore``: "auto" (the float16 store where there is one), "store" or
        "index" (the index's score).
        """
        if k < 1:
            raise UserError(f"k={k}: must be at least 1")
        if rescore not in ("auto", "store", "index"):
            raise UserError(f"rescore={rescore!r}: expected auto, store or index")
        if passes < 1:
            raise UserError(f"passes={passes}: must be at least 1")
        emb, weights = torch.as_tensor(emb), torch.as_tensor(weights)
        p, dim = self.meta["parts"], self.meta["embed_dim"]
        if emb.dim() != 3 or tuple(emb.shape[1:]) != (p, dim) or tuple(weights.shape) != (emb.shape[0], p):
            raise UserError(f"{self.folder}: a query must be emb (Q,{p},{dim}) and weights (Q,{p}), got "
                            f"{tuple(emb.shape)} and {tuple(weights.shape)}")
        qw = evaluate.weights_for(self.meta["weighting"], weights, weights)[0].float()
        kp = max(k, candidates if candidates is not None else max(DEFAULT_CANDIDATES, 10 * k))
        use_store = {"auto": None, "store": True, "index": False}[rescore]
        effort = {"nprobe": nprobe or self.meta["nprobe"], "ef": ef or self.meta.get("ef_search", DEFAULT_EF)}
        own = stored_vectors(emb.float().numpy(), qw.numpy())
        z = query_vectors(own, p, dim)
        if self.meta["kind"] == "flat" and self.meta["backend"] == "faiss":
            # exact: one scan of the stored vectors, every image's distance (no candidates)
            ids, d, gw, names = self.engine.exact(torch.from_numpy(z), qw, k, self.meta["weighting"])
            return self._hits(ids.numpy(), d.numpy(), gw.numpy(), names, k, threshold)
        # from here on numpy: a query's candidates are a few small arrays, and torch's per-call
        # cost would be most of the work
        qw = qw.numpy()
        q = len(qw)
        merged, low = self._pass(z, None, qw, kp, effort, use_store)
        exhaustive = self.meta["kind"] == "flat" and kp >= len(self)
        tau_used = np.full(q, -np.inf, np.float32)     # tau of each row's last pass (the first: none)
        later = passes - 1 if self.meta["weighting"] == "adaptive" and not exhaustive and len(self) else 0
        cos_lower = self.engine.weight_cos_lower(qw) if later else None
        for _ in range(later):
            d = merged[1]
            kth = np.sort(d, axis=1)[:, min(k, d.shape[1]) - 1] if d.shape[1] else np.full(q, np.inf)
            tau = (1 - kth).astype(np.float32)
            if threshold is not None:
                tau = np.maximum(tau, np.float32(1 - threshold))
            # again only where an image the last pass did not return could still beat the k-th
            # best (unseen_bound), and where that k-th best improved (else it finds the same)
            with np.errstate(invalid="ignore"):
                could = unseen_bound(np.where(np.isfinite(tau_used), tau_used, 0), low, cos_lower) > tau
                again = np.isfinite(tau) & (tau > tau_used + 1e-7) & could
            rows = np.flatnonzero(again)
            if not rows.size:
                break
            tau_used[rows] = tau[rows]
            # at most k - 1 known images score above 0 here (sim > tau): 2k candidates leave room
            # for k new ones, and where more come the k-th best improves and the next pass asks again
            sub, sub_low = self._pass(query_vectors(own[rows], p, dim, tau[rows]), tau[rows], qw[rows], min(kp, 2 * k),
                                      effort, use_store)
            low[rows] = sub_low
            merged = _merge([merged, _scatter_rows(sub, rows, q)])
        return self._hits(*merged, k, threshold)

    @staticmethod
    def _hits(ids, d, gw, names, k: int, threshold) -> Hits:
        """The k best of each row of candidates (ids (Q,K) int64, d (Q,K), gw (Q,K,P) arrays, names)."""
        # ties: the lower id first (pads, id -1, are at +inf and go last)
        order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), d), axis=1)[:, :k]
        rows = np.arange(order.shape[0])[:, None]
        return Hits(ids[rows, order], d[rows, order].astype(np.float32),
                    [[names[i][j] for j in r] for i, r in enumerate(order.tolist())], gw[rows, order], threshold)

    def _pass(self, z: np.ndarray, tau, qw: np.ndarray, kp: int, effort: dict, use_store):
        """One candidate search of query vectors z (Q,d) (tail tau (Q,) or None), weights qw (Q,P):
        ((ids (Q,K) int64, exact distances (Q,K), weights (Q,K,P), names), low (Q,): the K-th
        index score, +inf where fewer than K came back)."""
        scores, ids, gw, names, xg = self.engine.search(z, kp, effort, use_store)
        q, got = ids.shape
        low = scores[:, -1].copy() if got == kp and got else np.full(q, np.inf, np.float32)
        low[(ids < 0).any(1)] = np.inf
        used = gw if self.meta["weighting"] == "adaptive" else np.ones_like(gw)
        pd = self.meta["parts"] * self.meta["embed_dim"]
        if xg is not None:       # the numerator from the stored full vectors
            scores = np.einsum("qd,qkd->qk", z[:, :pd], xg[..., :pd].astype(np.float32))
        elif tau is not None:    # the index scored [x, -tau w_hat]: add tau cos(w(q), w(g)) back
            # stored tail: TAIL * w_hat(g); query tail: -(tau / TAIL) w_hat(q)
            p = self.meta["parts"]
            gn = np.sqrt((used * used).sum(2)).clip(min=1e-30)
            scores = scores - np.einsum("qkp,qp->qk", used, z[:, pd:pd + p]) * TAIL / gn
        d = evaluate.distance_from_scores(np.ascontiguousarray(scores, dtype=np.float32), qw, used)
        return (ids, np.where(ids >= 0, d, np.inf).astype(np.float32), gw, names), low


def _scatter_rows(found: tuple, rows: np.ndarray, q: int) -> tuple:
    """A pass over some query rows, padded out to all q rows (id -1, distance inf)."""
    ids, d, gw, names = found
    k = ids.shape[1]
    all_ids = np.full((q, k), -1, np.int64)
    all_d = np.full((q, k), np.inf, np.float32)
    all_gw = np.zeros((q, k, gw.shape[2]), np.float32)
    all_names = [[""] * k for _ in range(q)]
    all_ids[rows], all_d[rows], all_gw[rows] = ids, d, gw
    for j, r in enumerate(rows.tolist()):
        all_names[r] = names[j]
    return all_ids, all_d, all_gw, all_names


def _merge(found: list) -> tuple:
    """The candidates of both passes side by side, each image once (its first occurrence)."""
    if len(found) == 1:
        return found[0]
    ids = np.concatenate([f[0] for f in found], 1)
    d = np.concatenate([f[1] for f in found], 1)
    gw = np.concatenate([f[2] for f in found], 1)
    names = [sum((f[3][i] for f in found), []) for i in range(ids.shape[0])]
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, 1)
    dup = np.zeros_like(ids, dtype=bool)
    dup[:, 1:] = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    drop = np.zeros_like(dup)
    np.put_along_axis(drop, order, dup, 1)
    return np.where(drop, -1, ids), np.where(drop, np.inf, d).astype(np.float32), gw, names


# --------------------------------------------------------------------------- folder helpers
def read_meta(folder: Path) -> dict:
    path = folder / META
    if not path.is_file():
        why = "no such folder" if not folder.exists() else f"no {META}"
        raise UserError(f"{folder}: not a gallery index ({why}); build one with demo.py --gallery DIR --index "
                        f"{folder}, or check the path")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); the index cannot be used: rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a gallery index of this version (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT}); rebuild it")
    return meta


def check_identity(folder: Path, stored: dict, given: dict, where: str = "") -> None:
    """UserError when ``given`` (the features about to be added or searched) is another run's."""
    differs = identity_differs(stored, given)
    if differs:
        raise UserError(f"{folder}{' (' + where + ')' if where else ''} holds features of "
                        f"{describe_identity(stored)}; these come from {describe_identity(given)} "
                        f"(differs in {', '.join(differs)}): features of two checkpoints are not comparable. "
                        f"Search it with the run that built it, or build a new index in another folder")


def _prepare_new_folder(folder: Path, log: Callable[[str], None]) -> bool:
    """Make ``folder`` ready for a new index; True when this call created it. Leftovers of a
    build killed before its first save (our own files, no meta.json) are removed, saying so."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{folder}: exists and is not a folder; choose another index folder")
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"{folder}: cannot create it ({exc.strerror}); choose another index folder") from None
        return True
    entries = list(folder.iterdir())
    ours = [p for p in entries if _is_ours(p)]
    if len(ours) != len(entries):
        other = sorted(p.name for p in entries if p not in ours)[:5]
        raise UserError(f"{folder}: not empty and not a gallery index (it holds {', '.join(other)}); choose an "
                        "empty or new folder for the index")
    if [p for p in ours if p.name != LOCK]:
        holder = _lock(folder)       # refuses while a live build holds it
        holder.close()
        _remove_ours(folder)
        log(f"removed the leftovers of an index build in {folder} that was stopped before its first save")
    return False


def _is_ours(p: Path) -> bool:
    """A file a gallery index writes (its names only: nothing else is ever removed)."""
    return (p.name in (LOCK, STORE, MILVUS_LITE_DB, META) or bool(_VERSIONED.match(p.name))
            or (p.name.startswith(".") and p.name.endswith(".tmp")))


def _remove_ours(folder: Path) -> None:
    for p in folder.iterdir() if folder.is_dir() else []:
        if _is_ours(p) and p.name != LOCK:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _lock(folder: Path):
    """An exclusive lock on folder/.index.lock (:func:`utils.lock_file`) held until the returned
    file is closed."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return lock_file(folder / LOCK)
    except LockHeld as held:
        raise UserError(f"{folder}: the index is being changed by process {held.holder}; wait for it to finish "
                        "(searching it needs no wait)") from None
    except LocksUnsupported as exc:
        raise UserError(f"{folder}: cannot lock the index ({exc}); put it on a file system with locks") from None


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def _collection_name(folder: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", folder.resolve().name)[:40] or "gallery"
    return f"awpcn_{base}_{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- faiss
def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("the gallery index needs faiss: pip install -r requirements-search.txt") from None
    return faiss


class _FaissEngine:
    """faiss index + rows (ids ascending, weights, names, store positions) of one folder."""

    def __init__(self, folder: Path, meta: dict, log, *, index=None, ids=None, weights=None, names=None, pos=None,
                 deleted=None, write: bool = True):
        self.folder, self.meta, self.log = folder, meta, log
        self.d, self.p = vector_dim(meta["parts"], meta["embed_dim"]), meta["parts"]
        self.index = index
        self.ids = np.zeros(0, np.int64) if ids is None else ids
        self.weights = np.zeros((0, self.p), np.float32) if weights is None else weights
        self.names = [] if names is None else names
        self.pos = np.zeros(0, np.int64) if pos is None else pos
        self.deleted = np.zeros(0, np.int64) if deleted is None else deleted   # hnsw tombstones, ascending
        self.next_id = int(meta["next_id"])
        self.pending: list[tuple] = []          # (x, ids) waiting for an untrained IVF
        self._by_name = None
        self._store_rows = int(meta.get("store_rows", 0))
        self._mm = None
        self._cones = None                      # WeightCones of the rows, built by the first search needing it
        if write and meta.get("store"):
            # rows appended after the last commit were never committed: drop them
            path = folder / STORE
            if path.exists() and path.stat().st_size != self._store_rows * self.d * 2:
                with open(path, "r+b") as f:
                    f.truncate(self._store_rows * self.d * 2)

    @classmethod
    def load(cls, folder: Path, meta: dict, log, write: bool = False) -> "_FaissEngine":
        faiss = _faiss()
        v = meta["version"]
        if v == 0:
            return cls(folder, meta, log, write=write)
        index = None
        if meta["nlist"] is not None or meta["kind"] in ("flat", "hnsw"):
            with open(folder / f"index.{v}.faiss", "rb") as f:
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        with np.load(folder / f"rows.{v}.npz") as z:
            ids, weights, pos, deleted = z["ids"], z["weights"], z["pos"], z["deleted"]
        names = json.loads((folder / f"names.{v}.json").read_text(encoding="utf-8"))
        return cls(folder, meta, log, index=index, ids=ids, weights=weights, names=names, pos=pos, deleted=deleted,
                   write=write)

    # ---- faiss index construction
    def _new_index(self, kind: str, n_train: int):
        faiss = _faiss()
        if kind == "flat":
            return faiss.IndexIDMap(faiss.IndexFlatIP(self.d)), None
        if kind == "hnsw":
            graph = faiss.IndexHNSWFlat(self.d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            return faiss.IndexIDMap(graph), None
        nlist = nlist_for(max(n_train, self.meta.get("expected") or 0, self.count()), n_train)
        q = f"_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else ""
        code = "Flat" if kind == "ivf" else f"PQ{self.meta['pq_m']}np"     # np: no polysemous training (slow)
        index = faiss.index_factory(self.d, f"IVF{nlist}{q},{code}", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.max_points_per_centroid = 256
        return index, nlist

    def train(self, x: np.ndarray) -> None:
        kind = self.meta["kind"]
        if kind is None:       # auto, not chosen yet: choose from what is known now
            kind = self.meta["kind"] = choose_kind(max(len(x), self.meta["expected"], self.count()), self.d,
                                                   self.meta["memory_budget"])
        if kind in ("flat", "hnsw"):       # nothing to train
            if self.index is None:
                self.index = self._new_index(kind, 0)[0]
            return
        if self.index is not None and self.index.is_trained:
            raise UserError(f"{self.folder}: the index is already trained")
        if len(x) < 16 * TRAIN_PER_LIST:
            raise UserError(f"{self.folder}: a {kind} index needs at least {16 * TRAIN_PER_LIST} images to train its "
                            f"lists, got {len(x)}; add more at once, or use kind flat")
        if len(x) > MAX_TRAIN:
            x = x[np.random.default_rng(0).choice(len(x), MAX_TRAIN, replace=False)]
        index, nlist = self._new_index(kind, len(x))
        t0 = time.perf_counter()
        index.train(x)
        self.log(f"trained {nlist} lists on {len(x):,} images in {time.perf_counter() - t0:.1f} s")
        self.index, self.meta["nlist"] = index, nlist

    def _ready(self) -> bool:
        return self.index is not None and self.index.is_trained

    def flush(self, force: bool = True) -> None:
        """Train on and add what waited for an untrained index (force: whatever there is)."""
        if not self.pending:
            return
        n = sum(len(x) for x, _ in self.pending)
        kind = self.meta["kind"] or choose_kind(max(n, self.meta["expected"]), self.d, self.meta["memory_budget"])
        need = 0 if kind in ("flat", "hnsw") else nlist_for(max(n, self.meta["expected"])) * TRAIN_PER_LIST
        if not force and n < need:
            return
        x = np.concatenate([x for x, _ in self.pending])
        ids = np.concatenate([i for _, i in self.pending])
        self.pending = []
        if not self._ready():
            if kind in ("ivf", "ivfpq") and n < 16 * TRAIN_PER_LIST:
                self.log(f"note: {self.folder}: {n} images are too few to train an inverted file; the index is flat")
                kind = "flat"
            self.meta["kind"] = kind
            self.train(x)
        self.index.add_with_ids(x, ids)

    # ---- rows
    def count(self) -> int:
        return len(self.ids)

    def add(self, x: np.ndarray, w: np.ndarray, names: list) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + len(x), dtype=np.int64)
        self.next_id += len(x)
        if self.meta.get("store"):
            pos = np.arange(self._store_rows, self._store_rows + len(x), dtype=np.int64)
            with open(self.folder / STORE, "ab") as f:
                f.write(x.astype(np.float16).tobytes())
            self._store_rows += len(x)
            self._mm = None
        else:
            pos = np.full(len(x), -1, np.int64)
        self.ids = np.concatenate([self.ids, ids])
        self.weights = np.concatenate([self.weights, w])
        self.pos = np.concatenate([self.pos, pos])
        self.names.extend(names)
        self._by_name = None
        if self._cones is not None:
            self._cones.add(w)
        if self._ready():
            self.index.add_with_ids(x, ids)
        else:
            self.pending.append((x, ids))
            self.flush(force=False)
        return ids

    def ids_named(self, names: list) -> np.ndarray:
        if self._by_name is None:
            by: dict[str, list] = {}
            for i, s in zip(self.ids.tolist(), self.names):
                by.setdefault(s, []).append(i)
            self._by_name = by
        return np.asarray([i for s in names for i in self._by_name.get(s, [])], dtype=np.int64)

    def remove(self, ids: np.ndarray) -> int:
        self.flush()
        keep = ~np.isin(self.ids, ids)
        gone = int((~keep).sum())
        if gone:
            if self.meta["kind"] == "hnsw":    # the graph keeps them; every search filters them out
                self.deleted = np.union1d(self.deleted, self.ids[~keep])
            else:
                self.index.remove_ids(self.ids[~keep])
            self.ids, self.weights, self.pos = self.ids[keep], self.weights[keep], self.pos[keep]
            self.names = [s for s, k in zip(self.names, keep.tolist()) if k]
            self._by_name = None
        return gone

    # ---- queries
    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (ids ascend; a row in range for -1 or a removed id, which the caller checks)."""
        first, n = int(self.ids[0]), len(self.ids)
        if int(self.ids[-1]) - first == n - 1:     # nothing removed: the row is the id's offset
            return np.clip(ids - first, 0, n - 1)
        return np.minimum(np.searchsorted(self.ids, np.where(ids >= 0, ids, 0)), n - 1)

    def weight_cos_lower(self, qw: np.ndarray) -> np.ndarray:
        """(Q,) a lower bound of cos(w(q), w(g)) over the images (WeightCones; removed images
        only loosen it)."""
        if self._cones is None:
            self._cones = WeightCones(self.weights)
        return self._cones.lower(qw)

    def _store(self) -> np.ndarray:
        if self._mm is None or len(self._mm) < self._store_rows:
            self._mm = np.memmap(self.folder / STORE, dtype=np.float16, mode="r", shape=(self._store_rows, self.d))
        return self._mm

    def tombstones(self) -> int:
        return len(self.deleted)

    def exact(self, z: torch.Tensor, qw: torch.Tensor, k: int, weighting: str, block: int = 65536):
        """A flat index's exact top k: (ids (Q,k) tensor, distances (Q,k), weights (Q,k,P), names),
        one matrix product per block of the stored vectors (read in place, not copied)."""
        faiss = _faiss()
        self.flush()
        q, pd = len(z), self.meta["parts"] * self.meta["embed_dim"]
        n = 0 if self.index is None else self.index.ntotal
        best_d = torch.full((q, 0), math.inf)
        best_r = torch.zeros((q, 0), dtype=torch.long)
        if n:
            flat = faiss.downcast_index(self.index.index)
            xb = torch.from_numpy(faiss.rev_swig_ptr(flat.get_xb(), n * self.d).reshape(n, self.d))
            rows = torch.from_numpy(np.searchsorted(self.ids, faiss.vector_to_array(self.index.id_map)))
            w_all = torch.from_numpy(self.weights)
            zq = z[:, :pd]
            for s in range(0, n, block):
                r = rows[s:s + block]
                gw = evaluate.weights_for(weighting, w_all[r], w_all[r])[0]
                d = evaluate.distance_from_score_matrix(zq @ xb[s:s + block, :pd].T, qw, gw)
                d = torch.cat([best_d, d], 1)
                cand = torch.cat([best_r, r.expand(q, -1)], 1)
                # rows ascend with the ids (images in the order added), so a stable sort breaks
                # ties to the lower id, as the evaluator breaks them to the lower gallery index
                order = torch.sort(d, dim=1, stable=True).indices[:, :k]
                best_d, best_r = d.gather(1, order), cand.gather(1, order)
        ids = torch.from_numpy(self.ids)[best_r] if n else torch.zeros((q, 0), dtype=torch.long)
        gw = torch.from_numpy(self.weights)[best_r] if n else torch.zeros((q, 0, self.p))
        names = [[self.names[r] for r in row] for row in best_r.tolist()]
        return ids, best_d, gw, names

    def search(self, xq: np.ndarray, k: int, effort: dict, use_store):
        faiss = _faiss()
        self.flush()
        q = len(xq)
        if self.index is None or self.count() == 0:
            return (np.zeros((q, 0), np.float32), np.full((q, 0), -1, np.int64), np.zeros((q, 0, self.p), np.float32),
                    [[] for _ in range(q)], None)
        k = min(k, self.count())
        params, keep_alive = None, []
        if self.meta["kind"] in ("ivf", "ivfpq"):
            nl, nprobe = self.meta["nlist"], effort["nprobe"]
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, nl))
            if nl >= HNSW_QUANTIZER_FROM:
                params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
        elif self.meta["kind"] == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(effort["ef"], k))
            if len(self.deleted):
                batch = faiss.IDSelectorBatch(self.deleted)
                params.sel = faiss.IDSelectorNot(batch)
                keep_alive = [batch, params.sel]      # the selectors must outlive the search
        scores, ids = self.index.search(xq, k, params=params)
        del keep_alive
        rows = self._rows_of(ids)
        valid = (ids >= 0) & (self.ids[rows] == ids)
        ids = np.where(valid, ids, -1)
        gw = np.where(valid[..., None], self.weights[rows], 0).astype(np.float32)
        names = [[self.names[r] if ok else "" for r, ok in zip(rr, vv)] for rr, vv in zip(rows.tolist(), valid.tolist())]
        xg = None
        if use_store is None:
            use_store = bool(self.meta.get("store")) and self.meta["kind"] == "ivfpq"
        if use_store:
            if not self.meta.get("store"):
                raise UserError(f"{self.folder}: this index keeps no float16 store to re-score from (store=None)")
            pos = self.pos[rows]
            flat = pos.reshape(-1)
            order = np.argsort(flat)              # read the memory map in file order
            got = np.empty((len(flat), self.d), np.float16)
            got[order] = self._store()[flat[order]]
            xg = np.where(valid[..., None], got.reshape(q, k, self.d), 0)
        return scores.astype(np.float32), ids, gw, names, xg

    # ---- persistence
    def meta_update(self) -> dict:
        return {"next_id": self.next_id, "kind": self.meta["kind"], "nlist": self.meta["nlist"],
                "store_rows": self._store_rows}

    def save(self, v: int) -> set:
        faiss = _faiss()
        self.flush()
        if self.index is None and self.meta["kind"] in (None, "flat"):
            self.meta["kind"] = "flat"
            self.index = faiss.IndexIDMap(faiss.IndexFlatIP(self.d))
        if self.meta.get("store"):
            with open(self.folder / STORE, "ab") as f:
                os.fsync(f.fileno())
        files = {f"rows.{v}.npz", f"names.{v}.json"}
        if self.index is not None:       # an empty ivf index not trained yet has none
            atomic_write(self.folder / f"index.{v}.faiss",
                         lambda f: faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write)))
            files.add(f"index.{v}.faiss")
        atomic_write(self.folder / f"rows.{v}.npz",
                     lambda f: np.savez(f, ids=self.ids, weights=self.weights, pos=self.pos, deleted=self.deleted))
        atomic_write(self.folder / f"names.{v}.json", lambda f: f.write(json.dumps(self.names)), binary=False)
        return files

    def close(self, discard: bool = False) -> None:
        self._mm = None

    # ---- re-indexing
    def can_reindex(self) -> bool:
        return self.meta["kind"] in ("flat", "ivf", "hnsw") or bool(self.meta.get("store"))

    def _vectors(self, kind: str, index, block: int = 65536):
        """(x (B,d) float32, ids (B,)) blocks of every image's exact (or float16-stored) vector."""
        faiss = _faiss()
        if kind in ("flat", "hnsw"):
            inner = faiss.downcast_index(index.index)
            flat = inner if kind == "flat" else faiss.downcast_index(inner.storage)
            idmap = faiss.vector_to_array(index.id_map)
            for s in range(0, flat.ntotal, block):
                e = min(s + block, flat.ntotal)
                live = ~np.isin(idmap[s:e], self.deleted)    # tombstones stay behind
                yield flat.reconstruct_n(s, e - s)[live], idmap[s:e][live]
        elif kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            inv = ivf.invlists
            for lst in range(ivf.nlist):
                n = inv.list_size(lst)
                if n:
                    codes = faiss.rev_swig_ptr(inv.get_codes(lst), n * inv.code_size)
                    yield (np.frombuffer(bytes(codes), dtype=np.float32).reshape(n, self.d),
                           faiss.rev_swig_ptr(inv.get_ids(lst), n).copy())
        else:
            store = self._store()
            for s in range(0, self.count(), block):
                yield store[self.pos[s:s + block]].astype(np.float32), self.ids[s:s + block]

    def reindex(self, kind: str) -> None:
        self.flush()
        old_kind, old_index, old_nlist = self.meta["kind"], self.index, self.meta["nlist"]
        n = self.count()
        if old_index is None or n == 0:
            self.index, self.meta["kind"], self.meta["nlist"] = None, kind, None
            return
        pick = np.zeros(n, bool)
        if kind != "flat":
            pick[np.random.default_rng(0).choice(n, min(n, MAX_TRAIN, nlist_for(n) * 64), replace=False)] = True
        sample, seen = [], 0
        for x, _ in self._vectors(old_kind, old_index):
            sample.append(x[pick[seen:seen + len(x)]])
            seen += len(x)
        self.meta["kind"], self.meta["expected"] = kind, max(self.meta.get("expected") or 0, n)
        self.index = None
        try:
            self.train(np.concatenate(sample))
            for x, ids in progress(self._vectors(old_kind, old_index), desc="re-index", unit="block"):
                self.index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
            self.deleted = np.zeros(0, np.int64)
        except BaseException:
            self.index, self.meta["kind"], self.meta["nlist"] = old_index, old_kind, old_nlist
            raise


# --------------------------------------------------------------------------- Milvus
def _milvus():
    try:
        from pymilvus import DataType, MilvusClient
    except ImportError:
        raise UserError("the Milvus backend needs pymilvus (and milvus-lite for a local file): "
                        "pip install -r requirements-search.txt") from None
    return MilvusClient, DataType


class _MilvusEngine:
    """The images as rows of a Milvus collection: id (auto), vec (the index vector), w (weights),
    name. Milvus Lite (a local file) and a Milvus cluster (a URI) go through the same calls."""

    def __init__(self, folder: Path, meta: dict, log, client):
        self.folder, self.meta, self.log, self.client = folder, meta, log, client
        self.col = meta["collection"]
        self.p, self.d = meta["parts"], vector_dim(meta["parts"], meta["embed_dim"])

    @staticmethod
    def _connect(folder: Path, meta: dict):
        client_cls, _ = _milvus()
        uri = meta["uri"]
        local = "://" not in uri
        target = str(folder / uri) if local else uri
        try:
            return client_cls(target)
        except Exception as exc:  # the server cannot start, or cannot be reached
            raise UserError(f"{folder}: cannot reach Milvus at {target} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                            + ("Milvus Lite needs the milvus-lite package and a local disk"
                               if local else "check the URI and that the server runs")) from None

    @classmethod
    def create(cls, folder: Path, meta: dict, log) -> "_MilvusEngine":
        _, DataType = _milvus()
        client = cls._connect(folder, meta)
        col = meta["collection"]
        if client.has_collection(col):
            client.close()
            raise UserError(f"Milvus {meta['uri']}: collection {col} exists already; choose another collection name "
                            "(or drop it in Milvus if it is a leftover)")
        schema = client.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=vector_dim(meta["parts"], meta["embed_dim"]))
        schema.add_field("w", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=meta["parts"])
        schema.add_field("name", DataType.VARCHAR, max_length=NAME_MAX)
        ip = client.prepare_index_params()
        kind = meta["kind"]
        nlist = nlist_for(max(meta["expected"], 1))
        if kind == "flat":
            ip.add_index(field_name="vec", index_type="FLAT", metric_type="IP")
        elif kind == "hnsw":
            ip.add_index(field_name="vec", index_type="HNSW", metric_type="IP",
                         params={"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION})
        elif kind == "ivf":
            ip.add_index(field_name="vec", index_type="IVF_FLAT", metric_type="IP", params={"nlist": nlist})
        else:
            ip.add_index(field_name="vec", index_type="IVF_PQ", metric_type="IP",
                         params={"nlist": nlist, "m": meta["pq_m"], "nbits": 8})
        meta["nlist"] = nlist if kind in ("ivf", "ivfpq") else None
        client.create_collection(col, schema=schema, index_params=ip, num_shards=meta["num_shards"],
                                 properties={"awpcn.identity": json.dumps(meta["identity"], sort_keys=True)})
        return cls(folder, meta, log, client)

    @classmethod
    def open(cls, folder: Path, meta: dict, log) -> "_MilvusEngine":
        client = cls._connect(folder, meta)
        if not client.has_collection(meta["collection"]):
            client.close()
            raise UserError(f"{folder}: Milvus {meta['uri']} has no collection {meta['collection']} (dropped?); "
                            "rebuild the index")
        client.load_collection(meta["collection"])
        return cls(folder, meta, log, client)

    def identity(self) -> dict:
        props = self.client.describe_collection(self.col).get("properties", {})
        return json.loads(props.get("awpcn.identity", "{}"))

    def count(self) -> int:
        rows = self.client.query(self.col, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def train(self, x) -> None:
        pass      # Milvus builds (and trains) its index per segment itself

    def add(self, x: np.ndarray, w: np.ndarray, names: list) -> np.ndarray:
        for s in names:
            if len(s.encode("utf-8")) > NAME_MAX:
                raise UserError(f"name {s[:60]!r}...: longer than {NAME_MAX} bytes (Milvus VARCHAR); use shorter names")
        out = []
        for s in range(0, len(x), MILVUS_BATCH):
            rows = [{"vec": x[i], "w": w[i].tolist(), "name": names[i]} for i in range(s, min(s + MILVUS_BATCH, len(x)))]
            out.extend(self.client.insert(self.col, rows)["ids"])
        return np.asarray(out, dtype=np.int64)

    def ids_named(self, names: list) -> np.ndarray:
        out = []
        for s in range(0, len(names), 1000):
            # JSON string literals are Milvus string literals (double quotes, backslash escapes)
            expr = "name in [" + ", ".join(json.dumps(n, ensure_ascii=False) for n in names[s:s + 1000]) + "]"
            rows = self.client.query(self.col, filter=expr, output_fields=["id"])
            out.extend(r["id"] for r in rows)
        return np.asarray(out, dtype=np.int64)

    def remove(self, ids: np.ndarray) -> int:
        before = self.count()
        for s in range(0, len(ids), 10000):
            self.client.delete(self.col, ids=ids[s:s + 10000].tolist())
        return before - self.count()

    def tombstones(self) -> int:
        return 0

    def search(self, xq: np.ndarray, k: int, effort: dict, use_store):
        if use_store:
            raise UserError(f"{self.folder}: the Milvus backend re-scores from its index scores (rescore='index')")
        q = len(xq)
        k = min(k, MILVUS_MAX_TOPK)
        params = {"metric_type": "IP", "params": {"flat": {}, "hnsw": {"ef": max(effort["ef"], k)}}.get(
            self.meta["kind"], {"nprobe": effort["nprobe"]})}
        res = self.client.search(self.col, data=[v for v in xq], anns_field="vec", limit=k, search_params=params,
                                 output_fields=["w", "name"])
        width = max([len(r) for r in res] + [0])
        scores = np.zeros((q, width), np.float32)
        ids = np.full((q, width), -1, np.int64)
        gw = np.zeros((q, width, self.p), np.float32)
        names = [[""] * width for _ in range(q)]
        for i, hits in enumerate(res):
            for j, h in enumerate(hits):
                scores[i, j], ids[i, j] = h["distance"], h["id"]
                gw[i, j] = h["entity"]["w"]
                names[i][j] = h["entity"]["name"]
        return scores, ids, gw, names, None

    def weight_cos_lower(self, qw: np.ndarray) -> np.ndarray:
        """No bound (the weights live on the server): 0, so every later pass runs."""
        return np.zeros(len(qw), np.float32)

    def meta_update(self) -> dict:
        return {}

    def flush(self, force: bool = True) -> None:
        pass

    def save(self, v: int) -> set:
        self.client.flush(self.col)
        return set()

    def can_reindex(self) -> bool:
        return False

    def close(self, discard: bool = False) -> None:
        if self.client is not None:
            self.client.close()

    def drop(self) -> None:
        client = self._connect(self.folder, self.meta)
        try:
            if client.has_collection(self.col):
                client.drop_collection(self.col)
        finally:
            client.close()


# --------------------------------------------------------------------------- from an Extractor
def add_images(index: GalleryIndex, ext, images, names=None, *, bgr: bool = False, chunk: int = 4096,
               log: Callable[[str], None] = print) -> dict:
    """Embed ``images`` with ``ext`` (an ``inference.Extractor`` from ``Extractor.from_run``) and
    add them to ``index`` (opened for writing): a tracker's crops, a folder's files.

    ``images``: paths (undecodable files are skipped and listed), or anything ``ext(...)`` takes
    (PIL images, HxWx3 uint8 arrays, ``bgr=True`` for OpenCV frames, an (N,3,H,W) tensor);
    ``names``: one string per image (default: the path, or ""). Extracted ``chunk`` images at a
    time, so memory stays bounded. The extractor must be the index's run (refused otherwise).
    Returns {"ids": (M,) int64 of the images added, "bad": [(input position, reason)]}. Call
    ``index.save()`` (or use a ``with`` block) to commit.
    """
    index.check_identity(run_identity(ext))
    if index.meta["parts"] != ext.parts or index.meta["embed_dim"] != ext.embed_dim:
        raise UserError(f"{index.folder}: holds P={index.meta['parts']}, D={index.meta['embed_dim']} features; the "
                        f"extractor gives P={ext.parts}, D={ext.embed_dim}")
    if isinstance(images, (str, os.PathLike)) or not hasattr(images, "__len__"):
        images = [images]
    n = len(images)
    paths = n > 0 and all(isinstance(im, (str, os.PathLike)) for im in images)
    if names is None:
        names = [str(im) for im in images] if paths else [""] * n
    if len(names) != n:
        raise UserError(f"add_images: {n} images but {len(names)} names")
    ids, bad = [], []
    for s in range(0, n, chunk):
        part = images[s:s + chunk]
        if paths:
            emb, w, skipped = ext.extract_files(part, desc="index")
            gone = {j for j, _ in skipped}
            bad += [(s + j, why) for j, why in skipped]
            keep = [names[s + j] for j in range(len(part)) if j not in gone]
        else:
            emb, w = ext(part, bgr=bgr, desc="index")
            keep = list(names[s:s + chunk])
        ids.append(index.add(emb, w, keep))
    return {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int64), "bad": bad}
