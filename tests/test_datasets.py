"""datasets.py and prepare.py: protocol, bad input, transforms, sampler, synthetic generator."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import converters
import datasets as D
import prepare
from conftest import make_tree
from utils import UserError

TRAIN, QUERY, GALLERY = "bounding_box_train", "query", "bounding_box_test"


def test_real_market_subset_counts(market_sub):
    data = D.load_dataset(market_sub, log=lambda *_: None)
    assert data.num_train_pids == 375 and len(data.train) == 6987
    assert len(data.query) == 1666 and len(data.gallery) == 4283
    assert data.num_cams == 6
    assert sorted({label for _, label, _ in data.train}) == list(range(375))


def test_protocol_junk_distractors_relabel_and_cameras(tmp_path):
    root = make_tree(tmp_path / "ds", {
        TRAIN: ["0007_c1s1_000001_00.jpg", "0007_c2s1_000002_00.jpg", "0003_c6s1_000003_00.jpg",
                "-1_c1s1_000004_00.jpg"],
        QUERY: ["0010_c1s1_000005_00.jpg"],
        GALLERY: ["0010_c2s1_000006_00.jpg", "0000_c3s1_000007_00.jpg", "-1_c1s1_000008_00.jpg",
                  "0010_c1s1_000009_00.jpg"],
    })
    data = D.load_dataset(root, log=lambda *_: None)
    assert data.train_pids == [3, 7]
    assert [(Path(p).name[:4], label, cam) for p, label, cam in data.train] == [
        ("0003", 0, 5), ("0007", 1, 0), ("0007", 1, 1)]
    assert [pid for _, pid, _ in data.gallery] == [0, 10, 10]       # junk dropped, distractor kept
    assert [cam for _, _, cam in data.gallery] == [2, 0, 1]          # 0-based; same-camera kept for evaluate
    assert data.num_cams == 6


def test_parent_folder_is_resolved_and_named(tmp_path):
    make_tree(tmp_path / "Market-1501-v15.09.15", {TRAIN: ["0001_c1s1_000001_00.jpg"],
                                                    QUERY: ["0002_c1s1_000002_00.jpg"],
                                                    GALLERY: ["0002_c2s1_000003_00.jpg"]})
    said = []
    data = D.load_dataset(tmp_path, log=said.append)
    assert data.root == tmp_path / "Market-1501-v15.09.15"
    assert said[0] == f"using {tmp_path / 'Market-1501-v15.09.15'}"
    assert "train    |     1 |        1 |         1" in said[1]


@pytest.mark.parametrize("case", ["missing", "layout", "name", "empty_file", "empty_split", "symlink_loop"])
def test_bad_input_names_the_path(tmp_path, case):
    ok = {TRAIN: ["0001_c1s1_000001_00.jpg"], QUERY: ["0002_c1s1_000002_00.jpg"], GALLERY: ["0002_c2s1_000003_00.jpg"]}
    root = tmp_path / "ds"
    if case != "missing":
        make_tree(root, ok)
    bad = {"name": root / TRAIN / "person_1.jpg", "empty_file": root / QUERY / "0003_c1s1_000009_00.jpg"}.get(case)
    if bad is not None:
        bad.write_bytes(b"" if case == "empty_file" else b"x")
    if case == "symlink_loop":
        bad = root / TRAIN / "0005_c1s1_000010_00.jpg"
        bad.symlink_to(root / TRAIN / "0006_c1s1_000011_00.jpg")
        (root / TRAIN / "0006_c1s1_000011_00.jpg").symlink_to(bad)
    if case == "layout":
        (root / QUERY).rename(root / "queries")
    if case == "empty_split":
        for f in (root / GALLERY).iterdir():
            f.unlink()
    with pytest.raises(UserError) as err:
        D.load_dataset(root, log=lambda *_: None)
    msg = str(err.value)
    expect = {"missing": "no such folder", "layout": "missing query/", "name": "PID_cCAM",
              "empty_file": "empty file (0 bytes)", "empty_split": "no usable images",
              "symlink_loop": "symbolic links"}
    assert expect[case] in msg
    assert str(bad if bad is not None else root) in msg


def test_all_bad_files_listed_in_one_message(tmp_path):
    root = make_tree(tmp_path / "ds", {TRAIN: ["0001_c1s1_000001_00.jpg"], QUERY: ["0002_c1s1_000002_00.jpg"],
                                       GALLERY: ["0002_c2s1_000003_00.jpg"]})
    for i in range(3):
        (root / TRAIN / f"bad{i}.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=r"3 bad file\(s\)") as err:
        D.load_dataset(root, log=lambda *_: None)
    assert all(f"bad{i}.jpg" in str(err.value) for i in range(3))


def test_non_image_files_are_skipped_and_counted_but_bad_images_still_fail(tmp_path):
    # the official archives carry Thumbs.db (and a readme); macOS adds .DS_Store
    root = make_tree(tmp_path / "ds", {
        TRAIN: ["0001_c1s1_000001_00.jpg", "0001_c2s1_000002_00.jpg", "0002_c1s1_000003_00.jpg"],
        QUERY: ["0003_c1s1_000004_00.jpg"], GALLERY: ["0003_c2s1_000005_00.jpg", "0000_c3s1_000006_00.jpg"]})
    (root / GALLERY / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / QUERY / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / TRAIN / "readme.txt").write_text("Market-1501")
    said = []
    data = D.load_dataset(root, log=said.append)
    assert len(data.train) == 3 and len(data.query) == 1 and len(data.gallery) == 2
    assert said[0] == ("skipped 3 non-image files: bounding_box_train/readme.txt, query/.DS_Store, "
                       "bounding_box_test/Thumbs.db")
    ds = D.ImageDataset(data.train, D.build_transforms(32, 16, train=True))
    assert [ds[i][2] for i in range(len(ds))] == [0, 0, 1]            # the loader sees images only
    # one file: singular; many: a few named, the rest counted; hidden image-named files too
    (root / TRAIN / "readme.txt").unlink()
    (root / QUERY / ".DS_Store").unlink()
    said.clear()
    D.load_dataset(root, need=("query", "gallery"), log=said.append)
    assert said[0] == "skipped 1 non-image file: bounding_box_test/Thumbs.db"
    for name in ("a.mat", "b.txt", "c.db", "d.ini", "._0001_c1s1_000001_00.jpg", "f.xml"):
        (root / TRAIN / name).write_bytes(b"x")
    said.clear()
    D.load_dataset(root, log=said.append)
    assert said[0] == ("skipped 7 non-image files: bounding_box_train/._0001_c1s1_000001_00.jpg, "
                       "bounding_box_train/a.mat, bounding_box_train/b.txt, bounding_box_train/c.db, "
                       "bounding_box_train/d.ini and 2 more")
    # an image name that does not parse is still an error naming it ...
    (root / GALLERY / "person.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=r"1 bad file\(s\)") as err:
        D.load_dataset(root, log=lambda *_: None)
    assert f"{root / GALLERY / 'person.jpg'}: name does not match PID_cCAM" in str(err.value)
    (root / GALLERY / "person.jpg").unlink()
    # ... and so is a well-named .jpg that does not decode, when it is read and in --check
    broken = root / QUERY / "0003_c3s1_000007_00.jpg"
    broken.write_bytes(b"not a jpeg at all")
    data = D.load_dataset(root, log=lambda *_: None)                  # names only: not decoded here
    with pytest.raises(UserError, match=f"{broken}: cannot decode image"):
        D.ImageDataset(data.query, D.build_transforms(32, 16, train=False))[1]
    said.clear()
    problems = prepare.check_dataset(root, workers=1, log=said.append)
    assert len(problems) == 1 and problems[0].startswith(f"{broken}: ")
    assert any(line.startswith("skipped 7 non-image files: ") for line in said), said


def test_load_image_converts_modes_and_names_truncated_files(tmp_path):
    arr = (np.arange(16 * 8 * 3) % 255).astype(np.uint8).reshape(16, 8, 3)
    Image.fromarray(arr).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((np.arange(128).reshape(16, 8) * 500).astype(np.uint16)).save(tmp_path / "deep.png")
    for name in ("grey.png", "cmyk.jpg", "rgba.png", "deep.png"):
        img = D.load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (8, 16), name
    assert np.asarray(D.load_image(tmp_path / "deep.png")).max() > 200   # 16-bit scaled, not clipped to black
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.jpg: cannot decode"):
        D.load_image(tmp_path / "cut.jpg")


def test_transforms_shapes_visibility_and_determinism():
    img = Image.fromarray(np.full((128, 64, 3), 120, np.uint8))
    test_t = D.build_transforms(96, 32, train=False)
    x, vis = test_t(img)
    assert x.shape == (3, 96, 32) and torch.equal(vis, torch.ones(96, 32))
    # padding: the crop window of the zero-padded image; pixels from the padding are hidden and zero
    pad = D.build_transforms(96, 32, train=True, pad=10, flip=False, erasing_prob=0)
    shifted = 0
    for seed in range(10):
        torch.manual_seed(seed)
        x, vis = pad(img)
        assert vis.shape == (96, 32) and set(vis.unique().tolist()) <= {0.0, 1.0}
        rows, cols = vis.any(1).nonzero().flatten(), vis.any(0).nonzero().flatten()
        assert (rows[0] == 0 or rows[-1] == 95) and (cols[0] == 0 or cols[-1] == 31)
        assert int(vis.sum()) == len(rows) * len(cols) >= 86 * 22     # one rectangle, at most 10 px off
        assert (x[:, vis == 0] == 0).all() and (x[:, vis == 1] != 0).all()
        shifted += int(vis.sum()) < 96 * 32
    assert shifted >= 8
    train_t = D.build_transforms(96, 32, train=True, occlude_prob=0.5)
    torch.manual_seed(3)
    a = train_t(img)
    torch.manual_seed(3)
    b = train_t(img)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (96, 32) and ((a[1] >= 0) & (a[1] <= 1)).all()


def test_random_erasing_box_is_exactly_the_hidden_region():
    img = Image.fromarray(np.full((64, 32, 3), 200, np.uint8))
    t = D.build_transforms(64, 32, train=True, pad=0, flip=False, erasing_prob=1.0)
    for seed in range(10):
        torch.manual_seed(seed)
        x, vis = t(img)
        erased = x.abs().sum(0) == 0                                  # mean fill is 0 after normalising
        assert erased.any() and torch.equal(vis == 0, erased), seed
        assert set(vis.unique().tolist()) == {0.0, 1.0}
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        assert int(erased.sum()) == len(rows) * len(cols)           # a rectangle
        assert 0.02 * 64 * 32 - 64 <= int(erased.sum()) <= 0.4 * 64 * 32 + 64


def test_pk_sampler_structure_determinism_and_sharding():
    labels = [i // 5 for i in range(60)] + [12] * 2          # 13 ids, id 12 has only 2 images
    s = D.PKSampler(labels, p=4, k=3, seed=1)
    batches = list(s)
    chunks = 12 * 2 + 1                                      # ceil(5/3) per id, ceil(2/3) for id 12
    assert len(batches) == len(s) == chunks // 4 == 6
    for b in batches:
        ids = [labels[i] for i in b]
        assert len(b) == 12 and len(set(ids)) == 4
        assert all(ids.count(x) == 3 for x in set(ids))
    # an epoch deals each id's images once, give or take K per id (ids whose chunks ran out
    # are dealt afresh to fill the last batches, after every id still holding chunks)
    for seed in range(20):
        flat = [i for b in D.PKSampler(labels, 4, 3, seed=seed) for i in b]
        for pid in range(13):
            n = labels.count(pid)
            assert abs(sum(labels[i] == pid for i in flat) - 3 * -(-n // 3)) <= 3, (seed, pid)
        assert len(set(flat)) >= 62 - 5, seed
    assert list(D.PKSampler(labels, 4, 3, seed=1)) == batches
    s.set_epoch(1)
    assert list(s) != batches
    s.set_epoch(0)
    assert list(s) == batches
    assert list(D.PKSampler(labels, 4, 3, seed=2)) != batches
    # ranks take the epoch's batches round-robin, truncated to the same count
    r0 = D.PKSampler(labels, 4, 3, seed=1, rank=0, world_size=2)
    r1 = D.PKSampler(labels, 4, 3, seed=1, rank=1, world_size=2)
    assert len(r0) == len(r1) == 3
    assert list(r0) == batches[0::2] and list(r1) == batches[1::2]
    r = [list(D.PKSampler(labels, 4, 3, seed=1, rank=k, world_size=4)) for k in range(4)]
    assert [len(x) for x in r] == [1, 1, 1, 1] and [x[0] for x in r] == batches[:4]
    with pytest.raises(UserError, match="13 identities, fewer than P=20"):
        D.PKSampler(labels, 20, 2)
    with pytest.raises(UserError, match="fewer than 8 processes"):
        D.PKSampler(labels, 4, 3, world_size=8)


def test_pk_sampler_deals_exhausted_ids_afresh_to_fill_p():
    labels = [0] * 40 + [1, 2]                                   # ids 1 and 2 run out long before id 0
    s = D.PKSampler(labels, p=2, k=1, seed=0)
    batches = list(s)
    assert len(batches) == 42 // 2
    assert all(len({labels[i] for i in b}) == 2 for b in batches)
    assert sum(labels[i] == 0 for b in batches for i in b) >= 20   # id 0 fills (nearly) every batch


def test_pk_sampler_one_epoch_sees_every_image_in_proportion(market_sub):
    import collections
    import math

    data = D.load_dataset(market_sub, log=lambda *_: None)
    labels = [label for _, label, _ in data.train]
    n = collections.Counter(labels)
    p, k = 8, 4
    s = D.PKSampler(labels, p, k, seed=0)
    flat = [i for b in s for i in b]
    chunks = sum(math.ceil(c / k) for c in n.values())
    assert len(s) == chunks // p and len(flat) == len(s) * p * k
    # the committed sampler before the fix: 59 % of the images, an id with 2 images drawn as
    # often as one with 72
    assert len(set(flat)) / len(labels) >= 0.99
    draws = collections.Counter(labels[i] for i in flat)
    assert all(k * math.ceil(c / k) - k <= draws[pid] <= k * math.ceil(c / k) for pid, c in n.items())
    assert max(collections.Counter(flat).values()) <= 3       # repeats only from padding short chunks


def _many_ids(n_ids=40, seed=0) -> D.ReIDData:
    """In-memory training set: pids 3, 5, 7, ... with 2-9 images over 1-3 cameras (every
    seventh id seen by one camera only)."""
    rng = np.random.default_rng(seed)
    pids = [3 + 2 * i for i in range(n_ids)]
    train = []
    for label, pid in enumerate(pids):
        cams = [0] if label % 7 == 0 else sorted(rng.choice(6, int(rng.integers(2, 4)), replace=False).tolist())
        for j in range(int(rng.integers(2, 10))):
            cam = cams[j % len(cams)]
            train.append((f"{pid:04d}_c{cam + 1}s1_{j:06d}_00.jpg", label, cam))
    return D.ReIDData(root=Path("mem"), train=train, query=[("q.jpg", 999, 0)], gallery=[("g.jpg", 999, 1)],
                      num_train_pids=n_ids, num_cams=6, train_pids=pids)


def test_carve_validation_splits_training_ids(tmp_path):
    data = _many_ids()
    rest, val = D.carve_validation(data, 0.15, seed=0)
    pid_of = {p: int(Path(p).name[:4]) for p, _, _ in data.train}
    val_pids = {pid for _, pid, _ in val.query + val.gallery}
    assert len(val_pids) == round(0.15 * 40) == 6
    assert not val_pids & set(rest.train_pids) and len(rest.train_pids) == 34
    assert rest.train_pids == val.train_pids and rest.train == val.train and rest.num_train_pids == 34
    assert sorted({label for _, label, _ in rest.train}) == list(range(34))
    assert all(rest.train_pids[label] == pid_of[p] for p, label, _ in rest.train)    # relabelled, not mixed up
    assert rest.query == data.query and rest.gallery == data.gallery                 # test split untouched
    # nothing lost: the val ids' images all land in val query + gallery, the others in train
    assert sorted(p for p, _, _ in rest.train + val.query + val.gallery) == sorted(p for p, _, _ in data.train)
    assert all(pid_of[p] == pid and int(Path(p).name[6]) - 1 == cam for p, pid, cam in val.query + val.gallery)
    full_cams = 0
    for pid in val_pids:
        mine = [c for _, q, c in val.gallery + val.query if q == pid]
        queries = [c for _, q, c in val.query if q == pid]
        if len(set(mine)) == 1:                                       # could never match: gallery only
            assert queries == []
            continue
        assert queries and len(queries) == len(set(queries))          # at most one query per camera
        for c in queries:                                             # each with a match from another camera
            assert any(q == pid and gc != c for _, q, gc in val.gallery), (pid, c)
        if all(mine.count(c) >= 2 for c in set(mine)):                # enough images: every camera queries
            assert sorted(queries) == sorted(set(mine))
            full_cams += 1
    assert full_cams >= 1
    # the seed alone decides: not the global generators, not the call
    np.random.seed(123)
    torch.manual_seed(123)
    again = D.carve_validation(data, 0.15, seed=0)
    assert again[1].query == val.query and again[1].gallery == val.gallery and again[0].train == rest.train
    other = D.carve_validation(data, 0.15, seed=1)[1]
    assert {pid for _, pid, _ in other.query + other.gallery} != val_pids
    assert len({pid for _, pid, _ in D.carve_validation(data, 0.5, seed=0)[1].gallery}) == 20


def test_carve_validation_never_makes_a_query_without_a_match():
    # one image in each of two cameras: one query, one gallery image (not two unmatched queries);
    # cameras {1 image, 3 images}: the query from the larger camera would have no match
    train = [("0001_c1.jpg", 0, 0), ("0001_c2.jpg", 0, 1),
             ("0002_c1.jpg", 1, 0), ("0002_c2a.jpg", 1, 1), ("0002_c2b.jpg", 1, 1), ("0002_c2c.jpg", 1, 1),
             ("0003_c1.jpg", 2, 0), ("0004_c1.jpg", 3, 0)]
    data = D.ReIDData(root=Path("mem"), train=train, num_train_pids=4, num_cams=2, train_pids=[1, 2, 3, 4])
    for seed in range(10):
        rest, val = D.carve_validation(data, 0.5, seed=seed)
        for _, pid, cam in val.query:
            assert any(q == pid and c != cam for _, q, c in val.gallery), (seed, pid)
        for pid in ({1, 2} - set(rest.train_pids)):
            assert sum(q == pid for _, q, _ in val.query) == 1          # still one usable query
        assert len(val.query) + len(val.gallery) + len(rest.train) == len(train)


def test_carve_validation_single_camera_ids_go_to_the_gallery():
    data = _many_ids(14)
    # labels 0 and 7 are the single-camera ids; find a seed that picks one of them
    for seed in range(50):
        _, val = D.carve_validation(data, 0.2, seed=seed)
        single = {data.train_pids[0], data.train_pids[7]} & {pid for _, pid, _ in val.gallery}
        if single:
            break
    assert single
    for pid in single:
        assert not [q for _, q, _ in val.query if q == pid]
        assert sum(q == pid for _, q, _ in val.gallery) == sum(data.train_pids[lab] == pid for _, lab, _ in data.train)


@pytest.mark.parametrize("fraction,msg", [
    (0, r"--val_ids 0: expected a fraction of the training ids in \(0, 1\)"),
    (1, r"--val_ids 1: expected a fraction"),
    (1.5, r"--val_ids 1.5: expected a fraction"),
    (-0.1, r"--val_ids -0.1: expected a fraction"),
])
def test_carve_validation_bad_fractions(fraction, msg):
    with pytest.raises(UserError, match=msg):
        D.carve_validation(_many_ids(10), fraction)


def test_carve_validation_needs_ids_left_to_train():
    with pytest.raises(UserError, match="--val_ids 0.5: 3 training ids leave fewer than 2 to train on"):
        D.carve_validation(_many_ids(3), 0.5)
    rest, val = D.carve_validation(_many_ids(4), 0.1)                 # at least 2 val ids, 2 left
    assert rest.num_train_pids == 2 and len({pid for _, pid, _ in val.gallery}) == 2


def test_stripe_hidden_from_either_ground_truth_format():
    assert D.stripe_hidden([0, 32], 4, 128) == [1.0, 0.0, 0.0, 0.0]
    assert D.stripe_hidden([96, 128], 2, 128) == [0.0, 0.5]
    assert D.stripe_hidden(None, 3, 128) == [0.0, 0.0, 0.0]
    assert D.stripe_hidden({"hidden_rows": [1.0] * 64 + [0.25] * 64}, 2, 0) == [1.0, 0.25]
    # Pooled like the model: 128 rows -> 8 feature rows -> 6 overlapping bins; stripe 1 covers
    # feature rows 1-2 (image rows 16-48), half of them hidden by rows 0-32.
    assert D.stripe_hidden([0, 32], 6, 128, feat_rows=8) == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- prepare.py
def digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_consistent_and_checks_ok(synthetic_dir, tmp_path, capsys):
    again = tmp_path / "again"
    prepare.make_synthetic(again, ids=24, seed=0, occlusion=0.3)
    assert digest(again) == digest(synthetic_dir)
    truth = json.loads((synthetic_dir / "occlusion.json").read_text())
    files = {str(p.relative_to(synthetic_dir)) for p in synthetic_dir.rglob("*.jpg")}
    assert set(truth["images"]) == files
    occluded = [v for v in truth["images"].values() if v]
    assert 0.15 < len(occluded) / len(files) < 0.45
    assert all(v[0] == 0 or v[1] == truth["height"] for v in occluded)
    data = D.load_dataset(synthetic_dir, log=lambda *_: None)
    assert data.num_train_pids == 12 and not {p for _, p, _ in data.query} & set(data.train_pids)
    assert {0} <= {p for _, p, _ in data.gallery}
    assert prepare.main(["--check", str(synthetic_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    with pytest.raises(UserError, match="--overwrite"):
        prepare.make_synthetic(again, ids=24, seed=0)


def test_default_synthetic_plan_has_enough_queries():
    plan = prepare.plan_synthetic(300, 0)
    assert sum(1 for split, _, _ in plan if split == "query") >= 700
    train_ids = {p for s, p, _ in plan if s == "bounding_box_train"}
    test_ids = {p for s, p, _ in plan if s == "query"}
    assert len(train_ids) == 150 and len(test_ids) == 150 and not train_ids & test_ids


def test_check_lists_every_broken_file_and_fails(synthetic_dir, tmp_path, capsys):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(synthetic_dir, root)
    victim = sorted((root / QUERY).iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    (root / TRAIN / "badname.jpg").write_bytes(b"x")
    assert prepare.main(["--check", str(root)]) == 1
    out = capsys.readouterr().out
    assert str(victim) in out and "badname.jpg" in out and "2 problem(s)" in out


def test_msmt17_conversion_copies_offsets_labels_and_leaves_source(tmp_path):
    src = tmp_path / "MSMT17_V1"
    _tiny_msmt17(src)
    before = digest(src)
    out = tmp_path / "msmt"
    assert prepare.main(["--msmt17", str(src), str(out)]) == 0
    assert digest(src) == before
    data = D.load_dataset(out, log=lambda *_: None)
    assert data.train_pids == [1, 2] and len(data.train) == 3
    assert [(pid, cam) for _, pid, cam in data.query] == [(1, 4)]
    assert [(pid, cam) for _, pid, cam in data.gallery] == [(1, 14)]
    assert prepare.main(["--msmt17", str(src), str(out)]) == 2       # refuses to overwrite


def test_pid_0_and_junk_are_gallery_only_and_dropped_elsewhere_with_a_count(tmp_path):
    root = make_tree(tmp_path / "ds", {
        TRAIN: ["0000_c1s1_000001_00.jpg", "0001_c1s1_000002_00.jpg", "0001_c2s1_000003_00.jpg",
                "-1_c2s1_000004_00.jpg"],
        QUERY: ["0000_c1s1_000005_00.jpg", "0002_c1s1_000006_00.jpg"],
        GALLERY: ["0002_c2s1_000007_00.jpg", "0000_c3s1_000008_00.jpg", "0000_c1s1_000009_00.jpg"],
    })
    said = []
    data = D.load_dataset(root, log=said.append)
    # a pid-0 query would have the gallery's distractors as "true matches"; pid 0 is no training identity
    assert [pid for _, pid, _ in data.query] == [2]
    assert data.train_pids == [1] and data.num_train_pids == 1 and len(data.train) == 2
    assert [pid for _, pid, _ in data.gallery] == [0, 0, 2]          # distractors stay as negatives
    assert any(s.startswith("dropped 2 train image(s)") and "1 with pid 0 = distractor, 1 with pid -1 = junk" in s
               for s in said), said
    assert any(s.startswith("dropped 1 query image(s)") and "1 with pid 0" in s for s in said), said
    # --check reports the same usable counts as training and testing read
    out = []
    assert prepare.check_dataset(root, workers=1, log=out.append) == []
    assert "  train    |     1 |        2 |         2" in out and "  query    |     1 |        1 |         1" in out


def _tiny_msmt17(src: Path) -> None:
    lists = {"list_train.txt": ("train", ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                                          "0001/0001_003_07_0303noon_0100_1.jpg 1"]),
             "list_val.txt": ("train", ["0001/0001_004_02_0303noon_0101_1.jpg 1"]),
             "list_query.txt": ("test", ["0000/0000_000_05_0303morning_0015_0.jpg 0"]),
             "list_gallery.txt": ("test", ["0000/0000_001_15_0303morning_0016_0.jpg 0"])}
    for name, (split, lines) in lists.items():
        for line in lines:
            p = src / split / line.split()[0]
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 8)).save(p)
        (src / name).write_text("\n".join(lines) + "\n")


def test_msmt17_link_across_filesystems_falls_back_to_copy_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    import os

    src = tmp_path / "MSMT17_V1"
    _tiny_msmt17(src)
    one = src / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg"
    assert prepare.main(["--msmt17", str(src), str(tmp_path / "linked"), "--link"]) == 0
    assert one.stat().st_nlink == 2                                  # same filesystem: real hard links
    calls = []

    def cross_device(a, b, *args, **kwargs):
        calls.append(a)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(a), str(b))

    monkeypatch.setattr(converters.os, "link", cross_device)
    capsys.readouterr()
    out = tmp_path / "msmt"
    assert prepare.main(["--msmt17", str(src), str(out), "--link"]) == 0
    std = capsys.readouterr()
    assert len(calls) == 1                                           # tried once, then copied the rest
    assert "copied 5 file(s) instead" in std.out and os.strerror(errno.EXDEV) in std.out
    assert std.out.count("--link") == 1 and "Traceback" not in std.err
    data = D.load_dataset(out, log=lambda *_: None)
    assert len(data.train) == 3 and len(data.query) == 1 and len(data.gallery) == 1
    assert one.stat().st_nlink == 2                                  # the copies are not links to the source

    def other_error(a, b, *args, **kwargs):                          # not about linking: still an error
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(converters.os, "link", other_error)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        converters.convert_msmt17(src, tmp_path / "msmt_io", link=True)
    assert not (tmp_path / "msmt_io").exists()
