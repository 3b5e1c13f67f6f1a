"""Retrieval math for AWPCN: weighted part distance, CMC / mAP / mINP, k-reciprocal re-ranking,
the index vectors a gallery index stores, and open-set figures (TMR at a false-match rate, the
calibrated threshold).

Pure tensor code: no file I/O, no printing. Shapes: Q queries, G gallery items, P parts,
D embedding size.

Protocol (Market-1501): gallery items with pid -1 are junk and ignored; pid 0
(distractors) stay as negatives; gallery items sharing the query's pid *and* camera are
ignored for that query; a query without any valid positive is skipped and counted.
Ordering: ascending distance, ties broken by lower gallery index (a stable sort); NaN
distances count as +inf.

Speed: CMC, AP and INP only need the ranks of a query's positives, so rows are never
fully sorted. Per query the same-pid gallery items are looked up (sparse), the largest
positive distance ``t`` is found, and only the items with distance <= t (the "prefix":
everything that can precede a positive) are gathered and sorted; rank of a positive =
its position among the valid items of that prefix. Queries whose prefix is a large part
of the gallery (a positive ranked very deep) use a dense count instead: a binary search
of every item among the sorted positives and a histogram. Both are exact, ties included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from utils import UserError

AP_FORMULAS = {
    "official": "official, Market-1501 trapezoid",
    "standard": "standard, mean precision at hits",
}
DEFAULT_AP = "official"
# k-reciprocal re-ranking's settings (Zhong et al. 2017's): the defaults below and what every
# tool says it re-ranked with.
RERANK_K1, RERANK_K2, RERANK_LAMBDA = 20, 6, 0.3
RERANK_SETTINGS = f"k1={RERANK_K1}, k2={RERANK_K2}, lambda={RERANK_LAMBDA}"
# Elements of a (query chunk, G) block: bounds the evaluation's memory (x4 bytes per buffer).
CHUNK_ELEMENTS = 1 << 25
# A query whose prefix holds more than this fraction of the gallery is counted densely.
DENSE_FRACTION = 0.25
DENSE_MIN = 64
# Re-ranking holds about RERANK_BYTES_PER_PAIR * (Q+G)^2 bytes (dense float32/bool matrices).
RERANK_MAX_ITEMS = 20_000
RERANK_BYTES_PER_PAIR = 12
_TINY = float(np.finfo(np.float32).tiny)


class RerankTooLarge(UserError, ValueError):
    """Re-ranking asked for more items than RERANK_MAX_ITEMS (a user-fixable choice)."""


# --------------------------------------------------------------------------- distance
def _scaled(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """f (N,P,D), w (N,P) -> (N, P*D) float32: each part L2-normalised and scaled by its weight."""
    return (F.normalize(f.float(), dim=-1) * w.float().unsqueeze(-1)).flatten(1)


def _scaled_rows(f, w, index: torch.Tensor | None = None, block: int = 16384) -> torch.Tensor:
    """Like :func:`_scaled` for the rows ``index`` of f (all when None), built block by block
    into one (N, P*D) float32 tensor: no full-size temporaries beside the result."""
    n = f.shape[0] if index is None else index.numel()
    out = torch.empty(n, f.shape[1] * f.shape[2])
    for s in range(0, n, block):
        rows = slice(s, s + block) if index is None else index[s:s + block]
        out[s:s + block] = _scaled(f[rows], w[rows])
    return out


def _distance_block(qs, qw, gs, gw, out: torch.Tensor | None = None) -> torch.Tensor:
    """qs (B,P*D), qw (B,P), gs (G,P*D), gw (G,P) float32 -> (B,G) float32 ``1 - num / den``.

    num = sum_i w_i(q) w_i(g) cos(q_i, g_i) (one matmul); den = sum_j w_j(q) w_j(g), zero
    denominators (all weights zero) clamped so the distance is 1. ``out`` (B,G) is reused.
    """
    num = torch.mm(qs, gs.T, out=out) if out is not None else qs @ gs.T
    den = (qw.float() @ gw.float().T).clamp_min_(torch.finfo(torch.float32).tiny)
    return num.div_(den).neg_().add_(1.0)


def weights_for(weighting: str, qw: torch.Tensor, gw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The part weights to rank with: the learned qw (Q,P), gw (G,P) for "adaptive", equal
    weights 1/P of the same shapes for "uniform" (the PCB ablation of an AWPCN run)."""
    if weighting == "uniform":
        return torch.full_like(qw, 1 / qw.shape[1]), torch.full_like(gw, 1 / gw.shape[1])
    return qw, gw


def weighted_distance(qf, qw, gf, gw, *, chunk: int | None = None) -> torch.Tensor:
    """D(q,g) = sum_i alpha_i(q,g) (1 - cos(q_i, g_i)), alpha_i = w_i(q) w_i(g) / sum_j w_j(q) w_j(g).

    qf (Q,P,D), qw (Q,P) >= 0, gf (G,P,D), gw (G,P) >= 0 -> dist (Q,G) float32 in [0, 2].
    One matmul of the weight-scaled concatenated normalised features plus the (Q,P)@(P,G)
    normaliser; ``chunk`` queries at a time (default: all) to bound the temporaries.
    Weights are scale-free (w and 3w give the same distance). With uniform weights
    D = 1 - mean_i cos = ||x - y||^2 / (2P) for PCB's concatenated per-part-normalised
    features x, y: the same ranking as their Euclidean distance.
    """
    qw, gw = torch.as_tensor(qw).float(), torch.as_tensor(gw).float()
    gs = _scaled_rows(torch.as_tensor(gf), gw)
    qf = torch.as_tensor(qf)
    if not chunk or chunk >= qf.shape[0]:
        return _distance_block(_scaled(qf, qw), qw, gs, gw)
    out = torch.empty(qf.shape[0], gs.shape[0])
    for s in range(0, qf.shape[0], chunk):
        e = s + chunk
        out[s:e] = _distance_block(_scaled(qf[s:e], qw[s:e]), qw[s:e], gs, gw)
    return out


def ranked_lists(dist, q_pids, q_cams, g_pids, g_cams, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's top-``k`` gallery items under the protocol, in the evaluator's order.

    dist (B,G) float (NaN ranks as +inf); q_pids/q_cams (B,), g_pids/g_cams (G,) integer ->
    (index (B,k') int64, distance (B,k') float), k' = min(k, G). Junk (pid -1) and the query's
    same-pid-same-camera items are left out; ties go to the lower gallery index. A row with
    fewer than k' valid items is padded with index -1 and distance +inf.
    """
    qp, qc, gp, gc = map(_as_long, (q_pids, q_cams, g_pids, g_cams))
    d = torch.as_tensor(dist).nan_to_num(nan=math.inf)
    drop = (gp == -1).unsqueeze(0) | ((gp.unsqueeze(0) == qp.unsqueeze(1)) & (gc.unsqueeze(0) == qc.unsqueeze(1)))
    order = torch.sort(d, dim=1, stable=True).indices
    # A second stable sort on the drop flag: valid items first, still in distance order (an
    # infinite distance alone could not tell a valid +inf item from a dropped one).
    order = order.gather(1, torch.sort(drop.gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    order = order[:, :min(k, d.shape[1])]
    pad = drop.gather(1, order)
    return order.masked_fill(pad, -1), d.gather(1, order).masked_fill(pad, math.inf)


# --------------------------------------------------------------------------- metrics
@dataclass
class Result:
    """Metrics over the valid queries, fractions in [0, 1].

    rank1/rank5/rank10/mAP/mINP: float; cmc: (max_rank,) float64 tensor (cmc[k-1] = Rank-k);
    num_valid_queries / num_skipped_queries: int; ap_formula: "official" or "standard";
    per_query: each query's AP, INP and first-hit rank (:class:`PerQuery`), which the
    numbers above summarise. Also readable like a dict (``res["mAP"]``, ``res.get(...)``).
    """

    rank1: float
    rank5: float
    rank10: float
    mAP: float
    mINP: float
    cmc: torch.Tensor
    num_valid_queries: int
    num_skipped_queries: int
    ap_formula: str
    extra: dict = field(default_factory=dict)
    per_query: "PerQuery | None" = None

    def __getitem__(self, key):
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key, default)

    def as_dict(self) -> dict:
        """Plain types only (cmc as a list): ready for yaml/json."""
        return {"rank1": self.rank1, "rank5": self.rank5, "rank10": self.rank10, "mAP": self.mAP,
                "mINP": self.mINP, "cmc": self.cmc.tolist(), "num_valid_queries": self.num_valid_queries,
                "num_skipped_queries": self.num_skipped_queries, "ap_formula": self.ap_formula}

    def format(self) -> str:
        return format_result(self)


def format_result(res: Result) -> str:
    """One line: Rank-1/5/10, mAP (with the AP formula named), mINP, number of queries."""
    skipped = f", {res.num_skipped_queries} skipped" if res.num_skipped_queries else ""
    return (f"Rank-1 {100 * res.rank1:.2f}% | Rank-5 {100 * res.rank5:.2f}% | Rank-10 {100 * res.rank10:.2f}% | "
            f"mAP {100 * res.mAP:.2f}% (AP: {AP_FORMULAS[res.ap_formula]}) | mINP {100 * res.mINP:.2f}% "
            f"| {res.num_valid_queries} queries{skipped}")


@dataclass
class PerQuery:
    """One evaluation, query by query; Q = every query evaluated, skipped ones included.

    ap, inp: (Q,) float64 in [0, 1], NaN for a skipped query (no valid gallery match);
    first: (Q,) int64, the 0-based rank of the query's first true match among its valid
    gallery items (junk and same-id-same-camera items left out, as everywhere here), -1 for
    a skipped query; ap_formula: "official" or "standard". :meth:`result` summarises any
    subset of the queries exactly as evaluating only that subset would.
    """

    ap: torch.Tensor
    inp: torch.Tensor
    first: torch.Tensor
    ap_formula: str

    def result(self, keep: torch.Tensor | None = None, max_rank: int = 50) -> Result:
        """Metrics over the queries where ``keep`` (Q,) bool is True (default: all)."""
        keep = torch.ones_like(self.first, dtype=torch.bool) if keep is None else torch.as_tensor(keep).bool()
        valid = keep & (self.first >= 0)
        v = int(valid.sum())
        width = max(max_rank, 10)
        first = torch.bincount(self.first[valid].clamp_max(width), minlength=width + 1).double()
        cmc = torch.cumsum(first[:width], 0) / max(v, 1)
        # fsum of the per-query values: the order of the queries cannot change the rounding.
        mean = lambda x: math.fsum(x[valid].tolist()) / max(v, 1)  # noqa: E731
        return Result(float(cmc[0]), float(cmc[4]), float(cmc[9]), mean(self.ap), mean(self.inp),
                      cmc[:max_rank].clone(), v, int((keep & ~valid).sum()), self.ap_formula,
                      per_query=self if bool(keep.all()) else None)


class _Accumulator:
    """Collects per-query AP / INP / first-hit ranks over chunks."""

    def __init__(self, max_rank: int, ap: str):
        if ap not in AP_FORMULAS:
            raise ValueError(f"ap={ap!r}: expected one of {', '.join(AP_FORMULAS)}")
        if max_rank < 1:
            raise ValueError(f"max_rank={max_rank}: expected >= 1")
        self.max_rank, self.ap = max_rank, ap
        self.aps: list[torch.Tensor] = []
        self.inps: list[torch.Tensor] = []
        self.firsts: list[torch.Tensor] = []

    def add(self, hit: torch.Tensor, rank: torch.Tensor, live: torch.Tensor, npos: torch.Tensor) -> None:
        """Hits of B queries, in any order along L, padded where ``live`` is False.

        hit (B,L): 0-based index of the hit among the query's hits; rank (B,L): its 0-based
        position among the valid gallery items; live (B,L) bool; npos (B,) int: hits per query.
        """
        b = npos.shape[0]
        ap = torch.full((b,), math.nan, dtype=torch.float64)
        inp = torch.full((b,), math.nan, dtype=torch.float64)
        first = torch.full((b,), -1, dtype=torch.long)
        has = npos > 0
        if bool(has.any()):
            hit, rank, live, n = hit[has].double(), rank[has].double(), live[has], npos[has].double()
            prec = (hit + 1) / (rank + 1)
            if self.ap == "standard":
                per_hit = prec
            else:
                old = torch.where(rank > 0, hit / rank.clamp_min(1), torch.ones_like(rank))
                per_hit = (old + prec) / 2
            ap[has] = torch.where(live, per_hit, 0.0).sum(1) / n
            inp[has] = n / (torch.where(live, rank, -1.0).amax(1) + 1)
            first[has] = torch.where(live, rank, math.inf).amin(1).long()
        self.aps.append(ap)
        self.inps.append(inp)
        self.firsts.append(first)

    def per_query(self) -> PerQuery:
        cat = lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
        return PerQuery(cat(self.aps, torch.float64), cat(self.inps, torch.float64),
                        cat(self.firsts, torch.long), self.ap)

    def result(self) -> Result:
        return self.per_query().result(max_rank=self.max_rank)


class _Gallery:
    """Gallery labels, indexed once for the per-query same-pid look-up.

    pids/cams (G,) int64; junk (G,) bool (pid -1); keep_idx (Gk,) the non-junk indices;
    remap (G+1,) position of each item among the non-junk ones (-1 for junk, Gk for the
    padding index G); by_pid: non-junk indices sorted by pid (stable, so ascending within a pid).
    """

    def __init__(self, g_pids: torch.Tensor, g_cams: torch.Tensor):
        self.size = int(g_pids.numel())
        self.pids, self.cams = g_pids, g_cams
        self.junk = g_pids == -1
        self.has_junk = bool(self.junk.any())
        self.keep_idx = (~self.junk).nonzero(as_tuple=True)[0]
        self.remap = torch.full((self.size + 1,), -1, dtype=torch.long)
        self.remap[self.keep_idx] = torch.arange(self.keep_idx.numel())
        self.remap[self.size] = self.keep_idx.numel()
        self.sorted_pids, order = torch.sort(g_pids[self.keep_idx], stable=True)
        self.by_pid = self.keep_idx[order]
        # Sentinel at index G (padding): a pid and camera no query has, and junk.
        self.pids_ext = torch.cat([g_pids, torch.tensor([-1])])
        self.cams_ext = torch.cat([g_cams, torch.tensor([-2])])

    def without_junk(self) -> "_Gallery":
        return self if not self.has_junk else _Gallery(self.pids[self.keep_idx], self.cams[self.keep_idx])

    def same_pid(self, q_pids: torch.Tensor, q_cams: torch.Tensor):
        """(B,) queries -> cols (B,M) non-junk gallery indices with the query's pid, ascending,
        padded with G; pos (B,M) bool valid positives (other camera); ign (B,M) bool ignored
        (same camera)."""
        lo = torch.searchsorted(self.sorted_pids, q_pids, right=False)
        n = torch.searchsorted(self.sorted_pids, q_pids, right=True) - lo
        m = int(n.max()) if n.numel() else 0
        k = torch.arange(max(m, 1))
        live = k < n.unsqueeze(1)
        if self.by_pid.numel():
            cols = torch.where(live, self.by_pid[(lo.unsqueeze(1) + k).clamp_max(self.by_pid.numel() - 1)], self.size)
        else:
            cols = torch.full(live.shape, self.size, dtype=torch.long)
        ign = live & (self.cams_ext[cols] == q_cams.unsqueeze(1))
        return cols, live & ~ign, ign


def _chunk_hits(d: torch.Tensor, q_pids, q_cams, gal: _Gallery):
    """d (B,G) float32 or float64 distances (NaN allowed: ranked as +inf; not modified) -> (hit, rank,
    live, npos) for :meth:`_Accumulator.add`."""
    b, g = d.shape
    cols, pos, ign = gal.same_pid(q_pids, q_cams)
    npos = pos.sum(1)
    empty = torch.zeros(b, 1, dtype=torch.long)
    if g == 0 or not bool((npos > 0).any()):
        return empty, empty, empty.bool(), npos
    pd = d.gather(1, cols.clamp_max(g - 1)).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    # t: each query's largest positive distance: all that can precede a positive has d <= t.
    t = torch.where(pos, pd, -math.inf).amax(1)
    finite = (npos > 0) & (t < math.inf)
    outs = []
    dense = (npos > 0) & ~finite
    if bool(finite.any()):
        # The prefix d <= t (NaN compares False: NaN ranks after every finite t).
        r, c = (d <= torch.where(finite, t, -math.inf).unsqueeze(1)).nonzero(as_tuple=True)
        size = torch.bincount(r, minlength=b)
        long_rows = size > max(DENSE_FRACTION * g, DENSE_MIN)
        if bool(long_rows.any()):
            dense |= long_rows
            keep = ~long_rows[r]
            r, c = r[keep], c[keep]
            size = torch.where(long_rows, 0, size)
        if r.numel():
            outs.append(_prefix_hits(d, r, c, size, q_pids, q_cams, npos, gal))
    if bool(dense.any()):
        rows = dense.nonzero(as_tuple=True)[0]
        outs.append((rows, *_dense_hits(d[rows], cols[rows], pos[rows], ign[rows], gal)))
    width = max(o[1].shape[1] for o in outs)
    hit = torch.zeros(b, width, dtype=torch.long)
    rank = torch.zeros(b, width, dtype=torch.long)
    live = torch.zeros(b, width, dtype=torch.bool)
    for rows, h, rk, lv in outs:
        w = h.shape[1]
        hit[rows, :w], rank[rows, :w], live[rows, :w] = h, rk, lv
    return hit, rank, live, npos


def _prefix_hits(d, r, c, size, q_pids, q_cams, npos, gal):
    """Queries whose prefix (d <= t) is short: the prefix items (r, c) (row-major, c
    ascending) are packed into rows, sorted stably by distance (ties keep index order),
    and each positive's rank is its position among the valid items before it. Rows are
    packed in classes of similar prefix length (powers of two) to keep padding small.
    Returns (rows, hit, rank, live) with one column per hit (width = max hits)."""
    b = d.shape[0]
    rows_all = (size > 0).nonzero(as_tuple=True)[0]
    width_out = int(npos[rows_all].max())
    hit_out = torch.arange(width_out).expand(rows_all.numel(), width_out)
    rank_out = torch.zeros(rows_all.numel(), width_out, dtype=torch.long)
    live_out = hit_out < npos[rows_all].unsqueeze(1)
    # Entries grouped by row (already row-major); classes by ceil(log2(size)).
    start_all = torch.cumsum(size, 0) - size
    cls = torch.ceil(torch.log2(size[rows_all].double())).long()
    local = torch.full((b,), -1, dtype=torch.long)
    local[rows_all] = torch.arange(rows_all.numel())
    row_cls = torch.full((b,), -1, dtype=torch.long)
    row_cls[rows_all] = cls
    entry_cls = row_cls[r]
    for k in torch.unique(cls).tolist():
        in_k = cls == k
        rows = rows_all[in_k]
        sel = (entry_cls == k).nonzero(as_tuple=True)[0]
        rr, cc = r[sel], c[sel]
        sz = size[rows]
        pos_in_k = torch.full((b,), -1, dtype=torch.long)
        pos_in_k[rows] = torch.arange(rows.numel())
        lr = pos_in_k[rr]
        slot = sel - start_all[rr]                              # position within its row
        width = int(sz.max())
        vals = torch.full((rows.numel(), width), math.inf, dtype=d.dtype)
        idx = torch.full((rows.numel(), width), gal.size, dtype=torch.long)
        vals[lr, slot] = d[rr, cc]
        idx[lr, slot] = cc
        order = torch.sort(vals, dim=1, stable=True).indices    # pads (inf, G) stay last
        idx = idx.gather(1, order)
        p = gal.pids_ext[idx]
        same = p == q_pids[rows].unsqueeze(1)
        ign = same & (gal.cams_ext[idx] == q_cams[rows].unsqueeze(1))
        valid = (p != -1) & ~ign                                # pads carry pid -1 too
        pos = same & valid
        rank = torch.cumsum(valid, 1) - 1
        hit = torch.cumsum(pos, 1) - 1
        pr, pc = pos.nonzero(as_tuple=True)
        rank_out[local[rows[pr]], hit[pr, pc]] = rank[pr, pc]
    return rows_all, hit_out, rank_out, live_out


def _dense_hits(d, cols, pos, ign, gal):
    """Queries with a deep (or infinitely far) positive: junk columns dropped, NaN -> +inf,
    then every item is placed among the query's same-pid items L (sorted by distance, then
    index) by binary search; a histogram of the placements gives how many items precede
    each member of L."""
    if gal.has_junk:
        d = d.index_select(1, gal.keep_idx)
        cols = gal.remap[cols]
    d = torch.nan_to_num(d, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    b, g = d.shape
    m = cols.shape[1]
    member = pos | ign
    ld = torch.where(member, d.gather(1, cols.clamp_max(g - 1)), math.inf)
    li = torch.where(member, cols, g)
    ld, order = torch.sort(ld, dim=1, stable=True)           # cols ascending -> (distance, index) order
    li, lpos, lign = li.gather(1, order), pos.gather(1, order), ign.gather(1, order)
    ld_nan = torch.cat([ld, torch.full((b, 1), math.nan, dtype=d.dtype)], 1)   # NaN: equal to nothing
    bucket = torch.searchsorted(ld, d)                        # members with a smaller distance
    tied = ld_nan.gather(1, bucket) == d                      # equal to a member's distance: index decides
    tr, tc = tied.nonzero(as_tuple=True)
    step = max(1, CHUNK_ELEMENTS // (4 * (m + 1)))
    for a in range(0, tr.numel(), step):
        rr, cc = tr[a:a + step], tc[a:a + step]
        dv = d[rr, cc].unsqueeze(1)
        bucket[rr, cc] = ((ld[rr] < dv) | ((ld[rr] == dv) & (li[rr] < cc.unsqueeze(1)))).sum(1)
    counts = torch.zeros(b, m + 1, dtype=torch.long).scatter_add_(
        1, bucket, torch.ones(1, 1, dtype=torch.long).expand(b, g))
    # Items at or before member k: counts[0..k]; minus the ignored members before it.
    upto = torch.cumsum(counts, 1)[:, :m]
    rank = upto - 1 - (torch.cumsum(lign, 1) - lign.long())
    hit = torch.cumsum(lpos, 1) - 1
    return hit, rank, lpos


def _as_long(x) -> torch.Tensor:
    return torch.as_tensor(x).long().reshape(-1)


def _rows_per_chunk(g: int, chunk: int | None) -> int:
    limit = max(1, CHUNK_ELEMENTS // max(g, 1))
    return max(1, min(chunk, limit) if chunk else limit)


def evaluate(dist, q_pids, g_pids, q_cams, g_cams, *, ap: str = DEFAULT_AP, max_rank: int = 50,
             chunk: int | None = None) -> Result:
    """Metrics for a given distance matrix (e.g. after re-ranking).

    dist (Q,G) float (torch or numpy; not modified; float64 is ranked in float64, anything
    else in float32); q_pids/q_cams (Q,), g_pids/g_cams (G,) integer. ``ap``: "official" or
    "standard". ``chunk``: queries per block (default and upper bound: CHUNK_ELEMENTS // G).
    """
    dist = torch.as_tensor(dist)
    qp, gp, qc, gc = map(_as_long, (q_pids, g_pids, q_cams, g_cams))
    if dist.shape != (qp.numel(), gp.numel()) or qc.numel() != qp.numel() or gc.numel() != gp.numel():
        raise ValueError(f"dist {tuple(dist.shape)} does not match {qp.numel()} queries x {gp.numel()} gallery")
    gal = _Gallery(gp, gc)
    acc = _Accumulator(max_rank, ap)
    step = _rows_per_chunk(gal.size, chunk)
    # float64 stays float64: a cast to float32 would tie distances that differ beyond its precision.
    dtype = torch.float64 if dist.dtype == torch.float64 else torch.float32
    for s in range(0, dist.shape[0], step):
        acc.add(*_chunk_hits(dist[s:s + step].to(dtype), qp[s:s + step], qc[s:s + step], gal))
    return acc.result()


def evaluate_features(qf, qw, gf, gw, q_pids, g_pids, q_cams, g_cams, *, ap: str = DEFAULT_AP,
                      max_rank: int = 50, chunk: int | None = 256) -> Result:
    """Metrics straight from part features, never holding a full (Q,G) matrix.

    qf (Q,P,D), qw (Q,P), gf (G,P,D), gw (G,P) float; pids/cams as in :func:`evaluate`.
    Each chunk of queries (``chunk``, at most CHUNK_ELEMENTS // G): weighted distance block
    (into a reused buffer) -> ranks of its positives -> metrics. Junk gallery items are
    dropped before the matmul. Equals ``evaluate(weighted_distance(...), ...)``.
    """
    qp, gp, qc, gc = map(_as_long, (q_pids, g_pids, q_cams, g_cams))
    gal = _Gallery(gp, gc)
    gf, gw = torch.as_tensor(gf), torch.as_tensor(gw).float()
    if gal.has_junk:
        gs = _scaled_rows(gf, gw, gal.keep_idx)             # junk rows never enter the matmul
        gw = gw[gal.keep_idx]
        gal = gal.without_junk()
    else:
        gs = _scaled_rows(gf, gw)
    qf, qw = torch.as_tensor(qf), torch.as_tensor(qw).float()
    acc = _Accumulator(max_rank, ap)
    step = _rows_per_chunk(gal.size, chunk)
    buf = torch.empty(min(step, qf.shape[0]), gal.size)
    for s in range(0, qf.shape[0], step):
        e = min(s + step, qf.shape[0])
        d = _distance_block(_scaled(qf[s:e], qw[s:e]), qw[s:e], gs, gw, out=buf[:e - s])
        acc.add(*_chunk_hits(d, qp[s:e], qc[s:e], gal))
    return acc.result()


# --------------------------------------------------------------------------- re-ranking
def check_rerank_size(nq: int, ng: int, max_items: int | None = None) -> None:
    """Raise :class:`RerankTooLarge` when re-ranking ``nq`` queries x ``ng`` gallery items would
    pass ``max_items`` (default RERANK_MAX_ITEMS): callers check before extracting anything."""
    limit = RERANK_MAX_ITEMS if max_items is None else max_items
    n = nq + ng
    if n > limit:
        gib = RERANK_BYTES_PER_PAIR * n * n / 2**30
        raise RerankTooLarge(
            f"re-ranking {nq} queries x {ng} gallery needs ~{gib:.1f} GiB of memory ({n} items, more than the "
            f"limit of {limit}); evaluate without --rerank, or re-rank a subset of the gallery")


def _check_rerank_args(k1: int, k2: int) -> None:
    # Query expansion averages over each item's k2 nearest, taken from the k1+1 already
    # ranked: a larger k2 would silently average fewer neighbours than the reference does.
    if k1 < 1 or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"re-ranking k1={k1}, k2={k2}: expected k1 >= 1 and 1 <= k2 <= k1 + 1 "
                         f"(query expansion uses the k1 + 1 nearest); lower k2 to at most {max(k1, 0) + 1} "
                         "or raise k1")


def re_ranking(q_g, q_q, g_g, *, k1: int = RERANK_K1, k2: int = RERANK_K2, lambda_value: float = RERANK_LAMBDA,
               max_items: int | None = None) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of any distance.

    q_g (Q,G), q_q (Q,Q), g_g (G,G) distances (torch or numpy) -> (Q,G) float32 torch:
    ``(1 - lambda) * Jaccard(k-reciprocal sets) + lambda * original``. The original distance
    is used as given (each column scaled by its maximum), not squared: our weighted distance
    already is a squared Euclidean one up to a constant. Memory: about
    RERANK_BYTES_PER_PAIR * (Q+G)^2 bytes; past ``max_items`` (default RERANK_MAX_ITEMS)
    items it raises :class:`RerankTooLarge` (a UserError and ValueError) with the size.
    Neighbour ties are broken by ``torch.topk`` (no particular order). ``k2`` must be at most
    ``k1 + 1`` (ValueError otherwise): query expansion draws on the k1 + 1 nearest.
    """
    _check_rerank_args(k1, k2)
    q_g, q_q, g_g = (torch.as_tensor(x).float() for x in (q_g, q_q, g_g))
    nq, ng = q_g.shape
    check_rerank_size(nq, ng, max_items)
    n = nq + ng
    if nq == 0 or ng == 0:
        return torch.zeros(nq, ng)
    dist = torch.cat([torch.cat([q_q, q_g], 1), torch.cat([q_g.T, g_g], 1)], 0)
    dist = (dist / dist.max(0, keepdim=True).values.clamp_min(1e-12)).T.contiguous()
    kk = min(k1 + 1, n)
    rank = torch.topk(dist, kk, dim=1, largest=False, sorted=True).indices       # (N, k1+1)
    near = torch.zeros(n, n, dtype=torch.bool)
    near.scatter_(1, rank, True)                                                  # j in top-(k1+1) of i
    recip = near & near.T                                                         # k-reciprocal, R(i, k1)
    kh = min(int(round(k1 / 2)) + 1, n)
    near.zero_()
    near.scatter_(1, rank[:, :kh], True)
    recip_h = near & near.T                                                       # R(c, k1/2)
    del near
    # Expansion: add R(c, k1/2) for each c in R(i, k1) sharing > 2/3 of it with R(i, k1).
    cand_mask = recip.gather(1, rank)                                             # (N, kk): rank[i, a] in R(i)
    half_idx = rank[:, :kh]
    half_mask = recip_h.gather(1, half_idx)                                       # (N, kh): in R(c, k1/2)
    del recip_h
    members = half_idx[rank]                                                      # (N, kk, kh)
    member_ok = half_mask[rank]                                                   # (N, kk, kh)
    in_r = recip.gather(1, members.reshape(n, -1)).reshape(members.shape) & member_ok
    qualifies = cand_mask & (in_r.sum(2).float() > 2.0 / 3.0 * member_ok.sum(2).float())
    expand = recip
    rows = torch.arange(n).view(n, 1, 1).expand_as(members)
    sel = qualifies.unsqueeze(2) & member_ok
    expand[rows[sel], members[sel]] = True
    original = dist[:nq, nq:].clone()
    v = torch.neg(dist).exp_().mul_(expand)
    del expand, dist
    v.div_(v.sum(1, keepdim=True).clamp_min(1e-12))
    if k2 > 1:
        qe = rank[:, :min(k2, n)]
        step = max(1, CHUNK_ELEMENTS // (qe.shape[1] * n))
        v_qe = torch.empty_like(v)
        for s in range(0, n, step):
            v_qe[s:s + step] = v[qe[s:s + step]].mean(1)
        v = v_qe
    # Jaccard distance between query rows and gallery rows of V, through V's sparsity:
    # sum_k min(V[i,k], V[j,k]) only over the k where both are non-zero (an inverted index
    # over gallery rows, joined with the query rows' non-zeros in bounded pieces).
    overlap = _min_overlap(v[:nq], v[nq:])
    jac = 1 - overlap / (2 - overlap)
    return (1 - lambda_value) * jac + lambda_value * original


def _min_overlap(vq: torch.Tensor, vg: torch.Tensor) -> torch.Tensor:
    """vq (Q,N), vg (G,N) sparse-ish non-negative float32 -> (Q,G) float32 sum_k min(vq[i,k], vg[j,k])."""
    nq, ng = vq.shape[0], vg.shape[0]
    out = torch.zeros(nq * ng)
    gi, gk = vg.nonzero(as_tuple=True)
    gk, order = torch.sort(gk, stable=True)
    gi = gi[order]
    gval = vg[gi, gk]
    col_cnt = torch.bincount(gk, minlength=vq.shape[1])
    col_start = torch.cumsum(col_cnt, 0) - col_cnt
    qi, qk = vq.nonzero(as_tuple=True)
    qval = vq[qi, qk]
    cnt = col_cnt[qk]
    ends = torch.cumsum(cnt, 0)
    s = 0
    while s < qi.numel():
        # a piece of query entries whose joins hold at most ~CHUNK_ELEMENTS pairs
        base = int(ends[s - 1]) if s else 0
        e = max(s + 1, int(torch.searchsorted(ends, base + CHUNK_ELEMENTS, right=True)))
        c = cnt[s:e]
        ent = torch.repeat_interleave(torch.arange(s, e), c)
        off = torch.arange(ent.numel()) - (torch.cumsum(c, 0) - c).repeat_interleave(c)
        gpos = col_start[qk[ent]] + off
        out.index_add_(0, qi[ent] * ng + gi[gpos], torch.minimum(qval[ent], gval[gpos]))
        s = e
    return out.view(nq, ng)


def rerank_features(qf, qw, gf, gw, *, k1: int = RERANK_K1, k2: int = RERANK_K2, lambda_value: float = RERANK_LAMBDA,
                    max_items: int | None = None) -> torch.Tensor:
    """Re-ranked (Q,G) float32 distance from part features qf (Q,P,D), qw (Q,P), gf (G,P,D),
    gw (G,P): the three weighted-distance blocks, then :func:`re_ranking`. Refuses (before
    computing anything) past ``max_items`` items or with ``k2 > k1 + 1``."""
    _check_rerank_args(k1, k2)
    check_rerank_size(qf.shape[0], gf.shape[0], max_items)
    return re_ranking(weighted_distance(qf, qw, gf, gw), weighted_distance(qf, qw, qf, qw),
                      weighted_distance(gf, gw, gf, gw), k1=k1, k2=k2, lambda_value=lambda_value,
                      max_items=max_items)


# --------------------------------------------------------------------------- index scores
def index_vectors(f, w):
    """The vectors a gallery index stores: f (N,P,D), w (N,P) >= 0 -> (x (N,P*D) float32, norm (N,) float32).

    ``x = concat_i(w_i u_i) / ||w||`` with ``u_i = f_i / ||f_i||``: a unit vector (all zeros when
    every weight is zero); ``norm = ||w||_2``. For two images,
    ``x(q).x(g) * ||w(q)|| * ||w(g)|| = sum_i w_i(q) w_i(g) cos(q_i, g_i)``, the numerator of
    :func:`weighted_distance`, so an inner-product index over ``x`` finds the candidates and
    :func:`distance_from_scores` turns their scores into the exact distance. The score itself is
    ``(1 - D(q,g)) * cos(w(q), w(g))``: the similarity, damped where the two images trust
    different stripes; with uniform weights it is exactly ``1 - D``.

    numpy arrays f and w give numpy arrays (a query's vector at search time; ``F.normalize``'s
    formula, equal to the tensor path to float rounding).
    """
    if isinstance(f, np.ndarray):
        f, w = f.astype(np.float32, copy=False), np.asarray(w, dtype=np.float32)
        u = f / np.maximum(np.sqrt((f * f).sum(-1, keepdims=True)), 1e-12)
        x = (u * w[..., None]).reshape(len(f), -1)
        norm = np.sqrt((w * w).sum(1))
        x /= np.maximum(norm, _TINY)[:, None]
        return x, norm
    w = torch.as_tensor(w).float()
    x = _scaled_rows(torch.as_tensor(f), w)
    norm = w.norm(dim=1)
    return x.div_(norm.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)), norm


def distance_from_scores(score, qw, gw):
    """Weighted part distance of candidate pairs from their index scores.

    score (Q,K) float: ``index_vectors(q) . index_vectors(g)`` for each query's K candidates;
    qw (Q,P) the query weights; gw (Q,K,P) the candidates' weights -> (Q,K) float32
    ``1 - score * ||w(q)|| ||w(g)|| / sum_j w_j(q) w_j(g)`` (zero denominators clamped as in
    :func:`weighted_distance`, so an all-zero weight vector gives distance 1). Equals
    :func:`weighted_distance` for the same pairs up to float rounding (~1e-7); exact when the
    score is exact, approximate when it comes from a compressed (PQ) index.

    Three float32 numpy arrays give a numpy array (a gallery index re-scores a query's
    candidates in numpy: a handful of small operations, where torch's per-call cost would be
    most of the work); anything else is taken as tensors.
    """
    if not all(isinstance(t, np.ndarray) for t in (score, qw, gw)):
        score, qw, gw = (torch.as_tensor(t).float() for t in (score, qw, gw))
    qn = (qw * qw).sum(-1) ** 0.5
    gn = (gw * gw).sum(-1) ** 0.5
    num = score * qn[:, None] * gn
    den = (gw * qw[:, None, :]).sum(-1).clip(min=_TINY)
    return 1.0 - num / den


def distance_from_score_matrix(score, qw, gw) -> torch.Tensor:
    """:func:`distance_from_scores` for every query-gallery pair: score (Q,G) inner products of
    :func:`index_vectors`, qw (Q,P), gw (G,P) -> (Q,G) float32 weighted part distance."""
    score = torch.as_tensor(score).float()
    qw, gw = torch.as_tensor(qw).float(), torch.as_tensor(gw).float()
    num = score * qw.norm(dim=1, keepdim=True) * gw.norm(dim=1).unsqueeze(0)
    den = (qw @ gw.T).clamp_min_(torch.finfo(torch.float32).tiny)
    return num.div_(den).neg_().add_(1.0)


# --------------------------------------------------------------------------- open set
DEFAULT_FMRS = (0.01, 0.001)


@dataclass
class Verification:
    """Open-set figures of one split at a few false-match rates; T = len(fmr).

    Pairs follow the protocol: a query and a gallery item of the same pid from another camera
    are a genuine pair, of different pids (distractors included) an impostor pair; junk and the
    query's same-pid-same-camera items are neither. A threshold accepts ``distance < threshold``.

    fmr (T,) the target rates; threshold (T,) float64: the (k+1)-th smallest impostor distance,
    k = floor(fmr * impostors), so at most that fraction of impostor pairs is accepted (+inf
    when every pair may be); fmr_achieved (T,): the fraction actually accepted; tmr (T,): the
    fraction of genuine pairs accepted (NaN without genuine pairs); rank1_tmr (T,): the fraction
    of queries with a genuine item whose nearest valid item is genuine *and* accepted (a search
    answering correctly); fpir (T,): the fraction of queries whose nearest impostor is accepted
    (with its own person absent from the gallery, a search would name a stranger); genuine,
    impostor: pair counts; queries: queries with a genuine pair; searched: queries with an
    impostor pair.
    """

    fmr: tuple
    threshold: torch.Tensor
    fmr_achieved: torch.Tensor
    tmr: torch.Tensor
    rank1_tmr: torch.Tensor
    fpir: torch.Tensor
    genuine: int
    impostor: int
    queries: int
    searched: int

    def at(self, fmr: float) -> dict:
        """Plain numbers at one of the target rates: {fmr, threshold, fmr_achieved, tmr, rank1_tmr, fpir}."""
        i = [abs(f - fmr) < 1e-12 for f in self.fmr].index(True)
        return {"fmr": float(self.fmr[i]), "threshold": float(self.threshold[i]),
                "fmr_achieved": float(self.fmr_achieved[i]), "tmr": float(self.tmr[i]),
                "rank1_tmr": float(self.rank1_tmr[i]), "fpir": float(self.fpir[i])}

    def as_dict(self) -> dict:
        return {"rates": [self.at(f) for f in self.fmr], "genuine_pairs": self.genuine,
                "impostor_pairs": self.impostor, "queries": self.queries, "searched": self.searched}


def threshold_at_fmr(impostor, fmr: float) -> float:
    """The distance threshold (accept ``d < threshold``) at false-match rate ``fmr`` in (0, 1].

    impostor (N,) float: every impostor pair's distance (NaN counts as +inf) -> the (k+1)-th
    smallest, k = floor(fmr * N): the largest threshold that accepts at most k of them, whatever
    the ties. +inf when k >= N (every pair may be accepted, e.g. no impostor pairs at all).
    """
    _check_fmrs((fmr,))
    d = torch.as_tensor(impostor).double().reshape(-1).nan_to_num(nan=math.inf)
    k = _allowed(fmr, d.numel())
    if k >= d.numel():
        return math.inf
    return float(torch.kthvalue(d, k + 1).values)


def _allowed(fmr: float, n: int) -> int:
    """floor(fmr * n), robust to the float error of fmr itself (0.29 * 100 -> 29, not 28)."""
    return int(math.floor(fmr * n * (1 + 1e-12) + 1e-9))


def _check_fmrs(fmrs) -> None:
    for f in fmrs:
        if not 0 < f <= 1:
            raise ValueError(f"false-match rate {f}: expected a fraction in (0, 1], e.g. 0.01")


class _Verifier:
    """Collects, over query chunks, the genuine distances, the smallest ``keep`` impostor
    distances, and each query's nearest genuine / impostor item."""

    def __init__(self, keep: int):
        self.keep = keep
        self.genuine: list[torch.Tensor] = []
        self.impostor = torch.zeros(0, dtype=torch.float64)
        self.near: list[tuple] = []

    def add(self, d: torch.Tensor, q_pids, q_cams, g_pids, g_cams) -> None:
        """d (B,G') distances to the non-junk gallery items with pids/cams g_pids, g_cams (G',)."""
        d = d.double().nan_to_num(nan=math.inf)
        same = q_pids.unsqueeze(1) == g_pids.unsqueeze(0)
        gen = same & (q_cams.unsqueeze(1) != g_cams.unsqueeze(0))
        imp = ~same
        self.genuine.append(d[gen])
        if self.keep:
            vals = torch.cat([self.impostor, d[imp]])
            k = min(self.keep, vals.numel())
            self.impostor = torch.topk(vals, k, largest=False, sorted=False).values
        b, g = d.shape
        if g == 0:
            d = torch.full((b, 1), math.inf, dtype=torch.float64)
            gen = imp = torch.zeros(b, 1, dtype=torch.bool)
        cols = torch.arange(d.shape[1])
        gd = torch.where(gen, d, math.inf).amin(1)
        idd = torch.where(imp, d, math.inf).amin(1)
        # the lowest gallery index at the nearest distance: the evaluator's tie rule
        gi = torch.where(gen & (d == gd.unsqueeze(1)), cols, d.shape[1]).amin(1)
        ii = torch.where(imp & (d == idd.unsqueeze(1)), cols, d.shape[1]).amin(1)
        self.near.append((gen.any(1), imp.any(1), gd, gi, idd, ii))

    def result(self, fmrs, n_genuine: int, n_impostor: int) -> Verification:
        genuine = torch.cat(self.genuine) if self.genuine else torch.zeros(0, dtype=torch.float64)
        imp = torch.sort(self.impostor).values
        if self.near:
            has_g, has_i, gd, gi, idd, ii = (torch.cat(x) for x in zip(*self.near))
        else:
            has_g = has_i = torch.zeros(0, dtype=torch.bool)
            gd = idd = torch.zeros(0, dtype=torch.float64)
            gi = ii = torch.zeros(0, dtype=torch.long)
        first_genuine = has_g & ((gd < idd) | ((gd == idd) & (gi < ii)))
        thr, achieved, tmr, r1, fpir = [], [], [], [], []
        for f in fmrs:
            k = _allowed(f, n_impostor)
            t = math.inf if k >= n_impostor else float(imp[k])
            thr.append(t)
            achieved.append(float((imp < t).sum()) / n_impostor if n_impostor else math.nan)
            tmr.append(float((genuine < t).sum()) / genuine.numel() if genuine.numel() else math.nan)
            nq = int(has_g.sum())
            r1.append(float((first_genuine & (gd < t)).sum()) / nq if nq else math.nan)
            ns = int(has_i.sum())
            fpir.append(float((has_i & (idd < t)).sum()) / ns if ns else math.nan)
        as64 = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
        return Verification(tuple(float(f) for f in fmrs), as64(thr), as64(achieved), as64(tmr), as64(r1),
                            as64(fpir), n_genuine, n_impostor, int(has_g.sum()), int(has_i.sum()))


def _pair_counts(gal: "_Gallery", qp: torch.Tensor, qc: torch.Tensor) -> tuple[int, int]:
    """(genuine, impostor) pair counts of queries qp/qc against a junk-free gallery."""
    _cols, pos, ign = gal.same_pid(qp, qc)
    same = pos.sum(1) + ign.sum(1)
    return int(pos.sum()), int((gal.size - same).sum())


def verification(dist, q_pids, g_pids, q_cams, g_cams, *, fmrs=DEFAULT_FMRS, chunk: int | None = None) -> Verification:
    """Open-set figures (:class:`Verification`) from a distance matrix.

    dist (Q,G) float (NaN counts as +inf; not modified); pids/cams as in :func:`evaluate`; fmrs:
    target false-match rates in (0, 1]. Memory: one block of ``chunk`` queries (default
    CHUNK_ELEMENTS // G) plus the floor(max(fmrs) * impostors) + 1 smallest impostor distances.
    """
    _check_fmrs(fmrs)
    dist = torch.as_tensor(dist)
    qp, gp, qc, gc = map(_as_long, (q_pids, g_pids, q_cams, g_cams))
    if dist.shape != (qp.numel(), gp.numel()) or qc.numel() != qp.numel() or gc.numel() != gp.numel():
        raise ValueError(f"dist {tuple(dist.shape)} does not match {qp.numel()} queries x {gp.numel()} gallery")
    keep = (gp != -1).nonzero(as_tuple=True)[0]
    gal = _Gallery(gp[keep], gc[keep])
    n_gen, n_imp = _pair_counts(gal, qp, qc)
    ver = _Verifier(min(n_imp, _allowed(max(fmrs), n_imp) + 1))
    step = _rows_per_chunk(gal.size, chunk)
    for s in range(0, dist.shape[0], step):
        ver.add(dist[s:s + step].index_select(1, keep), qp[s:s + step], qc[s:s + step], gal.pids, gal.cams)
    return ver.result(fmrs, n_gen, n_imp)


def verification_features(qf, qw, gf, gw, q_pids, g_pids, q_cams, g_cams, *, fmrs=DEFAULT_FMRS,
                          chunk: int | None = 256) -> Verification:
    """:func:`verification` straight from part features qf (Q,P,D), qw (Q,P), gf (G,P,D), gw (G,P),
    one chunk of queries at a time (never a full (Q,G) matrix). Equals
    ``verification(weighted_distance(...), ...)``."""
    _check_fmrs(fmrs)
    qp, gp, qc, gc = map(_as_long, (q_pids, g_pids, q_cams, g_cams))
    keep = (gp != -1).nonzero(as_tuple=True)[0]
    gal = _Gallery(gp[keep], gc[keep])
    gw = torch.as_tensor(gw).float()
    gs = _scaled_rows(torch.as_tensor(gf), gw, keep)
    gw = gw[keep]
    n_gen, n_imp = _pair_counts(gal, qp, qc)
    ver = _Verifier(min(n_imp, _allowed(max(fmrs), n_imp) + 1))
    qf, qw = torch.as_tensor(qf), torch.as_tensor(qw).float()
    step = _rows_per_chunk(gal.size, chunk)
    for s in range(0, qf.shape[0], step):
        e = min(s + step, qf.shape[0])
        d = _distance_block(_scaled(qf[s:e], qw[s:e]), qw[s:e], gs, gw)
        ver.add(d, qp[s:e], qc[s:e], gal.pids, gal.cams)
    return ver.result(fmrs, n_gen, n_imp)


def format_verification(v: Verification) -> str:
    """One line: TMR at each false-match rate with its threshold, and the pair counts."""
    rates = " | ".join(f"TMR {100 * float(t):.2f}% @ FMR {100 * f:g}% (d < {float(th):.4f})"
                       for f, t, th in zip(v.fmr, v.tmr, v.threshold))
    return f"{rates} | {v.genuine:,} genuine / {v.impostor:,} impostor pairs"
