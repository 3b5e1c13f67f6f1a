"""gallery_index.GalleryIndex: exact ranking, add/remove in place, atomic folders, run identity,
open-set answers, Milvus Lite; demo.py --index and test.py --calibrate on a tiny run."""
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import evaluate
import gallery_index as gi
from utils import UserError, save_checkpoint, load_checkpoint

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -r requirements-search.txt)")

REPO = Path(__file__).resolve().parents[1]
ALPHA = {"run": "alpha", "which": "last", "epoch": 3, "checkpoint_sha256": "a" * 64, "flip": True,
         "height": 64, "width": 32, "parts": 4, "embed_dim": 16}
BETA = dict(ALPHA, run="beta", epoch=5, checkpoint_sha256="b" * 64)
P, D = 4, 16


def features(n_ids: int, per_id: int, seed: int, occluded: float = 0.3):
    """Clustered non-negative part features (n_ids*per_id, P, D) with adaptive-looking weights:
    near uniform, one end stripe weighted down on a share of the images. Returns emb, w, pids."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.relu(torch.randn(n_ids, P, D, generator=g) + 0.3)
    pids = torch.arange(n_ids * per_id) // per_id
    emb = torch.relu(centre[pids] + 0.5 * torch.randn(len(pids), P, D, generator=g))
    logits = 0.3 * torch.randn(len(pids), P, generator=g)
    hide = torch.rand(len(pids), generator=g) < occluded
    logits[hide, -1] -= 3
    return emb, torch.softmax(logits, 1), pids


@pytest.fixture(scope="module")
def data():
    """864 gallery images of 80 people, 16 queries of 16 of them."""
    emb, w, pids = features(80, 11, seed=1)
    q = torch.arange(0, 80, 5) * 11               # the first image of every fifth person is the query
    keep = torch.ones(len(pids), dtype=torch.bool)
    keep[q] = False
    return emb[q], w[q], emb[keep], w[keep]


def exact(qf, qw, gf, gw, k=10, weighting="adaptive"):
    qw_, gw_ = evaluate.weights_for(weighting, qw, gw)
    d = evaluate.weighted_distance(qf, qw_, gf, gw_)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return order.numpy(), d.gather(1, order).numpy()


def build(path, gf, gw, kind="flat", weighting="adaptive", **kw):
    idx = gi.GalleryIndex.create(path, ALPHA, parts=P, dim=D, kind=kind, weighting=weighting, log=lambda m: None, **kw)
    idx.add(gf, gw, [f"img{i}" for i in range(len(gf))])
    return idx


# --------------------------------------------------------------------------- ranking
def test_flat_index_ranks_exactly_like_the_evaluator(data, tmp_path):
    qf, qw, gf, gw = data
    ref, ref_d = exact(qf, qw, gf, gw)
    with build(tmp_path / "ix", gf, gw) as idx:                # flat: every image's exact distance
        hits = idx.search(qf, qw, 10)
        assert (hits.ids == ref).all() and np.allclose(hits.dists, ref_d, atol=1e-6)
        assert hits.names[0][0] == f"img{ref[0, 0]}"
        assert np.allclose(hits.weights[0, 0], gw[ref[0, 0]].numpy())
    # ties go to the image added first, as the evaluator gives them to the lower gallery index
    twins = torch.cat([gf[:5], gf[:5]]), torch.cat([gw[:5], gw[:5]])
    with build(tmp_path / "twins", *twins) as idx:
        assert idx.search(gf[:1], gw[:1], 2).ids.tolist() == [[0, 5]]


def test_uniform_weights_need_no_more_candidates_than_answers(data, tmp_path):
    """With uniform weights the index score is 1 - D itself: k candidates are the exact top k."""
    qf, qw, gf, gw = data
    ref_u, ref_ud = exact(qf, qw, gf, gw, weighting="uniform")
    with build(tmp_path / "uni", gf, gw, kind="hnsw", weighting="uniform") as uni:
        hits = uni.search(qf, qw, 10, candidates=10, passes=1, ef=len(gf))
        assert (hits.ids == ref_u).all() and np.allclose(hits.dists, ref_ud, atol=1e-6)
        # the stored weights are the learned ones (drawn beside the images), not 1/P
        assert np.allclose(hits.weights[0, 0], gw[ref_u[0, 0]].numpy())


def test_second_pass_recovers_what_the_weight_mismatch_hides(tmp_path):
    """A query trusting only its first stripe, a gallery trusting mostly its last one: the index
    score (similarity x cos of the weights) buries the true nearest; the later passes find it."""
    emb, w, _ = features(40, 10, seed=7, occluded=0.0)
    qf, qw = emb[:1].clone(), torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    w = w.clone()
    w[1:10] = torch.tensor([0.05, 0.05, 0.05, 0.85])        # the query's own person, other stripes trusted
    ref, _ = exact(qf, qw, emb[1:], w[1:])
    with build(tmp_path / "ix", emb[1:], w[1:], kind="hnsw") as idx:     # ef = all: the scores' own order
        one = idx.search(qf, qw, 10, candidates=20, passes=1, ef=len(emb))
        more = idx.search(qf, qw, 10, candidates=20, ef=len(emb))   # up to 3 passes, while the 10th best improves
    assert len(set(one.ids[0]) & set(ref[0])) < 10          # the damped scores miss some
    assert (more.ids == ref).all()


def test_weight_cones_bound_every_images_weight_cosine_from_below():
    """WeightCones.lower is at most the smallest cos(w(q), w(g)) of the gallery for every query,
    also after images of other weights join, and not far below it."""
    g = torch.Generator().manual_seed(3)
    w = torch.softmax(0.5 * torch.randn(2000, 6, generator=g), 1).numpy()
    q = torch.softmax(torch.randn(300, 6, generator=g), 1).numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    exact_min = (unit(q) @ unit(w).T).min(1)
    one = exact_min - gi.WeightCones(w, cones=1).lower(q)
    cones = gi.WeightCones(w, cones=32)
    gap = exact_min - cones.lower(q)
    assert (gap >= -1e-6).all() and (one >= -1e-6).all()
    assert gap.mean() < 0.12 < one.mean()              # more cones, a tighter bound (measured: 0.09, 0.26)
    odd = np.zeros((3, 6), np.float32)
    odd[:, 0] = 1                                     # one stripe only: far from every cone
    cones.add(odd)
    both = np.concatenate([w, odd])
    assert (cones.lower(q) <= (unit(q) @ unit(both).T).min(1) + 1e-6).all()
    assert (gi.WeightCones(np.zeros((4, 6), np.float32)).lower(q) == 1).all()   # no weighted image: nothing to bound


def test_unseen_bound_is_the_best_similarity_a_pass_can_have_missed():
    tau, low, cos = np.array([0.0, 0.0, 0.5, 0.5]), np.array([0.4, -0.2, 0.1, np.inf]), np.array([0.8, 0.8, 0.5, 0.9])
    assert np.allclose(gi.unseen_bound(tau, low, cos), [0.5, -0.2, 0.7, np.inf])
    assert gi.unseen_bound(np.zeros(1), np.array([0.3]), np.zeros(1))[0] == np.inf      # no bound on the weights


def test_later_passes_run_only_where_an_unseen_image_could_still_win(data, tmp_path, monkeypatch):
    """Every image weighing its stripes alike (not uniformly): the score is the similarity, nothing
    the first pass left out can beat its 10th best, so one pass; the weight mismatch of the
    second-pass test needs more."""
    qf, _, gf, _ = data
    same = torch.tensor([0.4, 0.3, 0.2, 0.1])
    qw, gw = same.expand(len(qf), -1).clone(), same.expand(len(gf), -1).clone()
    ref, _ = exact(qf, qw, gf, gw)

    def counted(idx):
        calls, real = [], idx.engine.search
        monkeypatch.setattr(idx.engine, "search", lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw))
        return calls

    with build(tmp_path / "same", gf, gw, kind="hnsw") as idx:
        calls = counted(idx)
        hits = idx.search(qf, qw, 10, candidates=50, ef=len(gf))
    assert calls == [len(qf)] and (hits.ids == ref).all()
    emb, w, _ = features(40, 10, seed=7, occluded=0.0)
    w = w.clone()
    w[1:10] = torch.tensor([0.05, 0.05, 0.05, 0.85])
    with build(tmp_path / "mismatch", emb[1:], w[1:], kind="hnsw") as idx:
        calls = counted(idx)
        idx.search(emb[:1], torch.tensor([[0.97, 0.01, 0.01, 0.01]]), 10, candidates=20, ef=len(emb))
    assert len(calls) >= 2


def test_ivf_and_hnsw_rank_exactly_when_searched_exhaustively(data, tmp_path):
    qf, qw, gf, gw = data
    ref, ref_d = exact(qf, qw, gf, gw)
    with build(tmp_path / "ivf", gf, gw, kind="ivf") as idx:
        assert idx.kind == "ivf"
        hits = idx.search(qf, qw, 10, nprobe=10_000, candidates=len(gf))
        assert idx.meta["nlist"] >= 16 and (hits.ids == ref).all() and np.allclose(hits.dists, ref_d, atol=1e-6)
    with build(tmp_path / "hnsw", gf, gw, kind="hnsw") as idx:
        hits = idx.search(qf, qw, 10, ef=len(gf), candidates=len(gf))
        assert (hits.ids == ref).all()


def test_ivfpq_rescores_its_candidates_from_the_float16_store(data, tmp_path):
    qf, qw, gf, gw = data
    ref, ref_d = exact(qf, qw, gf, gw)
    folder = tmp_path / "pq"
    everything = dict(nprobe=10_000, candidates=len(gf))
    with build(folder, gf, gw, kind="ivfpq", store="float16") as idx:
        stored = idx.search(qf, qw, 10, **everything)
        coded = idx.search(qf, qw, 10, rescore="index", **everything)
        err_store = np.abs(stored.dists - ref_d).max()
        assert err_store < 2e-3                                 # float16 vectors, exact weights
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(stored.ids.tolist(), ref.tolist())])
        assert overlap >= 0.95
        assert np.abs(coded.dists - exact_at(qf, qw, gf, gw, coded.ids)).max() > err_store   # PQ scores: coarser
        idx.remove(ids=[int(ref[0, 0])])
    committed = (folder / gi.STORE).stat().st_size
    assert committed == len(gf) * gi.vector_dim(P, D) * 2
    idx = gi.GalleryIndex.open(folder, ALPHA, write=True)
    idx.add(gf[:5], gw[:5])                                     # appended to vectors.f16, never saved
    idx.close()
    assert (folder / gi.STORE).stat().st_size > committed
    with gi.GalleryIndex.open(folder, ALPHA, write=True) as again:   # the uncommitted rows are cut
        assert (folder / gi.STORE).stat().st_size == committed and len(again) == len(gf) - 1
        top = again.search(qf[:1], qw[:1], 10, **everything)
        assert int(ref[0, 0]) not in top.ids[0] and top.ids[0, 0] == ref[0, 1]


def exact_at(qf, qw, gf, gw, ids):
    """The evaluator's distances of each query to the images ``ids`` (Q,k)."""
    return evaluate.weighted_distance(qf, qw, gf, gw).gather(1, torch.from_numpy(ids)).numpy()


# --------------------------------------------------------------------------- changes in place
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_add_and_remove_without_rebuild(data, tmp_path, kind):
    qf, qw, gf, gw = data
    folder = tmp_path / "ix"
    idx = gi.GalleryIndex.create(folder, ALPHA, parts=P, dim=D, kind=kind, log=lambda m: None)
    if kind == "ivf":
        idx.train(gf, gw)                                   # lists trained once, on a sample
    idx.add(gf[:400], gw[:400], [f"img{i}" for i in range(400)])
    engine_index = idx.engine.index

    def centroids():
        q = faiss.extract_index_ivf(engine_index).quantizer
        return q.reconstruct_n(0, q.ntotal)

    before = centroids() if kind == "ivf" else None
    ids = idx.add(gf[400:], gw[400:], [f"img{i}" for i in range(400, len(gf))])
    assert ids.tolist() == list(range(400, len(gf))) and len(idx) == len(gf)
    gone = [3, 77, 401, 500]
    assert idx.remove(ids=gone[:2]) == 2 and idx.remove(names=["img401", "img500", "nobody"]) == 2
    assert len(idx) == len(gf) - 4
    assert idx.engine.index is engine_index                  # the same faiss index: no rebuild
    if kind == "ivf":                                        # the lists were not re-trained
        assert np.array_equal(centroids(), before) and engine_index.ntotal == len(gf) - 4
    else:
        assert idx.engine.tombstones() == 4                  # tombstones: filtered, the graph kept
    keep = np.setdiff1d(np.arange(len(gf)), gone)
    ref, ref_d = exact(qf, qw, gf[keep], gw[keep])
    effort = {"nprobe": 10_000} if kind == "ivf" else {"ef": 2000}

    def check(ix):
        hits = ix.search(qf, qw, 10, candidates=len(gf), **effort)
        assert not set(gone) & set(hits.ids.ravel().tolist())
        assert (hits.ids == keep[ref]).all() and np.allclose(hits.dists, ref_d, atol=1e-6)

    check(idx)
    idx.save()
    idx.close()
    with gi.GalleryIndex.open(folder, ALPHA) as again:       # the committed version answers the same
        assert len(again) == len(gf) - 4 and again.kind == kind
        check(again)
    names = {p.name for p in folder.iterdir()}
    assert {"meta.json", "index.1.faiss", "rows.1.npz", "names.1.json"} <= names


def test_auto_index_grows_from_flat_and_keeps_its_ids(data, tmp_path, monkeypatch):
    qf, qw, gf, gw = data
    monkeypatch.setattr(gi, "FLAT_MAX", 300)
    with gi.GalleryIndex.create(tmp_path / "ix", ALPHA, parts=P, dim=D, log=lambda m: None) as idx:
        idx.add(gf[:200], gw[:200])
        idx.save()
        assert idx.kind == "flat"
        idx.add(gf[200:], gw[200:])
        idx.remove(ids=[5])
        idx.save()                                          # 863 images: past FLAT_MAX, re-indexed
        assert idx.kind == "hnsw" and len(idx) == len(gf) - 1
        keep = np.setdiff1d(np.arange(len(gf)), [5])
        ref, _ = exact(qf, qw, gf[keep], gw[keep])
        assert (idx.search(qf, qw, 10, ef=2000, candidates=len(gf)).ids == keep[ref]).all()


# --------------------------------------------------------------------------- the folder
def test_a_failed_save_leaves_the_last_version_and_no_temp_files(data, tmp_path, monkeypatch):
    _, _, gf, gw = data
    folder = tmp_path / "ix"
    with build(folder, gf[:100], gw[:100]) as idx:
        pass                                                 # saved on a clean exit: version 1
    idx = gi.GalleryIndex.open(folder, ALPHA, write=True)
    idx.add(gf[100:], gw[100:])
    real = gi.atomic_write_text

    def crash(path, text):
        if Path(path).name == gi.META:                       # the commit point itself fails
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(gi, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        idx.save()
    monkeypatch.setattr(gi, "atomic_write_text", real)
    idx.close(discard=True)
    assert folder.is_dir()                                   # a committed index is never removed
    with gi.GalleryIndex.open(folder, ALPHA) as again:
        assert len(again) == 100 and again.meta["version"] == 1
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp") or ".2." in p.name]   # v2 never committed


def test_a_new_index_that_fails_is_removed_and_leftovers_are_cleaned(data, tmp_path):
    _, _, gf, gw = data
    folder = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with build(folder, gf[:50], gw[:50]):
            raise RuntimeError("stopped")
    assert not folder.exists()
    # a build killed before its first save leaves our files only: the next create removes them
    folder.mkdir()
    (folder / "index.1.faiss").write_bytes(b"half")
    (folder / gi.STORE).write_bytes(b"x")
    said = []
    gi.GalleryIndex.create(folder, ALPHA, parts=P, dim=D, log=said.append).close()
    assert any("leftovers" in s for s in said) and not (folder / "index.1.faiss").exists()
    # a folder holding anything else is refused, nothing deleted
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("keep me")
    with pytest.raises(UserError, match="not empty and not a gallery index.*chapter1.tex"):
        gi.GalleryIndex.create(other, ALPHA, parts=P, dim=D)
    assert (other / "chapter1.tex").read_text() == "keep me"
    with pytest.raises(UserError, match="not a gallery index"):
        gi.GalleryIndex.open(other)


def test_an_index_refuses_another_runs_features_and_names_both(data, tmp_path):
    _, _, gf, gw = data
    with build(tmp_path / "ix", gf[:50], gw[:50]):
        pass
    with pytest.raises(UserError) as err:
        gi.GalleryIndex.open(tmp_path / "ix", BETA)
    msg = str(err.value)
    assert "run 'alpha' (last.pt, epoch 3, checkpoint aaaaaaaaaaaa)" in msg
    assert "run 'beta' (last.pt, epoch 5, checkpoint bbbbbbbbbbbb)" in msg and "checkpoint_sha256" in msg
    # the same checkpoint elsewhere (a copied run) is the same features
    with gi.GalleryIndex.open(tmp_path / "ix", dict(ALPHA, run="alpha-copy", path="/elsewhere")) as idx:
        assert len(idx) == 50
    # one writer at a time
    with gi.GalleryIndex.open(tmp_path / "ix", ALPHA, write=True):
        with pytest.raises(UserError, match="being changed by process"):
            gi.GalleryIndex.open(tmp_path / "ix", ALPHA, write=True)


# --------------------------------------------------------------------------- open set
def test_a_threshold_answers_nobody_instead_of_a_stranger(data, tmp_path):
    qf, qw, gf, gw = data
    _, ref_d = exact(qf, qw, gf, gw)
    stranger_f, stranger_w, _ = features(3, 1, seed=99)       # people the gallery does not hold
    with build(tmp_path / "ix", gf, gw) as idx:
        far = float(exact(stranger_f, stranger_w, gf, gw)[1][:, 0].min())
        assert ref_d[0, 0] < far                              # the data: a mate is nearer than any stranger
        t = (float(ref_d[0, 0]) + far) / 2
        known = idx.search(qf[:1], qw[:1], 10, threshold=t)
        assert known.matches(0) and all(d < t for _, _, d in known.matches(0))
        assert known.within()[0].sum() == (ref_d[0] < t).sum()
        nobody = idx.search(stranger_f, stranger_w, 10, threshold=t)
        assert [nobody.matches(i) for i in range(3)] == [[], [], []]
        assert (nobody.dists[:, 0] >= t).all() and (nobody.ids[:, 0] >= 0).all()   # ranked, but no answer


# --------------------------------------------------------------------------- Milvus
def test_milvus_lite_round_trip_ranks_like_faiss(data, tmp_path):
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install -r requirements-search.txt)")
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install -r requirements-search.txt)")
    qf, qw, gf, gw = data
    names = [f"cam{i % 3}/img {i}.jpg" for i in range(len(gf))]
    names[7] = 'odd "name" \\ é.jpg'
    ref, ref_d = exact(qf, qw, gf, gw)
    folder = tmp_path / "mv"
    try:
        idx = gi.GalleryIndex.create(folder, ALPHA, parts=P, dim=D, backend="milvus", log=lambda m: None)
    except UserError as exc:
        if "cannot reach Milvus" in str(exc):
            pytest.skip(f"Milvus Lite cannot start here: {exc}")
        raise
    with idx:
        idx.add(gf, gw, names)
        hits = idx.search(qf, qw, 10, candidates=len(gf))
        assert [[names.index(n) for n in row] for row in hits.names] == ref.tolist()
        assert np.allclose(hits.dists, ref_d, atol=1e-5)
        assert idx.remove(names=[names[7], names[ref[0, 0]]]) == 2 and len(idx) == len(gf) - 2
    with gi.GalleryIndex.open(folder, ALPHA) as again:
        assert again.meta["backend"] == "milvus" and len(again) == len(gf) - 2
        top = again.search(qf[:1], qw[:1], 10, candidates=len(gf)).names[0]
        assert names[ref[0, 0]] not in top and top[0] == names[ref[0, 1]]
    meta = json.loads((folder / gi.META).read_text())
    meta["identity"] = BETA                                   # the collection still knows its run
    (folder / gi.META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="Milvus collection.*run 'alpha'"):
        gi.GalleryIndex.open(folder, BETA)


# --------------------------------------------------------------------------- a tiny run end to end
@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    """A one-epoch tiny run that held 30 % of its training ids out (--val_ids 0.3)."""
    import train
    from test_pipeline import tiny_opts

    runs = tmp_path_factory.mktemp("runs")
    train.train(tiny_opts(synthetic_dir, runs, "run", "--epochs", "1", "--val_ids", "0.3"))
    return runs / "run"


def _ranked(out: str):
    return [(float(d), p) for d, p in re.findall(r"^\s*\d+\s+([0-9.]+)\s+(.+)$", out, re.M)]


def test_calibrate_then_search_an_index_with_demo(run, synthetic_dir, tmp_path, capsys):
    import results

    base = ["--name", "run", "--runs_dir", str(run.parent), "--workers", "0"]
    with pytest.raises(UserError, match="--split val"):
        results.run_test(results.build_parser().parse_args(base + ["--calibrate", "0.05"]))
    out = results.run_test(results.build_parser().parse_args(base + ["--split", "val", "--calibrate", "0.05"]))
    rec = json.loads((run / "threshold.json").read_text())
    q, g = out["features"]["query"], out["features"]["gallery"]
    dist = evaluate.weighted_distance(q["emb"], q["weights"], g["emb"], g["weights"])
    impostor = dist[q["pids"][:, None] != g["pids"][None, :]]
    assert rec["threshold"] == pytest.approx(evaluate.threshold_at_fmr(impostor, 0.05), abs=1e-6)
    assert rec["fmr"] == 0.05 and rec["identity"]["epoch"] == 1 and rec["weighting"] == "adaptive"
    printed = capsys.readouterr().out
    assert "open set: TMR" in printed and "@ FMR 1%" in printed and "@ FMR 0.1%" in printed and "calibrated" in printed

    src = sorted((synthetic_dir / "bounding_box_test").glob("*.jpg"))
    folder = tmp_path / "cams"
    (folder / "b").mkdir(parents=True)
    for i, p in enumerate(src[:24]):
        shutil.copyfile(p, folder / ("b" if i % 2 else "") / f"crop {i}.jpg")
    query = src[30]
    idx = tmp_path / "index"
    demo_base = ["--name", "run", "--runs_dir", str(run.parent), "--device", "cpu"]
    assert demo.main(demo_base + ["--gallery", str(folder), "--index", str(idx)]) == 0
    assert "24 added, 0 removed, 0 unchanged" in capsys.readouterr().out
    (folder / "crop 2.jpg").unlink()
    shutil.copyfile(src[25], folder / "b" / "new.jpg")
    assert demo.main(demo_base + ["--gallery", str(folder), "--index", str(idx)]) == 0
    assert "1 added, 1 removed, 23 unchanged" in capsys.readouterr().out

    # the index answers what the exact folder search answers
    args = demo_base + ["--query", str(query), "--topk", "5", "--threshold", "none"]
    assert demo.main(args + ["--index", str(idx)]) == 0
    from_index = _ranked(capsys.readouterr().out)
    assert demo.main(args + ["--gallery", str(folder), "--no_cache"]) == 0
    from_folder = _ranked(capsys.readouterr().out)
    assert [p for _, p in from_index] == [p for _, p in from_folder] and len(from_index) == 5
    assert np.allclose([d for d, _ in from_index], [d for d, _ in from_folder], atol=2e-4)
    assert demo.main(args + ["--index", str(idx), "--passes", "0"]) == 2
    assert "--passes 0: must be at least 1" in capsys.readouterr().err

    # open set: the run's threshold by default; a threshold below every distance: nobody
    assert demo.main(demo_base + ["--query", str(query), "--index", str(idx)]) == 0
    out = capsys.readouterr().out
    assert f"threshold d < {rec['threshold']:.4f}: false-match rate 5%" in out
    assert all(d < rec["threshold"] for d, _ in _ranked(out))
    assert demo.main(demo_base + ["--query", str(query), "--index", str(idx), "--threshold", "0.00001"]) == 0
    out = capsys.readouterr().out
    assert "no match within the threshold (d < 0.0000)" in out and not _ranked(out)

    # another checkpoint: the index and the threshold refuse it, naming the runs
    other = run.parent / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("*.lock"))
    ckpt = load_checkpoint(other / "last.pt")
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key] = ckpt["model"][key] + 1
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, other / "last.pt")
    assert demo.main(["--name", "other"] + demo_base[2:] + ["--query", str(query), "--index", str(idx),
                                                             "--threshold", "none"]) == 2
    err = capsys.readouterr().err
    assert "holds features of run 'run'" in err and "these come from run 'other'" in err
    assert demo.main(["--name", "other"] + demo_base[2:] + ["--query", str(query), "--gallery", str(folder)]) == 2
    assert "threshold.json was calibrated for run 'run'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the benchmark
def test_index_speed_bench_measures_recall_against_the_exact_ranking(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import index_speed

    out = tmp_path / "bench.json"
    rows = index_speed.run(index_speed.build_parser().parse_args(
        ["--sizes", "1500", "--kinds", "flat", "ivf", "--queries", "8", "--parts", "3", "--dim", "16",
         "--chunk", "400", "--nprobe", "1", "10000", "--per_id", "5", "--json", str(out),
         "--workdir", str(tmp_path / "w")]), log=lambda m: None)
    rec = json.loads(out.read_text())
    assert rec["rows"] == rows and [r["kind"] for r in rows] == ["flat", "ivf", "ivf"]
    flat, ivf1, ivf_all = rows
    assert flat["recall10"] == 1.0 and ivf_all["recall10"] == 1.0     # exhaustive: the exact ranking
    assert ivf1["recall10"] < 1.0                                      # one list of many: it shows
    assert all(r["exact_batch1_ms"] > 0 and r["index_mib"] > 0 and r["build_s"] > 0 for r in rows)
    assert not (tmp_path / "w" / "faiss_flat_1500").exists()           # index folders removed unless --keep


def test_fitted_synthetic_features_lie_where_the_real_ones_do():
    sys.path.insert(0, str(REPO / "bench"))
    import index_speed

    # "real" features: 40 identities of 5 images along 6 directions of 128 values, half zero
    g = torch.Generator().manual_seed(0)
    pids = torch.arange(200) // 5
    basis = torch.randn(6, 128, generator=g)
    centre = torch.randn(40, 6, generator=g)
    x = torch.relu((centre[pids] + 0.3 * torch.randn(200, 6, generator=g)) @ basis)
    emb, w = x.reshape(200, 2, 64), torch.softmax(torch.randn(200, 2, generator=g), 1)
    fitted = index_speed.Synthetic.fitted(emb, w, pids, per_id=5)
    generic = index_speed.Synthetic(2, 64, per_id=5)
    real_x = evaluate.index_vectors(emb, w)[0]
    for gen, near in ((fitted, True), (generic, False)):
        e, ws, _ = gen.chunk(0, 2000)
        assert e.shape == (2000, 2, 64) and (e >= 0).all()
        # every real image has synthetic neighbours about as near as its real ones
        nn_syn = (real_x @ evaluate.index_vectors(e, ws)[0].T).max(1).values.mean()
        nn_real = (real_x @ real_x.T).fill_diagonal_(-1).max(1).values.mean()
        assert (nn_syn > nn_real - 0.15) == near, (gen.kind, float(nn_syn), float(nn_real))
    # what the bench logs: seen from real queries, how near the synthetic images come
    real = (emb[::10], w[::10], emb[pids % 10 < 5], w[pids % 10 < 5])
    near, far = index_speed.likeness(fitted, real, 2000), index_speed.likeness(generic, real, 2000)
    assert near["top1_cos_synthetic"] > far["top1_cos_synthetic"] + 0.2
    assert near["synthetic_share_of_top10"] > 0.5 and far["synthetic_share_of_top10"] < 0.05
    e = fitted.chunk(0, 2000)[0]
    assert abs(float((e == 0).float().mean()) - float((x == 0).float().mean())) < 0.03   # zeros as real
    assert {tuple(r) for r in fitted.chunk(0, 50)[1].tolist()} <= {tuple(r) for r in w.tolist()}
    with pytest.raises(UserError, match="--synthetic fitted: needs --features"):
        index_speed.run(index_speed.build_parser().parse_args(["--synthetic", "fitted", "--json", ""]))


def test_int8_features_do_not_mix_with_fp32_ones(tmp_path):
    import gallery_index as GI

    (tmp_path / "last.pt").write_bytes(b"weights")
    kw = dict(epoch=1, flip=True, height=64, width=32, parts=4, embed_dim=16)
    fp32 = GI.run_identity_of(tmp_path, "last", **kw)
    int8 = GI.run_identity_of(tmp_path, "last", precision="int8", **kw)
    assert GI.identity_differs(fp32, int8) == ["precision"]
    assert GI.identity_differs(fp32, GI.run_identity_of(tmp_path, "last", **kw)) == []
    assert GI.describe_identity(int8).endswith(", int8)") and not GI.describe_identity(fp32).endswith("int8)")


def test_index_speed_partial_only_keeps_the_queries_the_benchmark_cut(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import index_speed

    root = tmp_path / "bench"
    root.mkdir()
    names = [f"query/000{i}_c1s1_000001_00.jpg" for i in range(4)]
    cut = {names[1]: {"kind": "top", "box": [0, 0, 0.6, 1]}, names[3]: {"kind": "side", "box": [0, 0.2, 1, 0.8]}}
    (root / "partial.json").write_text(json.dumps({"images": {n: cut.get(n) for n in names}}))
    emb = torch.arange(4.0)[:, None, None].expand(4, 2, 3).clone()
    part = {"emb": emb, "weights": torch.full((4, 2), 0.5), "pids": torch.arange(4), "cams": torch.ones(4),
            "paths": [str(root / n) for n in names]}
    feats = tmp_path / "features.pt"
    torch.save({"data_root": str(root), "query": part, "gallery": part}, feats)
    q = index_speed._load_real(feats, 10, partial_only=True)[0]
    assert q[:, 0, 0].tolist() == [1.0, 3.0]                           # the cut queries, in order
    assert index_speed._load_real(feats, 10)[0].shape[0] == 4
    (root / "partial.json").unlink()
    with pytest.raises(UserError, match="holds no partial.json"):
        index_speed._load_real(feats, 10, partial_only=True)
