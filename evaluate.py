"""Retrieval math for AWPCN: weighted part distance, CMC / mAP / mINP, k-reciprocal re-ranking.

Pure tensor code: no file I/O, no printing. Shapes: Q queries, G gallery items, P parts,
D embedding size.

Protocol (Market-1501): gallery items with pid -1 are junk and ignored; pid 0
(distractors) stay as negatives; gallery items sharing the query's pid *and* camera are
ignored for that query; a query without any valid positive is skipped and counted.
Ordering: ascending distance, ties broken by lower gallery index (a stable sort); NaN
distances count as +inf.

Speed: the ranks of a query's positives are all that CMC, AP and INP need, so rows are
never sorted: the few positives are sorted, and every gallery item is placed between them
with a binary search; per-position counts then give each positive's rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

AP_FORMULAS = {
    "official": "official, Market-1501 trapezoid",
    "standard": "standard, mean precision at hits",
}
# Elements of a (chunk, G) block handled at once; bounds the memory of the evaluation.
CHUNK_ELEMENTS = 1 << 23
# Re-ranking holds a few dense (Q+G)^2 float32 matrices.
RERANK_MAX_ITEMS = 25_000


# --------------------------------------------------------------------------- distance
def _scaled(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """f (N,P,D), w (N,P) -> (N, P*D) float32: each part L2-normalised and scaled by its weight."""
    return (F.normalize(f.float(), dim=-1) * w.float().unsqueeze(-1)).flatten(1)


def _distance_block(qs: torch.Tensor, qw: torch.Tensor, gs: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    num = qs @ gs.T                                     # sum_i w_i(q) w_i(g) cos(q_i, g_i)
    den = (qw.float() @ gw.float().T).clamp_min(1e-12)  # sum_j w_j(q) w_j(g)
    return 1.0 - num / den


def weighted_distance(qf: torch.Tensor, qw: torch.Tensor, gf: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """D(q,g) = sum_i alpha_i(q,g) (1 - cos(q_i, g_i)), alpha_i ∝ w_i(q) w_i(g).

    qf (Q,P,D), qw (Q,P) >= 0, gf (G,P,D), gw (G,P) >= 0 -> dist (Q,G) float32 in [0, 2].
    Two matrix products: weight-scaled concatenated normalised features, and the (Q,P)@(P,G)
    normaliser. Weights are scale-free (w and 3w give the same distance). With uniform
    weights, D = 1 - mean_i cos, which ranks exactly like the Euclidean distance between
    PCB's concatenated per-part-normalised features.
    """
    return _distance_block(_scaled(qf, qw), qw, _scaled(gf, gw), gw)


# --------------------------------------------------------------------------- metrics
@dataclass
class Result:
    """Metrics over the valid queries (fractions in [0, 1]); ``cmc`` (max_rank,) float64."""

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

    def __getitem__(self, key):  # dict-style access, e.g. res["mAP"]
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key, default)

    def as_dict(self) -> dict:
        return {"rank1": self.rank1, "rank5": self.rank5, "rank10": self.rank10, "mAP": self.mAP,
                "mINP": self.mINP, "cmc": self.cmc.tolist(), "num_valid_queries": self.num_valid_queries,
                "num_skipped_queries": self.num_skipped_queries, "ap_formula": self.ap_formula}


def format_result(res: Result) -> str:
    """One line: Rank-1/5/10, mAP (with the AP formula named), mINP."""
    return (f"Rank-1 {100 * res.rank1:.2f}% | Rank-5 {100 * res.rank5:.2f}% | Rank-10 {100 * res.rank10:.2f}% | "
            f"mAP {100 * res.mAP:.2f}% (AP: {AP_FORMULAS[res.ap_formula]}) | mINP {100 * res.mINP:.2f}% "
            f"| {res.num_valid_queries} queries")


class _Accumulator:
    def __init__(self, max_rank: int, ap: str):
        if ap not in AP_FORMULAS:
            raise ValueError(f"ap={ap!r}: expected one of {', '.join(AP_FORMULAS)}")
        self.max_rank, self.ap = max_rank, ap
        self.cmc = torch.zeros(max_rank, dtype=torch.float64)
        # Per-query values, summed once at the end: chunking cannot change the rounding.
        self.aps, self.inps = [], []
        self.valid = self.skipped = 0

    def add(self, ranks: torch.Tensor, npos: torch.Tensor) -> None:
        """ranks (B, M) int64: 0-based positions of each query's positives among its valid
        gallery items, ascending, padded beyond npos (B,)."""
        has = npos > 0
        self.skipped += int((~has).sum())
        ranks, npos = ranks[has], npos[has]
        if ranks.numel() == 0:
            return
        self.valid += ranks.shape[0]
        m = ranks.shape[1]
        k = torch.arange(m, dtype=torch.float64).expand(ranks.shape[0], m)
        live = k < npos.unsqueeze(1)
        r = ranks.to(torch.float64)
        n = npos.to(torch.float64)
        prec = (k + 1) / (r + 1)
        if self.ap == "standard":
            per_hit = prec
        else:
            old = torch.where(r > 0, k / r.clamp_min(1), torch.ones_like(r))
            per_hit = (old + prec) / 2
        self.aps.append((per_hit * live).sum(1) / n)
        last = r.gather(1, (npos - 1).unsqueeze(1)).squeeze(1)
        self.inps.append(n / (last + 1))
        first = r[:, 0]
        self.cmc += (first.unsqueeze(1) <= torch.arange(self.max_rank, dtype=torch.float64)).sum(0)

    def result(self) -> Result:
        v = max(self.valid, 1)
        cmc = self.cmc / v
        at = lambda k: float(cmc[min(k, self.max_rank) - 1])  # noqa: E731
        total = lambda xs: math.fsum(torch.cat(xs).tolist()) if xs else 0.0  # noqa: E731
        return Result(at(1), at(5), at(10), total(self.aps) / v, total(self.inps) / v, cmc, self.valid,
                      self.skipped, self.ap)


def _positive_ranks(dist: torch.Tensor, q_pids, g_pids, q_cams, g_cams) -> tuple[torch.Tensor, torch.Tensor]:
    """dist (B,G) -> (ranks (B,M) int64 ascending 0-based positions of the positives among
    the valid items, padded; npos (B,) int64)."""
    b, g = dist.shape
    d = dist.float()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)  # nan_to_num would clip +inf
    same_pid = g_pids.unsqueeze(0) == q_pids.unsqueeze(1)
    valid = (g_pids != -1).unsqueeze(0) & ~(same_pid & (g_cams.unsqueeze(0) == q_cams.unsqueeze(1)))
    pos = same_pid & valid
    npos = pos.sum(1)
    m = int(npos.max()) if b else 0
    if m == 0:
        return torch.zeros(b, 1, dtype=torch.long), npos
    # Positives in index order, packed into (B, M), padded with (+inf, index G): pads sort
    # after every real item under the (distance, index) order.
    rows, cols = pos.nonzero(as_tuple=True)
    start = torch.cumsum(npos, 0) - npos
    slot = torch.arange(rows.numel()) - start[rows]
    pd = torch.full((b, m), float("inf"))
    pi = torch.full((b, m), g, dtype=torch.long)
    pd[rows, slot] = d[rows, cols]
    pi[rows, slot] = cols
    pd, order = torch.sort(pd, dim=1, stable=True)     # stable: equal distances keep index order
    pi = pi.gather(1, order)
    # How many positives precede each gallery item in the (distance, index) order.
    before = torch.searchsorted(pd, d, right=False)
    tied = (torch.searchsorted(pd, d, right=True) > before) & valid
    if tied.any():
        tr, tc = tied.nonzero(as_tuple=True)
        dt = d[tr, tc].unsqueeze(1)
        before[tr, tc] = ((pd[tr] < dt) | ((pd[tr] == dt) & (pi[tr] < tc.unsqueeze(1)))).sum(1)
    before = torch.where(valid, before, torch.full_like(before, m + 1))
    counts = torch.zeros(b, m + 2, dtype=torch.long).scatter_add_(1, before, torch.ones_like(before))
    # Items with before <= k come ahead of the k-th positive, itself included.
    ranks = counts.cumsum(1)[:, :m] - 1
    return ranks, npos


def _as_long(x) -> torch.Tensor:
    return torch.as_tensor(x).long().reshape(-1)


def _chunk_size(g: int, chunk: int | None) -> int:
    return max(1, chunk if chunk else CHUNK_ELEMENTS // max(g, 1))


def evaluate(dist, q_pids, g_pids, q_cams, g_cams, *, ap: str = "official", max_rank: int = 50,
             chunk: int | None = None) -> Result:
    """Metrics for a given distance matrix dist (Q,G) (e.g. after re-ranking).

    q_pids/q_cams (Q,), g_pids/g_cams (G,) integer. ``ap``: "official" or "standard".
    """
    dist = torch.as_tensor(dist)
    qp, gp, qc, gc = map(_as_long, (q_pids, g_pids, q_cams, g_cams))
    acc = _Accumulator(max_rank, ap)
    step = _chunk_size(dist.shape[1], chunk)
    for s in range(0, dist.shape[0], step):
        acc.add(*_positive_ranks(dist[s:s + step], qp[s:s + step], gp, qc[s:s + step], gc))
    return acc.result()


def evaluate_features(qf, qw, gf, gw, q_pids, g_pids, q_cams, g_cams, *, ap: str = "official",
                      max_rank: int = 50, chunk: int | None = None) -> Result:
    """Metrics straight from part features, never holding a full (Q,G) matrix.

    qf (Q,P,D), qw (Q,P), gf (G,P,D), gw (G,P); pids/cams as in :func:`evaluate`.
    Each chunk of queries: weighted distance block -> ranks of its positives -> metrics.
    """
    qp, gp, qc, gc = map(_as_long, (q_pids, g_pids, q_cams, g_cams))
    gs = _scaled(gf, gw)
    acc = _Accumulator(max_rank, ap)
    step = _chunk_size(gs.shape[0], chunk)
    for s in range(0, qf.shape[0], step):
        e = s + step
        dist = _distance_block(_scaled(qf[s:e], qw[s:e]), qw[s:e], gs, gw)
        acc.add(*_positive_ranks(dist, qp[s:e], gp, qc[s:e], gc))
    return acc.result()


# --------------------------------------------------------------------------- re-ranking
def re_ranking(q_g, q_q, g_g, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of any distance.

    q_g (Q,G), q_q (Q,Q), g_g (G,G) distances (torch or numpy) -> (Q,G) float32:
    ``(1 - lambda) * Jaccard(k-reciprocal sets) + lambda * original``. The original distance
    is used as given (each column scaled by its maximum), not squared: our weighted distance
    already behaves like a squared Euclidean one. Needs about 3 dense (Q+G)^2 float32
    matrices; past RERANK_MAX_ITEMS items it raises ValueError with the size.
    """
    q_g, q_q, g_g = (torch.as_tensor(x).float() for x in (q_g, q_q, g_g))
    nq, ng = q_g.shape
    n = nq + ng
    if n > RERANK_MAX_ITEMS:
        gib = 3 * n * n * 4 / 2**30
        raise ValueError(f"re-ranking {nq} queries x {ng} gallery needs ~{gib:.0f} GiB ({n} items > the limit "
                         f"of {RERANK_MAX_ITEMS}); evaluate without --rerank, or re-rank a subset of the gallery")
    if n == 0:
        return torch.zeros(nq, ng)
    dist = torch.cat([torch.cat([q_q, q_g], 1), torch.cat([q_g.T, g_g], 1)], 0)
    dist = (dist / dist.max(0, keepdim=True).values.clamp_min(1e-12)).T.contiguous()
    kk = min(k1 + 1, n)
    rank = torch.topk(dist, kk, dim=1, largest=False, sorted=True).indices       # (N, k1+1)
    near = torch.zeros(n, n, dtype=torch.bool)
    near.scatter_(1, rank, True)                                                  # j in top-(k1+1) of i
    recip = near & near.T                                                         # k-reciprocal, R(i, k1)
    kh = min(int(round(k1 / 2)) + 1, n)
    near_h = torch.zeros(n, n, dtype=torch.bool)
    near_h.scatter_(1, rank[:, :kh], True)
    recip_h = near_h & near_h.T                                                   # R(c, k1/2)
    # Expansion: add R(c, k1/2) for each c in R(i, k1) sharing > 2/3 of it with R(i, k1).
    cand_mask = recip.gather(1, rank)                                             # (N, kk) c = rank[i, a] in R(i)
    half_idx = rank[:, :kh]                                                       # members of c's half set
    half_mask = recip_h.gather(1, half_idx)                                       # (N, kh)
    ci = rank                                                                     # (N, kk) candidates
    members = half_idx[ci]                                                        # (N, kk, kh)
    member_ok = half_mask[ci]                                                     # (N, kk, kh)
    in_r = recip.gather(1, members.reshape(n, -1)).reshape(members.shape) & member_ok
    size_h = member_ok.sum(2)
    qualifies = cand_mask & (in_r.sum(2).float() > 2.0 / 3.0 * size_h.float())
    expand = recip.clone()
    rows = torch.arange(n).view(n, 1, 1).expand_as(members)
    sel = qualifies.unsqueeze(2) & member_ok
    expand[rows[sel], members[sel]] = True
    v = torch.where(expand, torch.exp(-dist), torch.zeros(()))
    v = v / v.sum(1, keepdim=True).clamp_min(1e-12)
    if k2 > 1:
        qe = rank[:, :min(k2, n)]
        step = max(1, CHUNK_ELEMENTS // (qe.shape[1] * n))
        v = torch.cat([v[qe[s:s + step]].mean(1) for s in range(0, n, step)])
    # Jaccard distance between query rows and gallery rows of V, using V's sparsity.
    vg = v[nq:]
    jac = torch.empty(nq, ng)
    for i in range(nq):
        nz = v[i].nonzero(as_tuple=True)[0]
        inter = torch.minimum(vg[:, nz], v[i, nz]).sum(1)
        jac[i] = 1 - inter / (2 - inter)
    return (1 - lambda_value) * jac + lambda_value * dist[:nq, nq:]


def rerank_features(qf, qw, gf, gw, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> torch.Tensor:
    """Re-ranked (Q,G) distance from part features and weights (weighted distance blocks)."""
    if qf.shape[0] + gf.shape[0] > RERANK_MAX_ITEMS:
        re_ranking(torch.zeros(qf.shape[0], gf.shape[0]), torch.zeros(0, 0), torch.zeros(0, 0))  # raises
    return re_ranking(weighted_distance(qf, qw, gf, gw), weighted_distance(qf, qw, qf, qw),
                      weighted_distance(gf, gw, gf, gw), k1=k1, k2=k2, lambda_value=lambda_value)
