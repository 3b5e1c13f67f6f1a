"""Gallery index: recall@10 of the exact weighted ranking, query latency vs exact search, memory, build time.

    .venv/bin/python bench/index_speed.py --sizes 10000 100000 1000000 --json bench/results/index_speed_1m.json
    .venv/bin/python bench/index_speed.py --sizes 10000000 --kinds ivfpq --store float16 \\
        --workdir /mnt/big --json bench/results/index_speed_10m.json
    .venv/bin/python bench/index_speed.py --sizes 100000 --milvus --json bench/results/index_speed_milvus.json
    ... --features model/RUN/features.pt      # a run's real features mixed in (recall reported apart)

A synthetic gallery shaped like the model's features (``--parts`` P=6 stripes of ``--dim``
D=256 post-ReLU, non-negative part embeddings; identity clusters of ``--per_id`` images whose
identity and image variation run along a few directions with a decaying spectrum, as learned
features do (see :class:`Synthetic`); camera shifts; per-image part weights near uniform, with
one or two end stripes weighted down on a quarter of the images, as the visibility head does for
occluded ones). Images are
generated and added ``--chunk`` at a time (10M images do not fit in RAM as raw features): each
chunk is scored exactly against every query (``evaluate.weighted_distance``, the evaluator's
ranking: the ground truth, ties to the lower index) and then added to the index, so memory
stays bounded by the index plus one chunk. With ``--features`` the run's test gallery
(features.pt from test.py) is added first and its queries join the synthetic ones.

Per size and kind (``--kinds auto`` picks as ``gallery_index.choose_kind`` does; ``--milvus``
runs the same ``GalleryIndex`` code on Milvus Lite instead of faiss), for each ``--nprobe``
(ivf, ivfpq) or ``--ef`` (hnsw), with up to ``--passes`` candidate passes:

  recall@10       |index top-10 & exact top-10| / 10, mean over queries (synthetic / real apart)
  batch-1 ms      one query per call, the median; exact: one query against the whole gallery's
                  precomputed index vectors (a matmul per chunk, summed: what an exact in-memory
                  search costs), also the median over ``--exact_single`` queries
  batched ms/q    all queries in one call, per query; exact: ``weighted_distance`` of all
                  queries per chunk (features in, as the evaluator computes it), per query
  ratio           exact / index, for both
  build s         training (IVF, PQ) + adding every chunk (generation and exact scoring apart);
                  save s: committing the index folder
  index MiB       ``GalleryIndex.memory_bytes()`` (vectors or codes, ids, weights); RSS MiB: the
                  process's resident memory growth over the build (includes allocator slack)

For ivfpq with ``--store float16`` two rows per nprobe: candidates re-scored from the float16
store (exact weights, near-exact numerator) and from the PQ score alone (exact weights,
approximate numerator). Prints a markdown table and writes every row to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
import evaluate  # noqa: E402
import gallery_index  # noqa: E402
from utils import UserError, atomic_write_text, cli, progress  # noqa: E402

PID_BLOCK = 1024     # identities whose prototypes are drawn together
CAMS = 6
TRAIN_START = 1 << 40   # the IVF training sample: images of identities no gallery holds
FIT_SAMPLE = 20_000     # images generated to set a fitted generator's zero shares


class Synthetic:
    """Deterministic features shaped like the model's; any chunk can be generated alone.

    Pre-ReLU, an image is ``mu + identity + camera + noise`` over all P*D values: the identity
    and the image noise each vary along a few directions with a decaying (power-law) spectrum,
    as learned features do (the real market1501-sub features of a trained run hold half their
    variance in 8 directions, 90 % in ~85 of 1536; a full-rank noise makes every index look
    worse than it is), plus a little isotropic noise; ReLU zeroes about half the values, as the
    model's do. ``chunk(start, n)`` -> (emb (n,P,D) float32, weights (n,P) float32, pids (n,)
    int64) of gallery images start..start+n-1 (image j shows identity j // per_id);
    ``queries(q, n)`` -> q query images of identities spread over the first n images'.
    """

    # identity / noise: rank, spectrum decay, total scale; camera and isotropic noise scales
    SCALES = {"mu": -0.05, "id_rank": 96, "id_decay": 0.7, "id": 1.0, "noise_rank": 48, "noise_decay": 0.5,
              "noise": 0.45, "cam": 0.15, "iso": 0.08}

    def __init__(self, parts: int, dim: int, per_id: int, seed: int = 0, **scales):
        self.p, self.d, self.per_id, self.seed = parts, dim, per_id, seed
        self.s = {**self.SCALES, **scales}
        rng = np.random.default_rng([seed, 0])
        pd = parts * dim
        self.mu = (self.s["mu"] + 0.2 * rng.standard_normal(pd)).astype(np.float32)
        self.id_basis = self._basis(rng, int(self.s["id_rank"]), self.s["id_decay"], self.s["id"], pd)
        self.noise_basis = self._basis(rng, int(self.s["noise_rank"]), self.s["noise_decay"], self.s["noise"], pd)
        self.cams = (self.s["cam"] * rng.standard_normal((CAMS, pd))).astype(np.float32)
        self.weight_pool = None     # fitted: real images' weights to draw from
        self.shift = None           # fitted: per-value offset before the ReLU
        self.kind = "generic"

    @classmethod
    def fitted(cls, emb, w, pids, per_id: int, seed: int = 0, id_rank: int = 128,
               noise_rank: int = 128) -> "Synthetic":
        """A generator fitted to a run's real gallery: emb (N,P,D), w (N,P), pids (N,).

        The mean, the identity prototypes' principal directions (per-identity means) and the
        within-identity principal directions (residuals), each with its measured spread; the
        variance the kept directions miss becomes the isotropic noise; weights are drawn from
        the real images' weights. Synthetic images then lie where the model's features lie,
        so real images mixed into the gallery are not an island the index has to find its way
        into (how near they come: :func:`likeness`, logged by every run with --features).
        """
        x = torch.as_tensor(emb).float().flatten(1).double()
        pids = torch.as_tensor(pids)
        n, pd = x.shape
        _, inv = torch.unique(pids, return_inverse=True)
        ids = int(inv.max()) + 1
        protos = torch.zeros(ids, pd, dtype=torch.float64).index_add_(0, inv, x)
        protos /= torch.bincount(inv, minlength=ids).unsqueeze(1).double()
        mu = x.mean(0)
        resid = x - protos[inv]

        def basis(m: torch.Tensor, rank: int, count: int) -> tuple[np.ndarray, float]:
            _, sv, vt = torch.linalg.svd(m, full_matrices=False)
            r = min(rank, len(sv))
            kept = (sv[:r] / math.sqrt(max(count - 1, 1))).unsqueeze(1) * vt[:r]
            missed = float((sv[r:] ** 2).sum()) / max(count - 1, 1) / pd
            return kept.float().numpy(), missed

        gen = cls(int(emb.shape[1]), int(emb.shape[2]), per_id, seed)
        gen.mu = mu.float().numpy()
        gen.id_basis, id_missed = basis(protos - mu, id_rank, ids)
        gen.noise_basis, noise_missed = basis(resid, noise_rank, n)
        gen.cams = np.zeros_like(gen.cams)
        gen.s = {**gen.s, "iso": math.sqrt(id_missed + noise_missed)}
        gen.weight_pool = torch.as_tensor(w).float().numpy()
        gen.kind = "fitted"
        # A Gaussian fitted to post-ReLU values is zero far less often than they are: shift
        # each value so that its share of zeros is the real one.
        sample = gen._pre_relu(np.arange(FIT_SAMPLE, dtype=np.int64) // per_id, np.random.default_rng([seed, 4]))
        zeros = (x == 0).double().mean(0).numpy()
        rank = np.clip(np.round(zeros * (FIT_SAMPLE - 1)).astype(np.int64), 0, FIT_SAMPLE - 1)
        gen.shift = np.sort(sample, axis=0)[rank, np.arange(pd)].astype(np.float32)
        return gen

    @staticmethod
    def _basis(rng, rank: int, decay: float, scale: float, pd: int) -> np.ndarray:
        """(rank, pd) random directions scaled by a power-law spectrum, per-value variance scale^2."""
        sigma = np.arange(1, rank + 1, dtype=np.float64) ** -decay
        sigma *= scale * math.sqrt(pd) / math.sqrt((sigma ** 2).sum())
        dirs = rng.standard_normal((rank, pd))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return (dirs * sigma[:, None]).astype(np.float32)

    def _protos(self, pids: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), self.id_basis.shape[1]), np.float32)
        blocks = pids // PID_BLOCK
        for b in np.unique(blocks):
            rng = np.random.default_rng([self.seed, 1, int(b)])
            coef = rng.standard_normal((PID_BLOCK, len(self.id_basis)), dtype=np.float32)
            sel = blocks == b
            out[sel] = coef[pids[sel] % PID_BLOCK] @ self.id_basis
        return out

    def _pre_relu(self, pids: np.ndarray, rng) -> np.ndarray:
        n = len(pids)
        cams = rng.integers(0, CAMS, n)
        x = self._protos(pids)
        x += self.mu + self.cams[cams]
        x += rng.standard_normal((n, len(self.noise_basis)), dtype=np.float32) @ self.noise_basis
        x += self.s["iso"] * rng.standard_normal(x.shape, dtype=np.float32)
        return x

    def _images(self, pids: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        n = len(pids)
        x = self._pre_relu(pids, rng)
        if self.shift is not None:
            x -= self.shift
        emb = np.maximum(x, 0).reshape(n, self.p, self.d)
        if self.weight_pool is not None:
            return emb, self.weight_pool[rng.integers(0, len(self.weight_pool), n)]
        logits = 0.3 * rng.standard_normal((n, self.p), dtype=np.float32)
        occ = rng.random(n) < 0.25
        band = rng.integers(1, 3, n)
        top = rng.random(n) < 0.5
        stripe = np.arange(self.p)[None, :]
        hidden = occ[:, None] & np.where(top[:, None], stripe < band[:, None], stripe >= self.p - band[:, None])
        logits = np.where(hidden, logits - 3.0, logits)
        w = np.exp(logits - logits.max(1, keepdims=True))
        return emb, (w / w.sum(1, keepdims=True)).astype(np.float32)

    def chunk(self, start: int, n: int):
        pids = np.arange(start, start + n, dtype=np.int64) // self.per_id
        emb, w = self._images(pids, np.random.default_rng([self.seed, 2, start]))
        return torch.from_numpy(emb), torch.from_numpy(w), torch.from_numpy(pids)

    def queries(self, q: int, n: int, salt: int = 3):
        n_ids = max(1, n // self.per_id)
        pids = np.linspace(0, n_ids - 1, q).round().astype(np.int64)
        emb, w = self._images(pids, np.random.default_rng([self.seed, salt]))
        return torch.from_numpy(emb), torch.from_numpy(w)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Exact:
    """Running exact top-k of every query over the chunks seen, and the exact search's timings."""

    def __init__(self, qf, qw, k: int, single: int):
        self.qf, self.qw, self.k = qf, qw, k
        self.qx = evaluate.index_vectors(qf, qw)[0]
        self.single = list(range(min(single, len(qf))))
        self.best_d = torch.full((len(qf), 0), math.inf)
        self.best_i = torch.zeros((len(qf), 0), dtype=torch.long)
        self.t_batched = 0.0
        self.t_single = [0.0] * len(self.single)

    def add(self, start: int, emb, w) -> None:
        t0 = time.perf_counter()
        d = evaluate.weighted_distance(self.qf, self.qw, emb, w)     # the evaluator's ranking
        self.t_batched += time.perf_counter() - t0
        gx = evaluate.index_vectors(emb, w)[0]
        for j, i in enumerate(self.single):   # one query vs the chunk's precomputed vectors
            t0 = time.perf_counter()
            s = self.qx[i:i + 1] @ gx.T
            evaluate.distance_from_scores(s, self.qw[i:i + 1], w.unsqueeze(0))
            self.t_single[j] += time.perf_counter() - t0
        # merge; the earlier chunk's items come first, so a stable sort gives ties to the lower index
        d = torch.cat([self.best_d, d], 1)
        idx = torch.cat([self.best_i, torch.arange(start, start + emb.shape[0]).expand(len(d), -1)], 1)
        order = torch.sort(d, dim=1, stable=True).indices[:, :self.k]
        self.best_d, self.best_i = d.gather(1, order), idx.gather(1, order)


def recall(found: np.ndarray, truth: torch.Tensor) -> np.ndarray:
    """(Q,) |found row & truth row| / k."""
    t = truth.numpy()
    return np.array([len(set(a.tolist()) & set(b.tolist())) / t.shape[1] for a, b in zip(found, t)])


def _load_real(path: Path, n_queries: int, partial_only: bool = False):
    """(query emb, weights, gallery emb, weights, gallery pids) of a features.pt: junk dropped,
    ``n_queries`` queries evenly spaced; ``partial_only``: of the queries a ``prepare.py
    --partial`` benchmark cut (its partial.json, beside the features' images), only those."""
    if not path.is_file():
        raise UserError(f"--features {path}: no such file; test.py writes RUN/features.pt")
    feats = torch.load(path, map_location="cpu", weights_only=True)
    try:
        q, g = feats["query"], feats["gallery"]
        keep = g["pids"] != -1
        pool = torch.arange(len(q["emb"]))
        if partial_only:
            truth = datasets.partial_truth(feats["data_root"])
            if truth is None:
                raise UserError(f"--partial_only: {feats['data_root']} (the images of --features {path}) holds no "
                                f"{datasets.PARTIAL_FILE}; run test.py --data_dir on a prepare.py --partial folder")
            pool = torch.tensor([i for i, p in enumerate(q["paths"]) if datasets.partial_view(truth, p)], dtype=torch.long)
            if not len(pool):
                raise UserError(f"--partial_only: no query of --features {path} is a partial view")
        pick = pool[torch.linspace(0, len(pool) - 1, min(n_queries, len(pool))).round().long()]
        return (q["emb"][pick].float(), q["weights"][pick].float(), g["emb"][keep].float(),
                g["weights"][keep].float(), g["pids"][keep])
    except (KeyError, TypeError):
        raise UserError(f"--features {path}: not a features.pt of test.py (query/gallery emb and weights)") from None


def likeness(gen: Synthetic, real, n: int = 100_000) -> dict:
    """How alike the synthetic and the real images are, seen from the real queries: the mean
    cosine (index vectors) of their nearest and 10th-nearest real gallery image and synthetic
    image (among ``n``), and the share of their exact top 10 in a gallery of both that is
    synthetic."""
    qf, qw, gf, gw = real[:4]
    emb, w, _ = gen.chunk(0, n)
    xq = evaluate.index_vectors(qf, qw)[0]
    out = {}
    for name, x in (("real", evaluate.index_vectors(gf, gw)[0]), ("synthetic", evaluate.index_vectors(emb, w)[0])):
        top = (xq @ x.T).topk(min(10, len(x)), dim=1).values
        out[f"top1_cos_{name}"], out[f"top10_cos_{name}"] = float(top[:, 0].mean()), float(top[:, -1].mean())
    d = evaluate.weighted_distance(qf, qw, torch.cat([gf, emb]), torch.cat([gw, w]))
    out["synthetic_share_of_top10"] = float((d.topk(10, dim=1, largest=False).indices >= len(gf)).float().mean())
    return out


def run_one(n: int, kind: str, args, gen: Synthetic, qf, qw, real_q: int, real_g, workdir: Path, log) -> list[dict]:
    backend = "milvus" if args.milvus else "faiss"
    store = args.store if (kind == "ivfpq" and backend == "faiss") else None
    folder = workdir / f"{backend}_{kind}_{n}"
    shutil.rmtree(folder, ignore_errors=True)
    rss0 = _rss()
    idx = gallery_index.GalleryIndex.create(folder, {"source": f"bench/index_speed.py seed {args.seed}"},
                                            parts=gen.p, dim=gen.d, kind=kind, expected=n, backend=backend,
                                            store=store, nprobe=args.nprobe[0], log=log)
    exact = Exact(qf, qw, 10, args.exact_single)
    t_build = 0.0
    if kind in ("ivf", "ivfpq") and backend == "faiss":
        nt = min(n, gallery_index.nlist_for(n) * gallery_index.TRAIN_PER_LIST)
        temb, tw = gen.chunk(TRAIN_START, nt)[:2]       # other identities, the same distribution
        t0 = time.perf_counter()
        idx.train(temb, tw)
        t_build += time.perf_counter() - t0
        del temb, tw
    # Milvus assigns its own ids: the images are named by their position to map them back
    named = (lambda s, m: [str(i) for i in range(s, s + m)]) if backend == "milvus" else (lambda s, m: None)
    offset = 0
    if real_g is not None:
        exact.add(0, *real_g)
        t0 = time.perf_counter()
        idx.add(*real_g, named(0, len(real_g[0])))
        t_build += time.perf_counter() - t0
        offset = real_g[0].shape[0]
    n_syn = n - offset
    bar = progress(range(0, n_syn, args.chunk), desc=f"{backend} {kind} {n:,}", unit="chunk")
    for s in bar:
        emb, w, _ = gen.chunk(s, min(args.chunk, n_syn - s))
        exact.add(offset + s, emb, w)
        t0 = time.perf_counter()
        idx.add(emb, w, named(offset + s, len(emb)))
        t_build += time.perf_counter() - t0
    t0 = time.perf_counter()
    idx.save()
    t_save = time.perf_counter() - t0
    rss = _rss() - rss0
    mem = idx.memory_bytes()
    ex_single = statistics.median(exact.t_single) * 1e3 if exact.t_single else math.nan
    ex_batched = exact.t_batched / len(qf) * 1e3
    rows = []
    kind_now = idx.meta["kind"]
    efforts = ([(p, None) for p in args.nprobe] if kind_now in ("ivf", "ivfpq") else
               [(None, e) for e in args.ef] if kind_now == "hnsw" else [(None, None)])
    rescores = ["store", "index"] if store else ["auto"]
    for (nprobe, ef), rescore in ((e, r) for e in efforts for r in rescores):
        for cand, passes in ((c, n) for c in args.candidates for n in args.passes):
            kw = dict(nprobe=nprobe, ef=ef, rescore=rescore, candidates=cand, passes=passes)
            lat = []
            for i in range(len(qf)):
                t0 = time.perf_counter()
                idx.search(qf[i:i + 1], qw[i:i + 1], 10, **kw)
                lat.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hits = idx.search(qf, qw, 10, **kw)
            t_batch = (time.perf_counter() - t0) / len(qf) * 1e3
            ids = hits.ids
            if backend == "milvus":
                ids = np.array([[int(s) if s else -1 for s in row] for row in hits.names], dtype=np.int64)
            r = recall(ids, exact.best_i)
            syn = r[:len(qf) - real_q]
            row = {"backend": backend, "synthetic": gen.kind, "kind": idx.meta["kind"], "n": n, "nlist": idx.meta["nlist"],
                   "nprobe": nprobe, "ef": ef, "passes": passes, "pq_m": idx.meta["pq_m"] if idx.meta["kind"] == "ivfpq" else None,
                   "rescore": (("float16 store" if rescore == "store" else "PQ score") if store else
                               "exact scan" if kind_now == "flat" and backend == "faiss" else "index score"),
                   "candidates": cand or gallery_index.DEFAULT_CANDIDATES,
                   "recall10": float(syn.mean()) if len(syn) else math.nan,
                   "recall10_real": float(r[len(qf) - real_q:].mean()) if real_q else None,
                   "batch1_ms": statistics.median(lat) * 1e3, "batch1_p90_ms": float(np.percentile(lat, 90)) * 1e3,
                   "exact_batch1_ms": ex_single, "batched_ms_per_query": t_batch, "exact_batched_ms_per_query": ex_batched,
                   "build_s": t_build, "save_s": t_save, "index_mib": mem / 2**20, "rss_mib": rss / 2**20,
                   "store_mib": (os.path.getsize(folder / gallery_index.STORE) / 2**20) if store else None,
                   "queries": len(qf), "real_queries": real_q}
            row["ratio_batch1"] = row["exact_batch1_ms"] / row["batch1_ms"]
            row["ratio_batched"] = row["exact_batched_ms_per_query"] / row["batched_ms_per_query"]
            rows.append(row)
            log(table([row], header=False))
    idx.close()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


COLUMNS = [("backend", "backend", "{}"), ("synthetic", "synthetic", "{}"), ("kind", "kind", "{}"), ("n", "images", "{:,}"), ("nlist", "lists", "{}"),
           ("nprobe", "nprobe", "{}"), ("ef", "ef", "{}"), ("passes", "passes", "{}"), ("candidates", "candidates", "{}"), ("rescore", "re-score", "{}"), ("recall10", "recall@10", "{:.4f}"),
           ("recall10_real", "recall@10 real", "{:.4f}"), ("batch1_ms", "batch-1 ms", "{:.2f}"),
           ("exact_batch1_ms", "exact batch-1 ms", "{:.1f}"), ("ratio_batch1", "ratio", "{:.0f}x"),
           ("batched_ms_per_query", "batched ms/q", "{:.3f}"), ("exact_batched_ms_per_query", "exact batched ms/q",
                                                                "{:.2f}"),
           ("ratio_batched", "ratio", "{:.0f}x"), ("build_s", "build s", "{:.1f}"), ("save_s", "save s", "{:.1f}"),
           ("index_mib", "index MiB", "{:,.0f}"), ("rss_mib", "RSS MiB", "{:,.0f}"), ("store_mib", "store MiB", "{:,.0f}")]


def table(rows: list[dict], header: bool = True) -> str:
    def cell(row, key, fmt):
        v = row.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    lines = []
    if header:
        lines.append("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace, log=print) -> list[dict]:
    """Every size x kind of ``args`` (see build_parser); returns the rows, writes ``args.json``."""
    for flag in ("queries", "chunk", "per_id", "parts", "dim"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if any(n < 1 for n in args.sizes):
        raise UserError(f"--sizes {' '.join(map(str, args.sizes))}: every size must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
        gallery_index._faiss().omp_set_num_threads(args.threads)
    parts, dim = args.parts, args.dim
    real = None
    if args.features:
        real = _load_real(Path(args.features), args.real_queries, args.partial_only)
        parts, dim = int(real[0].shape[1]), int(real[0].shape[2])
        log(f"real features {args.features}: {len(real[0])} queries, {len(real[2])} gallery, P={parts}, D={dim}")
    if args.synthetic == "fitted":
        if real is None:
            raise UserError("--synthetic fitted: needs --features RUN/features.pt (the real features to fit)")
        gen = Synthetic.fitted(real[2], real[3], real[4], args.per_id, args.seed)
    else:
        gen = Synthetic(parts, dim, args.per_id, args.seed)
    log(f"synthetic gallery: {gen.kind} generator")
    alike = None
    if real is not None:
        alike = likeness(gen, real, min(max(args.sizes), 100_000))
        log("real queries' nearest real / synthetic image: cos {top1_cos_real:.3f} / {top1_cos_synthetic:.3f}; "
            "10th nearest {top10_cos_real:.3f} / {top10_cos_synthetic:.3f}; synthetic share of their exact top 10 "
            "(real gallery + up to 100k synthetic): {synthetic_share_of_top10:.3f}".format(**alike))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="index_speed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.sizes:
            real_g = None
            qf, qw = gen.queries(args.queries, n)
            real_q = 0
            if real is not None:
                real_g = (real[2][:n], real[3][:n])
                qf, qw = torch.cat([qf, real[0]]), torch.cat([qw, real[1]])
                real_q = len(real[0])
            kinds = [gallery_index.choose_kind(n, parts * dim) if k == "auto" else k for k in args.kinds]
            for kind in dict.fromkeys(kinds):
                rows += run_one(n, kind, args, gen, qf, qw, real_q, real_g, workdir, log)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        record = {"command": "bench/index_speed.py " + " ".join(getattr(args, "argv", ["(from code)"])), "threads": torch.get_num_threads(),
                  "cpus": os.cpu_count(), "written": time.strftime("%Y-%m-%d %H:%M:%S"), "likeness": alike,
                  "rows": rows}
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
    print(table(rows))
    if args.json:
        print(f"wrote {args.json}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="gallery sizes")
    ap.add_argument("--kinds", nargs="+", default=["auto"], choices=["auto", "flat", "ivf", "hnsw", "ivfpq"])
    ap.add_argument("--milvus", action="store_true", help="the Milvus backend (Milvus Lite in --workdir) instead of faiss")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64], help="inverted lists scanned (ivf, ivfpq)")
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256], help="HNSW efSearch (hnsw)")
    ap.add_argument("--passes", type=int, nargs="+", default=[3], help="candidate passes at most (GalleryIndex.search)")
    ap.add_argument("--candidates", type=int, nargs="+", default=[None],
                    help="candidates of the first pass, re-scored per query (default: the index's)")
    ap.add_argument("--store", default=None, choices=["float16"], help="ivfpq: keep float16 vectors on disk to re-score")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact_single", type=int, default=5, help="queries timed one by one against the exact gallery")
    ap.add_argument("--features", default=None, help="a run's features.pt (test.py): its gallery and queries mixed in")
    ap.add_argument("--real_queries", type=int, default=200, help="queries taken from --features")
    ap.add_argument("--partial_only", action="store_true",
                    help="real queries only from those a prepare.py --partial benchmark cut (--features of test.py "
                         "--data_dir on such a folder): queries whose weights are far from the gallery's")
    ap.add_argument("--synthetic", default="generic", choices=["generic", "fitted"],
                    help="generic: the built-in feature model; fitted: fitted to --features' gallery "
                         "(its mean, identity and within-identity directions, weights)")
    ap.add_argument("--parts", type=int, default=6)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--per_id", type=int, default=20, help="gallery images per identity")
    ap.add_argument("--chunk", type=int, default=100_000, help="images generated, scored and added at a time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0: all)")
    ap.add_argument("--workdir", default=None, help="where the indexes are built (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the index folders")
    ap.add_argument("--json", default="bench/results/index_speed.json", help="where the rows are written ('' : nowhere)")
    return ap


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
