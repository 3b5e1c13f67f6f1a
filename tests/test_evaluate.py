"""evaluate.py against a plain per-query oracle, hand-worked cases, and a direct re-ranking."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import evaluate as E


# --------------------------------------------------------------------------- the oracle
def oracle(dist, qp, gp, qc, gc, ap="official", max_rank=50):
    """Deliberately plain: per query, stable argsort, drop junk and same pid+camera, walk hits."""
    dist = np.where(np.isnan(dist), np.inf, np.asarray(dist, dtype=np.float64))
    cmc, aps, inps, skipped = np.zeros(max_rank), [], [], 0
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")
        kept = [j for j in order if gp[j] != -1 and not (gp[j] == qp[i] and gc[j] == qc[i])]
        hits = [k for k, j in enumerate(kept) if gp[j] == qp[i]]
        if not hits:
            skipped += 1
            continue
        n = len(hits)
        cmc[hits[0]:] += 1
        total = 0.0
        for k, r in enumerate(hits):
            precision = (k + 1) / (r + 1)
            if ap == "standard":
                total += precision / n
            else:
                old = k / r if r != 0 else 1.0
                total += (old + precision) / 2 / n
        aps.append(total)
        inps.append(n / (hits[-1] + 1))
    v = len(aps)
    if v == 0:
        return None, skipped
    return {"cmc": cmc / v, "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps))}, skipped


def random_problem(rng, q, g, ties=False, nans=False):
    dist = rng.integers(0, 4, (q, g)).astype(np.float32) if ties else rng.random((q, g)).astype(np.float32)
    if nans:
        dist[rng.random((q, g)) < 0.1] = np.nan
    qp = rng.integers(0, 6, q)            # 0 = distractor id as a query never matches... but may
    gp = rng.integers(-1, 6, g)           # -1 junk, 0 distractors
    qc, gc = rng.integers(0, 3, q), rng.integers(0, 3, g)
    return dist, qp, gp, qc, gc


def assert_matches(res, ref, skipped):
    assert res.num_skipped_queries == skipped
    np.testing.assert_array_equal(res.cmc.numpy(), ref["cmc"])
    assert res.mAP == pytest.approx(ref["mAP"], abs=1e-6)
    assert res.mINP == pytest.approx(ref["mINP"], abs=1e-6)
    assert res.rank1 == ref["cmc"][0] and res.rank5 == ref["cmc"][4] and res.rank10 == ref["cmc"][9]


@pytest.mark.parametrize("ap", ["official", "standard"])
@pytest.mark.parametrize("ties,nans", [(False, False), (True, False), (True, True)])
def test_fast_path_equals_oracle_on_random_problems(ap, ties, nans):
    rng = np.random.default_rng(7)
    for _ in range(40):
        dist, qp, gp, qc, gc = random_problem(rng, int(rng.integers(1, 20)), int(rng.integers(1, 60)), ties, nans)
        ref, skipped = oracle(dist, qp, gp, qc, gc, ap)
        res = E.evaluate(torch.from_numpy(dist), qp, gp, qc, gc, ap=ap, chunk=int(rng.integers(1, 6)))
        if ref is None:
            assert res.num_valid_queries == 0 and res.num_skipped_queries == skipped
            continue
        assert_matches(res, ref, skipped)


# --------------------------------------------------------------------------- hand-built cases
def test_hand_built_single_query():
    # Gallery in distance order after dropping junk (-1) and same-camera same-id items:
    #   index: 0   1   2   3   4   5   6
    #   pid:   2  [1]  0  [1]  3   -1  1 (camera 0 = query camera: ignored)
    # kept order by distance: g0(2) g1(1) g2(0) g3(1) g4(3) -> hits at 0-based positions 1, 3
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.05, 0.01]])
    gp = [2, 1, 0, 1, 3, -1, 1]
    gc = [1, 1, 1, 2, 2, 1, 0]
    official = E.evaluate(dist, [1], gp, [0], gc, ap="official")
    standard = E.evaluate(dist, [1], gp, [0], gc, ap="standard")
    assert official.rank1 == 0.0 and official.rank5 == 1.0
    # standard: precisions at hits 1/2 and 2/4 -> (0.5 + 0.5) / 2 = 0.5
    assert standard.mAP == pytest.approx(0.5)
    # official trapezoid: hit 0 at r=1: old 0/1=0, prec 1/2 -> (0 + 0.5)/2 * 1/2 = 0.125
    #                     hit 1 at r=3: old 1/3,   prec 2/4 -> (1/3 + 1/2)/2 * 1/2 = 0.208333
    assert official.mAP == pytest.approx(0.125 + (1 / 3 + 0.5) / 4)
    # mINP: 2 hits, last at position 3 (1-based 4) -> 2/4
    assert official.mINP == pytest.approx(0.5)
    assert official.ap_formula == "official" and "official" in E.format_result(official)


def test_hand_built_perfect_and_skipped_queries():
    dist = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [0.5, 0.5, 0.5]])
    gp = [1, 2, 1]
    gc = [1, 1, 2]
    # q0 (pid 1, cam 0): hits at positions 0 and 1 -> AP 1, INP 1.
    # q1 (pid 2, cam 1): its only match g1 shares its camera -> skipped.
    # q2 (pid 1, cam 2): g2 same camera ignored; equal distances, ties by index: g0 (hit), g1 -> AP 1.
    res = E.evaluate(dist, [1, 2, 1], gp, [0, 1, 2], gc)
    assert res.num_valid_queries == 2 and res.num_skipped_queries == 1
    assert res.rank1 == 1.0 and res.mAP == pytest.approx(1.0) and res.mINP == pytest.approx(1.0)


def test_ties_are_broken_by_gallery_index():
    dist = torch.zeros(1, 4)
    first = E.evaluate(dist, [1], [1, 2, 3, 4], [0], [1, 1, 1, 1])
    last = E.evaluate(dist, [4], [1, 2, 3, 4], [0], [1, 1, 1, 1])
    assert first.rank1 == 1.0 and last.rank1 == 0.0 and last.mINP == pytest.approx(1 / 4)


# --------------------------------------------------------------------------- weighted distance
def test_weighted_distance_equals_direct_pair_loop():
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(3, 4, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    qw, gw = torch.rand(3, 4, generator=g), torch.rand(6, 4, generator=g)
    d = E.weighted_distance(qf, qw, gf, gw)
    for i in range(3):
        for j in range(6):
            alpha = qw[i] * gw[j] / (qw[i] * gw[j]).sum()
            cos = torch.nn.functional.cosine_similarity(qf[i], gf[j], dim=-1)
            assert d[i, j].item() == pytest.approx(float((alpha * (1 - cos)).sum()), abs=1e-5)
    torch.testing.assert_close(E.weighted_distance(qf, 3 * qw, gf, gw), d)


def test_uniform_weights_rank_like_pcb_concatenated_features():
    g = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(5, 6, 8, generator=g), torch.randn(40, 6, 8, generator=g)
    u = lambda n: torch.full((n, 6), 1 / 6)  # noqa: E731
    d = E.weighted_distance(qf, u(5), gf, u(40))
    cat = lambda f: torch.nn.functional.normalize(f, dim=-1).flatten(1)  # noqa: E731
    euclid = torch.cdist(cat(qf), cat(gf))
    assert torch.equal(torch.argsort(d, dim=1), torch.argsort(euclid, dim=1))
    torch.testing.assert_close(euclid ** 2, 12 * d, atol=1e-4, rtol=1e-4)  # ||a-b||^2 = 2P(1 - mean cos)


def test_chunked_equals_unchunked_and_features_path_equals_matrix_path():
    rng = np.random.default_rng(3)
    g = torch.Generator().manual_seed(3)
    qf, gf = torch.randn(30, 3, 4, generator=g), torch.randn(80, 3, 4, generator=g)
    qw, gw = torch.rand(30, 3, generator=g), torch.rand(80, 3, generator=g)
    qp, gp = rng.integers(0, 8, 30), rng.integers(-1, 8, 80)
    qc, gc = rng.integers(0, 3, 30), rng.integers(0, 3, 80)
    full = E.evaluate_features(qf, qw, gf, gw, qp, gp, qc, gc, chunk=1000)
    for chunk in (1, 7, 29):
        part = E.evaluate_features(qf, qw, gf, gw, qp, gp, qc, gc, chunk=chunk)
        assert part.as_dict() == full.as_dict()
    assert E.evaluate(E.weighted_distance(qf, qw, gf, gw), qp, gp, qc, gc).as_dict() == full.as_dict()


# --------------------------------------------------------------------------- re-ranking
def direct_rerank(q_g, q_q, g_g, k1=20, k2=6, lam=0.3):
    """The paper's formulas written out with sets and loops (Zhong et al. 2017)."""
    d = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64)
    d = (d / d.max(axis=0)).T
    n, nq = d.shape[0], q_g.shape[0]
    order = [list(np.argsort(d[i], kind="stable")) for i in range(n)]
    top = lambda i, k: set(order[i][:k + 1])  # noqa: E731
    recip = lambda i, k: {j for j in top(i, k) if i in top(j, k)}  # noqa: E731
    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        expanded = set(r)
        for c in r:
            rc = recip(c, int(round(k1 / 2)))
            if len(rc & r) > 2 / 3 * len(rc):
                expanded |= rc
        idx = sorted(expanded)
        w = np.exp(-d[i, idx])
        v[i, idx] = w / w.sum()
    v = np.stack([v[order[i][:k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(n - nq):
            inter = np.minimum(v[i], v[nq + j]).sum()
            jac[i, j] = 1 - inter / (2 - inter)
    return (1 - lam) * jac + lam * d[:nq, nq:]


def test_rerank_matches_direct_formulas():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(17, 6))
    full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    nq = 5
    q_g, q_q, g_g = full[:nq, nq:], full[:nq, :nq], full[nq:, nq:]
    for k1, k2 in ((4, 2), (6, 3), (20, 6)):
        ours = E.re_ranking(q_g, q_q, g_g, k1=k1, k2=k2).numpy()
        np.testing.assert_allclose(ours, direct_rerank(q_g, q_q, g_g, k1, k2), atol=1e-5)


def test_rerank_refuses_past_its_limit(monkeypatch):
    monkeypatch.setattr(E, "RERANK_MAX_ITEMS", 10)
    with pytest.raises(ValueError, match="re-ranking 4 queries x 8 gallery.*without --rerank"):
        E.re_ranking(torch.zeros(4, 8), torch.zeros(4, 4), torch.zeros(8, 8))


# --------------------------------------------------------------------------- fuzzing
@settings(max_examples=120, deadline=None)
@given(st.data())
def test_fuzz_never_crashes_stays_in_range_and_agrees(data):
    q = data.draw(st.integers(1, 8))
    g = data.draw(st.integers(0, 25))
    values = st.one_of(st.sampled_from([0.0, 0.5, 1.0, math.nan, math.inf]), st.floats(0, 2, width=32))
    dist = np.array(data.draw(st.lists(values, min_size=q * g, max_size=q * g)), dtype=np.float32).reshape(q, g)
    qp = np.array(data.draw(st.lists(st.integers(0, 3), min_size=q, max_size=q)))
    gp = np.array(data.draw(st.lists(st.integers(-1, 3), min_size=g, max_size=g)), dtype=np.int64)
    qc = np.array(data.draw(st.lists(st.integers(0, 2), min_size=q, max_size=q)))
    gc = np.array(data.draw(st.lists(st.integers(0, 2), min_size=g, max_size=g)), dtype=np.int64)
    ap = data.draw(st.sampled_from(["official", "standard"]))
    res = E.evaluate(torch.from_numpy(dist), qp, gp, qc, gc, ap=ap, chunk=data.draw(st.integers(1, 9)))
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= res[key] <= 1.0
    ref, skipped = oracle(dist, qp, gp, qc, gc, ap)
    if ref is None:
        assert res.num_valid_queries == 0
    else:
        assert_matches(res, ref, skipped)


# --------------------------------------------------------------------------- both rank paths
# evaluate.py ranks a query's positives by sorting its short prefix (d <= its farthest
# positive) or, for a deep positive, by a dense binary search + histogram. Force each.
PATHS = {"prefix": (math.inf, 10**9), "dense": (0.0, 0)}


def _force(path):
    saved = E.DENSE_FRACTION, E.DENSE_MIN
    E.DENSE_FRACTION, E.DENSE_MIN = PATHS[path]
    return saved


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("ap", ["official", "standard"])
def test_each_rank_path_equals_oracle(path, ap, monkeypatch):
    monkeypatch.setattr(E, "DENSE_FRACTION", PATHS[path][0])
    monkeypatch.setattr(E, "DENSE_MIN", PATHS[path][1])
    rng = np.random.default_rng(11)
    for _ in range(40):
        dist, qp, gp, qc, gc = random_problem(rng, int(rng.integers(1, 15)), int(rng.integers(1, 50)),
                                              ties=bool(rng.integers(2)), nans=bool(rng.integers(2)))
        dist[rng.random(dist.shape) < 0.05] = np.inf
        ref, skipped = oracle(dist, qp, gp, qc, gc, ap)
        res = E.evaluate(torch.from_numpy(dist), qp, gp, qc, gc, ap=ap, chunk=int(rng.integers(1, 6)))
        if ref is None:
            assert res.num_valid_queries == 0 and res.num_skipped_queries == skipped
        else:
            assert_matches(res, ref, skipped)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fuzz_both_paths_agree_with_oracle(data):
    q, g = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 30))
    values = st.one_of(st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf, -math.inf]), st.floats(-2, 2, width=32))
    dist = np.array(data.draw(st.lists(values, min_size=q * g, max_size=q * g)), dtype=np.float32).reshape(q, g)
    qp = np.array(data.draw(st.lists(st.integers(0, 3), min_size=q, max_size=q)))
    gp = np.array(data.draw(st.lists(st.integers(-1, 3), min_size=g, max_size=g)), dtype=np.int64)
    qc = np.array(data.draw(st.lists(st.integers(0, 2), min_size=q, max_size=q)))
    gc = np.array(data.draw(st.lists(st.integers(0, 2), min_size=g, max_size=g)), dtype=np.int64)
    ref, skipped = oracle(dist, qp, gp, qc, gc, "official")
    for path in sorted(PATHS):
        saved = _force(path)
        try:
            res = E.evaluate(torch.from_numpy(dist), qp, gp, qc, gc)
        finally:
            E.DENSE_FRACTION, E.DENSE_MIN = saved
        assert res.num_skipped_queries == skipped
        if ref is not None:
            assert_matches(res, ref, skipped)


def test_mixed_paths_in_one_chunk_and_evaluate_does_not_modify_its_input():
    rng = np.random.default_rng(2)
    dist, qp, gp, qc, gc = random_problem(rng, 30, 400, ties=True, nans=True)
    dist[:5, :] = rng.random((5, 400))  # some rows with deep positives among short ones
    before = dist.copy()
    ref, skipped = oracle(dist, qp, gp, qc, gc)
    res = E.evaluate(torch.from_numpy(dist), qp, gp, qc, gc)
    assert_matches(res, ref, skipped)
    np.testing.assert_array_equal(dist, before)


def test_max_rank_below_ten_and_format():
    dist = torch.tensor([[0.1, 0.2, 0.3]])
    res = E.evaluate(dist, [1], [2, 2, 1], [0], [1, 1, 1], max_rank=2)
    # the hit is third: Rank-1, Rank-2 = 0; Rank-5 and Rank-10 (beyond max_rank) = 1
    assert res.cmc.tolist() == [0.0, 0.0] and res.rank5 == 1.0 and res.rank10 == 1.0
    # official AP: r=2, i=0: old 0/2 = 0, precision 1/3 -> 1/6; standard 1/3; mINP 1/3
    assert res.mAP == pytest.approx(1 / 6) and res.mINP == pytest.approx(1 / 3)
    line = res.format()
    assert line.startswith("Rank-1 0.00% | Rank-5 100.00%") and "AP: official" in line
    assert res.as_dict()["cmc"] == [0.0, 0.0]


def test_weighted_distance_chunked_and_numpy_inputs():
    g = torch.Generator().manual_seed(4)
    qf, gf = torch.randn(9, 3, 5, generator=g), torch.randn(7, 3, 5, generator=g)
    qw, gw = torch.rand(9, 3, generator=g), torch.rand(7, 3, generator=g)
    full = E.weighted_distance(qf, qw, gf, gw)
    assert full.dtype == torch.float32 and full.shape == (9, 7)
    torch.testing.assert_close(E.weighted_distance(qf, qw, gf, gw, chunk=2), full)
    torch.testing.assert_close(E.weighted_distance(qf.numpy(), qw.numpy(), gf.numpy(), gw.numpy()), full)
    zero = E.weighted_distance(qf[:1], torch.zeros(1, 3), gf, gw)  # all-zero weights: guarded, distance 1
    assert torch.isfinite(zero).all() and torch.allclose(zero, torch.ones_like(zero))


def test_rerank_refusal_is_a_user_error_and_features_path_refuses_first(monkeypatch):
    from utils import UserError

    monkeypatch.setattr(E, "weighted_distance", lambda *a, **k: pytest.fail("computed before refusing"))
    qf = torch.zeros(3, 2, 4)
    with pytest.raises(UserError, match="3 queries x 9 gallery") as info:
        E.rerank_features(qf, torch.ones(3, 2), torch.zeros(9, 2, 4), torch.ones(9, 2), max_items=11)
    assert isinstance(info.value, ValueError) and "without --rerank" in str(info.value)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_float64_distances_are_ranked_in_float64(path, monkeypatch):
    # The negative (index 0) is farther than the positive (index 1) by 1e-9, below float32's
    # resolution at 1.0 (~6e-8): a cast would tie them and the lower index would win.
    monkeypatch.setattr(E, "DENSE_FRACTION", PATHS[path][0])
    monkeypatch.setattr(E, "DENSE_MIN", PATHS[path][1])
    dist = np.array([[1.0 + 1e-9, 1.0, 1.5]])
    assert np.float32(dist[0, 0]) == np.float32(dist[0, 1])
    for d in (dist, torch.from_numpy(dist)):
        res = E.evaluate(d, [1], [2, 1, 3], [0], [1, 1, 1])
        assert res.rank1 == 1.0 and res.mAP == 1.0 and res.mINP == 1.0
    # float32 input keeps its own resolution: the tie goes to the lower index (the negative);
    # official AP of a single hit at 0-based rank 1: (0/1 + 1/2) / 2
    tied = E.evaluate(torch.from_numpy(dist).float(), [1], [2, 1, 3], [0], [1, 1, 1])
    assert tied.rank1 == 0.0 and tied.mAP == pytest.approx(0.25)


def test_rerank_refuses_k2_beyond_k1_plus_one(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 4))
    full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    q_g, q_q, g_g = full[:4, 4:], full[:4, :4], full[4:, 4:]
    with pytest.raises(ValueError, match=r"k1=4, k2=6.*k2 to at most 5"):
        E.re_ranking(q_g, q_q, g_g, k1=4, k2=6)
    # the largest allowed k2 is the reference algorithm exactly
    np.testing.assert_allclose(E.re_ranking(q_g, q_q, g_g, k1=4, k2=5).numpy(),
                               direct_rerank(q_g, q_q, g_g, 4, 5), atol=1e-5)
    monkeypatch.setattr(E, "weighted_distance", lambda *a, **k: pytest.fail("computed before refusing"))
    with pytest.raises(ValueError, match="k2"):
        E.rerank_features(torch.zeros(3, 2, 4), torch.ones(3, 2), torch.zeros(5, 2, 4), torch.ones(5, 2), k1=2, k2=4)


def test_eval_speed_difficulty_sets_how_deep_positives_rank():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "eval_speed.py"
    spec = importlib.util.spec_from_file_location("eval_speed_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    got = {}
    for diff in ("easy", "realistic", "hard"):
        qf, qw, gf, gw, qp, gp, qc, gc = bench.make_problem(300, 3000, difficulty=diff)
        got[diff] = E.evaluate_features(qf, qw, gf, gw, qp, gp, qc, gc)
    # the speed-up quoted for each depends on this ordering (the evaluator sorts each row's prefix)
    assert got["easy"].rank1 > got["realistic"].rank1 > got["hard"].rank1
    assert got["easy"].mAP > got["realistic"].mAP > got["hard"].mAP
    assert got["easy"].rank1 > 0.9 and got["hard"].rank1 < 0.6


# --------------------------------------------------------------------------- index scores, open set
def test_index_scores_give_the_weighted_distance():
    g = torch.Generator().manual_seed(3)
    qf, gf = torch.randn(5, 4, 8, generator=g), torch.randn(30, 4, 8, generator=g)
    qw, gw = torch.rand(5, 4, generator=g), torch.rand(30, 4, generator=g)
    gw[7] = 0                                   # all weights zero: distance 1, as weighted_distance says
    qw[2, :3] = 0                               # one trusted stripe only
    x, nx = E.index_vectors(qf, qw)
    y, ny = E.index_vectors(gf, gw)
    assert torch.allclose(x.norm(dim=1), torch.ones(5)) and y[7].abs().sum() == 0
    assert torch.allclose(nx, qw.norm(dim=1))
    d = E.distance_from_scores(x @ y.T, qw, gw.unsqueeze(0).expand(5, -1, -1))
    ref = E.weighted_distance(qf, qw, gf, gw)
    assert torch.allclose(d, ref, atol=1e-6) and torch.allclose(d[:, 7], torch.ones(5))
    # uniform weights: the score is exactly 1 - D (no candidate is lost to the weight mismatch)
    u = torch.full((5, 4), 0.25), torch.full((30, 4), 0.25)
    xu, yu = E.index_vectors(qf, u[0])[0], E.index_vectors(gf, u[1])[0]
    assert torch.allclose(1 - xu @ yu.T, E.weighted_distance(qf, u[0], gf, u[1]), atol=1e-6)
    # numpy in, numpy out (a gallery index's per-query path): the same numbers
    xn, nxn = E.index_vectors(qf.numpy(), qw.numpy())
    assert isinstance(xn, np.ndarray) and np.allclose(xn, x.numpy(), atol=1e-7) and np.allclose(nxn, nx.numpy())
    dn = E.distance_from_scores((x @ y.T).numpy(), qw.numpy(), gw.unsqueeze(0).expand(5, -1, -1).numpy())
    assert isinstance(dn, np.ndarray) and np.allclose(dn, d.numpy(), atol=1e-7)


def _open_set_case():
    """2 queries x 6 gallery: genuine 0.10, 0.40 (q0), 0.25 (q1); impostors 0.30, 0.20 (q0),
    0.50, 0.15, 0.35, 0.60 (q1); a same-camera match and a junk item that count as neither."""
    dist = torch.tensor([[0.10, 0.05, 0.30, 0.20, 0.01, 0.40],
                         [0.50, 0.15, 0.25, 0.35, 0.00, 0.60]], dtype=torch.float64)
    return dist, [1, 2], [1, 1, 2, 3, -1, 1], [0, 0], [1, 0, 1, 1, 1, 1]


def test_threshold_calibration_on_a_hand_built_case():
    imp = torch.tensor([0.30, 0.20, 0.50, 0.15, 0.35, 0.60])
    assert E.threshold_at_fmr(imp, 0.5) == pytest.approx(0.35)     # k = 3 accepted: 0.15, 0.20, 0.30
    assert E.threshold_at_fmr(imp, 0.2) == pytest.approx(0.20)     # k = floor(1.2) = 1
    assert E.threshold_at_fmr(imp, 0.1) == pytest.approx(0.15)     # k = 0: below the nearest impostor
    assert E.threshold_at_fmr(imp, 1.0) == math.inf
    # ties: never more than k accepted, however many share the boundary distance
    assert E.threshold_at_fmr(torch.tensor([0.2, 0.2, 0.2, 0.5]), 0.5) == pytest.approx(0.2)
    # 0.29 * 100 is 28.999... in floating point: still 29 allowed
    assert E.threshold_at_fmr(torch.arange(100.0), 0.29) == 29.0
    with pytest.raises(ValueError, match="false-match rate"):
        E.threshold_at_fmr(imp, 0)


def test_tmr_at_fmr_on_a_hand_built_case():
    dist, qp, gp, qc, gc = _open_set_case()
    v = E.verification(dist, qp, gp, qc, gc, fmrs=(0.5, 0.2, 0.1))
    assert (v.genuine, v.impostor, v.queries, v.searched) == (3, 6, 2, 2)
    assert v.threshold.tolist() == pytest.approx([0.35, 0.20, 0.15])
    assert v.fmr_achieved.tolist() == pytest.approx([3 / 6, 1 / 6, 0.0])
    assert v.tmr.tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    # q0's nearest valid item is genuine (0.10 < 0.20), q1's an impostor (0.15 < 0.25)
    assert v.rank1_tmr.tolist() == pytest.approx([0.5, 0.5, 0.5])
    # nearest impostors 0.20 (q0) and 0.15 (q1), accepted when strictly below the threshold
    assert v.fpir.tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert v.at(0.2)["threshold"] == pytest.approx(0.2)
    line = E.format_verification(v)
    assert "TMR 66.67% @ FMR 50% (d < 0.3500)" in line and "3 genuine / 6 impostor pairs" in line


def test_open_set_features_path_equals_matrix_path_and_chunks_agree():
    rng = np.random.default_rng(5)
    qf, qw, gf, gw = (torch.from_numpy(a) for a in (rng.random((40, 3, 6), dtype=np.float32),
                                                      rng.random((40, 3), dtype=np.float32),
                                                      rng.random((300, 3, 6), dtype=np.float32),
                                                      rng.random((300, 3), dtype=np.float32)))
    qp, gp = rng.integers(0, 12, 40), rng.integers(-1, 12, 300)
    qc, gc = rng.integers(0, 3, 40), rng.integers(0, 3, 300)
    dist = E.weighted_distance(qf, qw, gf, gw)
    whole = E.verification(dist, qp, gp, qc, gc, fmrs=(0.05, 0.01))
    chunked = E.verification(dist, qp, gp, qc, gc, fmrs=(0.05, 0.01), chunk=7)
    feats = E.verification_features(qf, qw, gf, gw, qp, gp, qc, gc, fmrs=(0.05, 0.01), chunk=9)
    same = (gp[None, :] == qp[:, None])
    gen = same & (gc[None, :] != qc[:, None]) & (gp[None, :] != -1)
    imp = ~same & (gp[None, :] != -1)
    assert whole.genuine == gen.sum() and whole.impostor == imp.sum()
    imp_d = np.sort(dist.numpy()[imp])
    for v in (whole, chunked, feats):
        assert (v.genuine, v.impostor) == (whole.genuine, whole.impostor)
        for i, f in enumerate((0.05, 0.01)):
            t = imp_d[int(f * len(imp_d))]
            assert float(v.threshold[i]) == pytest.approx(t, abs=1e-6)
            assert float(v.tmr[i]) == pytest.approx((dist.numpy()[gen] < t).mean(), abs=1e-9)
            assert float(v.fmr_achieved[i]) <= f
