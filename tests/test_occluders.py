"""occluders.py and the patch occluder of datasets.TrainTransform: shapes, fill sources,
visibility maps, and the prepare.py --occlude benchmark builder."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import converters as C
import datasets as D
import occluders as O
import prepare
from conftest import make_tree
from utils import UserError

QUERY, GALLERY = "query", "bounding_box_test"
H, W = 64, 32
BASE = (120, 120, 120)


def norm(rgb) -> torch.Tensor:
    """An RGB colour as TrainTransform normalises it, (3, 1, 1)."""
    t = D.TestTransform(H, W)
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) - t.mean) / t.std


def anchored_edges(alpha: torch.Tensor) -> set:
    """The edges ('top', 'bottom', 'left', 'right') a mask rises from: alpha > 0 on that edge
    and non-increasing along every line going away from it."""
    views = {"top": alpha, "bottom": alpha.flip(0), "left": alpha.t(), "right": alpha.t().flip(0)}
    return {edge for edge, a in views.items() if (a[0] > 0).any() and (a[1:] <= a[:-1] + 1e-6).all()}


# --------------------------------------------------------------------------- soft_alpha (training)
def test_soft_alpha_is_soft_anchored_and_deterministic():
    soft_seen = 0
    for seed in range(60):
        torch.manual_seed(seed)
        a = O.soft_alpha(H, W)
        torch.manual_seed(seed)
        assert torch.equal(O.soft_alpha(H, W), a)
        assert a.shape == (H, W) and a.dtype == torch.float32
        assert 0 <= float(a.min()) and float(a.max()) == 1.0          # fully hidden somewhere
        assert anchored_edges(a), seed
        soft_seen += bool(((a > 0) & (a < 1)).any())
    assert soft_seen == 60                                            # every mask has a feathered edge


@pytest.mark.parametrize("anchor,max_depth", [("bottom", 0.3), ("top", 0.55), ("left", 0.55)])
def test_soft_alpha_depth_bounds(monkeypatch, anchor, max_depth):
    # boundary = depth * (1 + wave) * taper, |wave| <= 3 * 0.12, taper <= 1, alpha > 0 up to
    # soft/2 <= 2 px past it; depth in [0.2, max_depth] of the height (top/bottom) or
    # [0.25, 0.6] of the width (sides). So the occluded extent from the edge lies within
    # [lo * 0.64 * across - 1, hi * 1.36 * across + 2] (the lower bound at the taper's centre).
    monkeypatch.setattr(O, "TRAIN_ANCHORS", {anchor: 1.0})
    across = H if anchor in ("top", "bottom") else W
    lo, hi = (0.2, max_depth) if anchor in ("top", "bottom") else (0.25, 0.6)
    for seed in range(40):
        torch.manual_seed(seed)
        a = O.soft_alpha(H, W, max_depth=max_depth)
        assert anchor in anchored_edges(a), seed
        lines = a if anchor in ("top", "bottom") else a.t()
        extent = int((lines > 0).any(1).sum())
        assert lo * 0.64 * across - 1 <= extent <= hi * 1.36 * across + 2, (seed, extent)


# --------------------------------------------------------------------------- patch occluder in TrainTransform
@pytest.fixture()
def bank(tmp_path):
    """Constant-colour images as an occluder bank: three of pid 1, one each of pids 2 and 3."""
    colours = {"a": ((250, 0, 0), 1), "b": ((0, 250, 0), 1), "c": ((0, 0, 250), 1),
               "d": ((250, 250, 0), 2), "e": ((0, 250, 250), 3)}
    out = []
    for name, (rgb, pid) in colours.items():
        p = tmp_path / f"{name}.png"
        Image.new("RGB", (W, H), rgb).save(p)
        out.append((str(p), pid, rgb))
    return out


def patch_transform(bank_items, **kw):
    opts = dict(pad=0, flip=False, erasing_prob=0.0, occlude_prob=1.0, occluder="patch",
                occluder_bank=[(p, pid) for p, pid, _ in bank_items])
    opts.update(kw)
    return D.build_transforms(H, W, train=True, **opts)


def fill_colour(x, vis, bank_items):
    """The bank entry whose colour explains x exactly as x0 * vis + colour * (1 - vis)."""
    x0 = norm(BASE)
    fits = [(p, pid, rgb) for p, pid, rgb in bank_items
            if torch.allclose(x, x0 * vis + norm(rgb) * (1 - vis), atol=1e-4)]
    assert len(fits) == 1, [f[2] for f in fits]
    return fits[0]


def test_patch_occluder_blends_another_identity_by_exactly_the_visibility(bank):
    img = Image.new("RGB", (W, H), BASE)
    t = patch_transform(bank)
    x0 = norm(BASE)
    pids_used, soft = set(), 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, vis = t(img, 1)
        assert x.shape == (3, H, W) and vis.shape == (H, W)
        assert ((vis >= 0) & (vis <= 1)).all() and (vis < 1).any()
        # unchanged where visible, the bank colour where fully hidden, the blend in between
        torch.testing.assert_close(x[:, vis == 1], x0.view(3, 1).expand(3, int((vis == 1).sum())))
        _, pid, rgb = fill_colour(x, vis, bank)
        if (vis == 0).any():
            torch.testing.assert_close(x[:, vis == 0], norm(rgb).view(3, 1).expand(3, int((vis == 0).sum())))
        assert pid != 1, seed                                         # never the image's own identity
        pids_used.add(pid)
        soft += bool(((vis > 0) & (vis < 1)).any())
        hidden = vis < 1                                              # rises from a border
        assert hidden[0].any() or hidden[-1].any() or hidden[:, 0].any() or hidden[:, -1].any(), seed
        torch.manual_seed(seed)
        x2, vis2 = t(img, 1)
        assert torch.equal(x, x2) and torch.equal(vis, vis2)
    assert pids_used == {2, 3} and soft == 40


def test_patch_occluder_with_only_its_own_identity_in_the_bank_still_occludes(bank):
    own = [b for b in bank if b[1] == 1]
    t = patch_transform(own)
    torch.manual_seed(0)
    x, vis = t(Image.new("RGB", (W, H), BASE), 1)
    assert (vis < 1).any() and fill_colour(x, vis, own)[1] == 1


def test_band_and_both_occluders(bank):
    img = Image.new("RGB", (W, H), BASE)
    band = D.build_transforms(H, W, train=True, pad=0, flip=False, erasing_prob=0, occlude_prob=1.0,
                              occluder="band", occlude_max=0.4)
    for seed in range(20):
        torch.manual_seed(seed)
        _, vis = band(img)
        rows = (vis == 0).all(1)
        assert set(vis.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(rows, (vis == 0).any(1))                   # full width
        idx = rows.nonzero().flatten()
        assert int(H * 0.15) <= len(idx) <= int(H * 0.4)
        assert idx[0] == 0 or idx[-1] == H - 1                        # top or bottom
        assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[-1]) + 1))
    both = patch_transform(bank, occluder="both")
    kinds = set()
    for seed in range(30):
        torch.manual_seed(seed)
        _, vis = both(img, 1)
        kinds.add("patch" if ((vis > 0) & (vis < 1)).any() else "band")
    assert kinds == {"patch", "band"}


def test_occluder_options_are_checked():
    with pytest.raises(UserError, match="--occluder people: expected one of patch, band, both"):
        D.build_transforms(H, W, train=True, occluder="people")
    with pytest.raises(UserError, match="--occluder patch needs training images"):
        D.build_transforms(H, W, train=True, occluder="patch", occlude_prob=0.5)


# --------------------------------------------------------------------------- hard_alpha (test benchmark)
def test_hard_alpha_binary_bounded_and_deterministic():
    rng = np.random.default_rng(0)
    masks = [O.hard_alpha(128, 64, rng) for _ in range(300)]
    again = np.random.default_rng(0)
    assert all(np.array_equal(m, O.hard_alpha(128, 64, again)) for m in masks)
    assert not np.array_equal(masks[0], O.hard_alpha(128, 64, np.random.default_rng(1)))
    cover = np.array([m.mean() for m in masks])
    for m in masks:
        assert m.shape == (128, 64) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
    # the largest box: a side occluder 0.6 of the width over the full height; the docstring's
    # promise: at least a fifth of the image hidden
    assert cover.min() >= 0.2 and cover.max() <= 0.6, (cover.min(), cover.max())
    rect = [m.any(1).sum() * m.any(0).sum() == m.sum() for m in masks]
    assert 0.4 < np.mean(rect) < 0.85                                 # rectangles and polygons (more often redrawn)


def test_source_box_bounds():
    for u in ([0, 0, 0, 0], [0.999, 0.999, 0.999, 0.999], [0.5, 0.2, 0.7, 0.1]):
        y0, x0, y1, x1 = O.source_box(128, 64, u)
        assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 64
        assert int(128 * 0.3) <= y1 - y0 <= int(128 * 0.7) and int(64 * 0.5) <= x1 - x0 <= 64
    assert O.source_box(128, 64, [0, 0, 0, 0]) == (0, 0, 38, 32)


# --------------------------------------------------------------------------- make_occluded
QUERIES = [f"{pid:04d}_c1s1_{i:06d}_00.png" for i, pid in enumerate([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])]
GALLERY_NAMES = [f"{pid:04d}_c2s1_{100 + i:06d}_00.png" for i, pid in enumerate([1, 2, 3, 4, 5, 0])] + \
    ["-1_c3s1_000200_00.png"]


def occ_source(root: Path) -> Path:
    """A tiny test split (lossless png, 16x32): queries (i*20, 80, 160); every gallery image
    its own colour, so an occluder's fill names its donor."""
    make_tree(root, {QUERY: QUERIES, GALLERY: GALLERY_NAMES}, size=(16, 32))
    for j, name in enumerate(GALLERY_NAMES):
        Image.new("RGB", (16, 32), (200, 10 + 30 * j, 30)).save(root / GALLERY / name)
    return root


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_make_occluded_truth_matches_the_pixels(tmp_path):
    src = occ_source(tmp_path / "src")
    out = tmp_path / "occ"
    said = []
    stats = C.make_occluded(src, out, fraction=0.5, seed=3, log=said.append)
    assert stats == {"queries": 10, "occluded": 5}
    assert said == [f"{out}: 10 queries (5 occluded), 6 gallery images from {src}"]
    assert sorted(p.name for p in out.iterdir()) == [".awpcn-prepared", GALLERY, "occlusion.json", QUERY]
    meta = json.loads((out / "occlusion.json").read_text())
    assert meta["seed"] == 3 and meta["fraction"] == 0.5
    truth = meta["images"]
    assert set(truth) == {f"{QUERY}/{n}" for n in QUERIES} | {f"{GALLERY}/{n}" for n in GALLERY_NAMES}
    for name in GALLERY_NAMES:                                        # untouched, junk included
        assert truth[f"{GALLERY}/{name}"] is None
        assert (out / GALLERY / name).read_bytes() == (src / GALLERY / name).read_bytes()
    gallery_colour = {tuple(int(v) for v in np.asarray(Image.open(src / GALLERY / n))[0, 0]): int(n.split("_")[0])
                      for n in GALLERY_NAMES}
    occluded = 0
    for name in QUERIES:
        entry = truth[f"{QUERY}/{name}"]
        before = np.asarray(Image.open(src / QUERY / name)).astype(int)
        after = np.asarray(Image.open(out / QUERY / name)).astype(int)
        if entry is None:
            assert (out / QUERY / name).read_bytes() == (src / QUERY / name).read_bytes()
            continue
        occluded += 1
        rows = np.array(entry["hidden_rows"])
        changed = (after != before).any(2)                            # (32, 16)
        assert len(rows) == 32 and changed.any()
        assert np.array_equal(rows > 0, changed.any(1))
        np.testing.assert_allclose(rows, changed.mean(1), atol=1e-3)
        donors = {tuple(int(v) for v in c) for c in after[changed]}
        assert len(donors) == 1                                       # one donor image per query
        donor_pid = gallery_colour[donors.pop()]
        assert donor_pid > 0 and donor_pid != int(name[:4])           # another identity, never junk or distractor
    assert occluded == 5
    # the benchmark reads as a test-only dataset, and its truth through the dataset helpers
    data = D.load_dataset(out, need=("query", "gallery"), log=lambda *_: None)
    assert len(data.query) == 10 and len(data.gallery) == 6
    gt = D.occlusion_truth(out)
    hidden = [D.stripe_hidden(D.occluded_rows(gt, p), 4, 32) for p, _, _ in data.query]
    assert sum(any(h) for h in hidden) == 5
    assert D.occluded_rows(gt, data.gallery[0][0]) is None


def test_make_occluded_is_deterministic_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    src = occ_source(tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    C.make_occluded(src, a, seed=1, log=lambda *_: None)
    C.make_occluded(src, b, seed=1, log=lambda *_: None)
    assert digest(a) == digest(b)
    C.make_occluded(src, b, seed=2, overwrite=True, log=lambda *_: None)
    assert digest(a) != digest(b)
    with pytest.raises(UserError, match=f"{a} already exists; pass --overwrite"):
        C.make_occluded(src, a, seed=1, log=lambda *_: None)
    for bad in (0, 1.5, -0.2):
        with pytest.raises(UserError, match=rf"--fraction {bad}: expected a fraction of the queries in \(0, 1\]"):
            C.make_occluded(src, tmp_path / "c", fraction=bad)
    # a failure midway leaves neither a temporary folder nor a damaged output
    before = digest(a)
    calls = []
    real = O.hard_alpha

    def fail_on_third(h, w, rng):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(h, w, rng)

    monkeypatch.setattr(O, "hard_alpha", fail_on_third)
    with pytest.raises(RuntimeError, match="disk on fire"):
        C.make_occluded(src, a, fraction=1.0, seed=1, overwrite=True, log=lambda *_: None)
    calls.clear()
    with pytest.raises(RuntimeError, match="disk on fire"):
        C.make_occluded(src, tmp_path / "new", fraction=1.0, log=lambda *_: None)
    assert digest(a) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "src"]


def test_prepare_occlude_cli_all_queries(tmp_path, capsys):
    src = occ_source(tmp_path / "src")
    out = tmp_path / "occ"
    assert prepare.main(["--occlude", str(src), str(out), "--fraction", "1", "--seed", "5"]) == 0
    assert "10 queries (10 occluded)" in capsys.readouterr().out
    truth = json.loads((out / "occlusion.json").read_text())["images"]
    assert all(truth[f"{QUERY}/{n}"] is not None for n in QUERIES)
    assert all(sum(truth[f"{QUERY}/{n}"]["hidden_rows"]) > 0 for n in QUERIES)
    data = D.load_dataset(out, need=("query", "gallery"), log=lambda *_: None)
    assert [Path(p).name for p, _, _ in data.query] == QUERIES
    with pytest.raises(UserError, match="test-only dataset"):
        D.load_dataset(out, log=lambda *_: None)
    assert prepare.main(["--occlude", str(src), str(out)]) == 2      # exists: refused with a message
    assert "--overwrite" in capsys.readouterr().err
    assert math.isclose(json.loads((out / "occlusion.json").read_text())["fraction"], 1.0)


def test_keep_clean_returns_the_image_before_occluder_and_erasing(bank):
    img = Image.new("RGB", (W, H), BASE)
    t = patch_transform(bank, keep_clean=True, erasing_prob=1.0)
    torch.manual_seed(0)
    x, vis, clean = t(img, 1)
    torch.testing.assert_close(clean, norm(BASE).view(3, 1, 1).expand(3, H, W))
    assert (vis < 1).any()
    # the occluded image differs from the clean one exactly where something hides the person
    assert torch.equal((x != clean).any(0), vis < 1)
    # the same draws as without keep_clean: the clean copy costs no randomness
    torch.manual_seed(0)
    x2, vis2 = patch_transform(bank, erasing_prob=1.0)(img, 1)
    assert torch.equal(x, x2) and torch.equal(vis, vis2)


def test_make_occluded_on_the_validation_ids(tmp_path, synthetic_dir):
    out = tmp_path / "val_occ"
    stats = C.make_occluded(synthetic_dir, out, fraction=1.0, seed=0, val_ids=0.25, log=lambda *_: None)
    _, val = D.carve_validation(D.load_dataset(synthetic_dir, log=lambda *_: None), 0.25)
    data = D.load_dataset(out, need=("query", "gallery"), log=lambda *_: None)
    # the held-out ids' query/gallery exactly as test.py --split val makes them, queries occluded
    assert sorted((Path(p).name, pid, c) for p, pid, c in data.query) == \
        sorted((Path(p).name, pid, c) for p, pid, c in val.query)
    assert sorted(Path(p).name for p, _, _ in data.gallery) == sorted(Path(p).name for p, _, _ in val.gallery)
    assert stats == {"queries": len(val.query), "occluded": len(val.query)}
    meta = json.loads((out / "occlusion.json").read_text())
    assert meta["val_ids"] == 0.25 and all(meta["images"][f"{QUERY}/{Path(p).name}"] for p, _, _ in val.query)
