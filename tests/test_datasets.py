"""datasets.py and prepare.py: protocol, bad input, transforms, sampler, synthetic generator."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


@pytest.mark.parametrize("case", ["missing", "layout", "name", "empty_file", "not_image", "empty_split",
                                  "symlink_loop"])
def test_bad_input_names_the_path(tmp_path, case):
    ok = {TRAIN: ["0001_c1s1_000001_00.jpg"], QUERY: ["0002_c1s1_000002_00.jpg"], GALLERY: ["0002_c2s1_000003_00.jpg"]}
    root = tmp_path / "ds"
    if case != "missing":
        make_tree(root, ok)
    bad = {"name": root / TRAIN / "person_1.jpg", "empty_file": root / QUERY / "0003_c1s1_000009_00.jpg",
           "not_image": root / GALLERY / "notes.txt"}.get(case)
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
              "empty_file": "empty file (0 bytes)", "not_image": "not an image", "empty_split": "no usable images",
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
    assert x.shape == (3, 96, 32) and torch.equal(vis, torch.ones(96))
    occ = D.build_transforms(96, 32, train=True, pad=0, erasing_prob=0, occlude_prob=1.0, occlude_max=0.4)
    for seed in range(10):
        torch.manual_seed(seed)
        x, vis = occ(img)
        hidden = (vis == 0).nonzero().flatten()
        assert len(hidden) >= int(96 * 0.15)
        assert hidden[0] == 0 or hidden[-1] == 95                   # a band at the top or the bottom
        assert torch.equal(hidden, torch.arange(hidden[0], hidden[-1] + 1))
    train_t = D.build_transforms(96, 32, train=True, occlude_prob=0.5)
    torch.manual_seed(3)
    a = train_t(img)
    torch.manual_seed(3)
    b = train_t(img)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ((a[1] >= 0) & (a[1] <= 1)).all()


def test_random_erasing_reduces_row_visibility_by_erased_width():
    img = Image.fromarray(np.full((64, 32, 3), 200, np.uint8))
    t = D.build_transforms(64, 32, train=True, pad=0, flip=False, erasing_prob=1.0)
    torch.manual_seed(0)
    x, vis = t(img)
    erased = (x.abs().sum(0) == 0)                                   # mean fill is 0 after normalising
    rows = erased.any(1)
    assert rows.any()
    torch.testing.assert_close(vis[rows], 1 - erased[rows].sum(1).float() / 32)
    assert torch.equal(vis[~rows], torch.ones(int((~rows).sum())))


def test_pk_sampler_structure_determinism_and_sharding():
    labels = [i // 5 for i in range(60)] + [12] * 2          # 13 ids, id 12 has only 2 images
    s = D.PKSampler(labels, p=4, k=3, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 62 // 12
    for b in batches:
        ids = [labels[i] for i in b]
        assert len(b) == 12 and len(set(ids)) == 4
        assert all(ids.count(x) == 3 for x in set(ids))
    assert list(D.PKSampler(labels, 4, 3, seed=1)) == batches
    s.set_epoch(1)
    assert list(s) != batches
    r0 = D.PKSampler(labels, 4, 3, seed=1, rank=0, world_size=2)
    r1 = D.PKSampler(labels, 4, 3, seed=1, rank=1, world_size=2)
    assert len(r0) == len(r1) == 2 and list(r0) + list(r1) != []
    assert list(r0) == batches[0:4:2] and list(r1) == batches[1:4:2]
    with pytest.raises(UserError, match="13 identities, fewer than P=20"):
        D.PKSampler(labels, 20, 2)


def test_occlusion_fraction():
    assert D.occlusion_fraction((0, 32), 128, 4) == [1.0, 0.0, 0.0, 0.0]
    assert D.occlusion_fraction((96, 128), 128, 2) == [0.0, 0.5]
    assert D.occlusion_fraction(None, 128, 3) == [0.0, 0.0, 0.0]


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
    before = digest(src)
    out = tmp_path / "msmt"
    assert prepare.main(["--msmt17", str(src), str(out)]) == 0
    assert digest(src) == before
    data = D.load_dataset(out, log=lambda *_: None)
    assert data.train_pids == [1, 2] and len(data.train) == 3
    assert [(pid, cam) for _, pid, cam in data.query] == [(1, 4)]
    assert [(pid, cam) for _, pid, cam in data.gallery] == [(1, 14)]
    assert prepare.main(["--msmt17", str(src), str(out)]) == 2       # refuses to overwrite
