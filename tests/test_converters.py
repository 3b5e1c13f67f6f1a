"""converters.py through prepare.py: each source layout generated with tiny images; counts, ids,
cameras, pixels, errors; test-only sets through the reader, --check and test.py."""
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import converters
import datasets as D
import prepare
from test_datasets import digest
from utils import UserError

TRAIN, QUERY, GALLERY = "bounding_box_train", "query", "bounding_box_test"
QUIET = dict(log=lambda *_: None)


def pixels(seed, h=12, w=6):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, arr) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sources(out: Path) -> dict:
    """output relpath -> source, from OUT/sources.tsv."""
    with open(out / "sources.tsv", encoding="utf-8", newline="") as f:
        return {r["output"]: r["source"] for r in csv.DictReader(f, delimiter="\t")}


def names(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def no_leftovers(parent: Path):
    return not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------- CUHK03
# Two camera pairs (the release has five): pair 1 with 3 persons, pair 2 with 2; labels 1..5.
CUHK_PERSONS = {1: 3, 2: 2}
CUHK_EMPTY = {"labeled": {(1, 2, 4), (2, 1, 9), (2, 1, 10)}, "detected": {(1, 1, 7)}}
CUHK_TRAIN_IDS = {1, 4}


def cuhk_label(pair, person):
    return person if pair == 1 else CUHK_PERSONS[1] + person


def cuhk_image(kind, pair, person, image):
    """Distinct, non-square pixels for every cell, so a transposition or mix-up shows."""
    seed = [("labeled", "detected").index(kind), pair, person, image]
    return pixels(seed, h=10 + image % 3, w=5 + person % 2)


def write_cuhk03(root: Path, kinds=("labeled", "detected")):
    """cuhk-03.mat as MATLAB v7.3 writes it: HDF5 behind a 512-byte header, cells as object
    references, arrays column-major (a persons x 10 cell is (10, persons), an H x W x 3 image
    is (3, W, H)), empty cells as uint64 [0 0] marked MATLAB_empty."""
    import h5py
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    mat = root / "cuhk-03.mat"
    with h5py.File(mat, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        for kind in kinds:
            pair_refs = []
            for pair, n in CUHK_PERSONS.items():
                table = np.empty((10, n), dtype=h5py.ref_dtype)
                for person in range(1, n + 1):
                    for image in range(1, 11):
                        key = f"{kind}_{pair}_{person}_{image}"
                        if (pair, person, image) in CUHK_EMPTY[kind]:
                            ds = refs.create_dataset(key, data=np.zeros(2, np.uint64))
                            ds.attrs["MATLAB_empty"] = np.uint8(1)
                        else:
                            ds = refs.create_dataset(key, data=cuhk_image(kind, pair, person, image).transpose(2, 1, 0))
                        table[image - 1, person - 1] = ds.ref
                pair_refs.append(refs.create_dataset(f"{kind}_pair{pair}", data=table).ref)
            f.create_dataset(kind, data=np.array(pair_refs, dtype=h5py.ref_dtype).reshape(1, -1))
    with open(mat, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 00:00:00 2024 HDF5 schema 1.00 .")
    expected = {}
    for kind in kinds:
        files, labels, cams, split = [], [], [], {"train": [], "query": [], "gallery": []}
        for pair, n in CUHK_PERSONS.items():
            for person in range(1, n + 1):
                label, seen = cuhk_label(pair, person), set()
                for image in range(1, 11):
                    if (pair, person, image) in CUHK_EMPTY[kind]:
                        continue
                    view = 1 if image <= 5 else 2
                    files.append(f"{pair}_{person:03d}_{view}_{image:02d}.png")
                    labels.append(label)
                    cams.append(view)
                    key = "train" if label in CUHK_TRAIN_IDS else "gallery" if view in seen else "query"
                    seen.add(view)
                    split[key].append(len(files))          # 1-based, as MATLAB
        cell = np.empty((len(files), 1), dtype=object)
        cell[:, 0] = files
        scipy.io.savemat(root / f"cuhk03_new_protocol_config_{kind}.mat", {
            "filelist": cell, "labels": np.array(labels, float)[:, None], "camId": np.array(cams, float)[:, None],
            **{f"{k}_idx": np.array(v, float)[:, None] for k, v in split.items()}})
        expected[kind] = {k: [files[i - 1] for i in v] for k, v in split.items()}
    return expected


def cuhk_out_name(filelist_name):
    pair, person, view, _ = (int(x) for x in filelist_name[:-4].split("_"))
    return f"{cuhk_label(pair, person):04d}_c{2 * (pair - 1) + view}_{filelist_name}"


def test_cuhk03_to_cuhk03_np_counts_names_pixels_split(tmp_path, capsys):
    src = tmp_path / "cuhk03"
    expected = write_cuhk03(src / "cuhk03_release")
    for kind in ("labeled", "detected"):           # split files beside the release folder, as torchreid keeps them
        (src / "cuhk03_release" / f"cuhk03_new_protocol_config_{kind}.mat").rename(
            src / f"cuhk03_new_protocol_config_{kind}.mat")
    before = digest(src)
    out = tmp_path / "cuhk03-np"
    assert prepare.main(["--cuhk03", str(src), str(out)]) == 0
    log = capsys.readouterr().out
    assert "published train / query / gallery: 7,368 / 1,400 / 5,328" in log
    assert digest(src) == before                   # the source is never modified
    for kind in ("labeled", "detected"):
        root = out / kind
        for split, sub in (("train", TRAIN), ("query", QUERY), ("gallery", GALLERY)):
            assert names(root / sub) == sorted(cuhk_out_name(n) for n in expected[kind][split]), (kind, split)
        n_cells = sum(CUHK_PERSONS.values()) * 10 - len(CUHK_EMPTY[kind])
        assert sum(len(names(root / s)) for s in (TRAIN, QUERY, GALLERY)) == n_cells
        for p in root.rglob("*.png"):               # stored (3, W, H): back to (H, W, 3), bit-exact
            pair, person, _, image = (int(x) for x in p.stem.split("_")[2:])
            assert np.array_equal(read(p), cuhk_image(kind, pair, person, image)), p
        data = D.load_dataset(root, **QUIET)
        assert data.train_pids == sorted(CUHK_TRAIN_IDS)
        assert {pid for _, pid, _ in data.query} == {pid for _, pid, _ in data.gallery} == {2, 3, 5}
        assert len(data.query) == 6                # one query per (test id, view)
        # cameras: pair p's views are cameras 2p-1, 2p (0-based 2p-2, 2p-1)
        assert {(pid, cam) for _, pid, cam in data.query} == {(2, 0), (2, 1), (3, 0), (3, 1), (5, 2), (5, 3)}
        assert prepare.check_dataset(root, workers=1, **QUIET) == []
        assert len(sources(root)) == n_cells
    # the parent folder resolves to cuhk03-np/labeled, as the reader's known folders say
    assert D.load_dataset(tmp_path, **QUIET).root == out / "labeled"
    assert prepare.main(["--cuhk03", str(src), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert prepare.main(["--cuhk03", str(src / "cuhk03_release" / "cuhk-03.mat"), str(out), "--overwrite"]) == 0
    assert no_leftovers(tmp_path)


def _break_protocol(path: Path, **changes):
    import scipy.io

    m = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    for k, v in changes.items():
        if v is None:
            del m[k]
        else:
            m[k] = v(m[k]) if callable(v) else v
    scipy.io.savemat(path, m)


@pytest.mark.parametrize("case", ["no_protocol", "empty_cell", "camid", "index", "labels_swapped", "missing_key",
                                  "garbage_mat", "garbage_protocol", "v5_mat", "not_cuhk", "no_mat"])
def test_cuhk03_bad_input_names_the_file_and_leaves_nothing(tmp_path, case):
    import h5py
    import scipy.io

    src = tmp_path / "src"
    write_cuhk03(src)
    proto = src / "cuhk03_new_protocol_config_detected.mat"
    mat = src / "cuhk-03.mat"
    named, expect = proto, ""
    if case == "no_protocol":
        proto.unlink()
        expect = "not found"
    elif case == "empty_cell":        # names an image that is an empty cell of the detected set
        m = scipy.io.loadmat(proto)
        fl = m["filelist"]
        fl[0, 0] = np.array(["1_001_2_07.png"])
        _break_protocol(proto, filelist=fl, camId=lambda c: np.vstack([[2.0], c[1:]]))
        expect = "empty cell"
    elif case == "camid":
        _break_protocol(proto, camId=lambda c: 3 - c)
        expect = "camId"
    elif case == "index":
        _break_protocol(proto, gallery_idx=lambda g: g + 1000)
        expect = "outside"
    elif case == "labels_swapped":    # one person, two labels
        _break_protocol(proto, labels=lambda lab: np.vstack([[9.0], lab[1:]]))
        expect = "labels"
    elif case == "missing_key":
        _break_protocol(proto, train_idx=None)
        expect = "no train_idx"
    elif case == "garbage_protocol":
        proto.write_bytes(b"not a mat file at all" * 10)
        expect = "not a readable MATLAB"
    elif case in ("garbage_mat", "v5_mat", "not_cuhk"):
        named = mat
        if case == "garbage_mat":
            mat.write_bytes(b"\0" * 600)
            expect = "not a readable MATLAB v7.3 (HDF5)"
        elif case == "v5_mat":
            scipy.io.savemat(mat, {"labeled": np.zeros(3)})
            expect = "not a readable MATLAB v7.3 (HDF5)"
        else:
            mat.unlink()
            with h5py.File(mat, "w") as f:
                f["images"] = np.zeros(3)
            expect = "no 'labeled' variable"
    elif case == "no_mat":
        mat.unlink()
        named, expect = src, "no cuhk-03.mat"
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        converters.convert_cuhk03(src, out, **QUIET)
    msg = str(err.value)
    assert str(named) in msg and expect in msg and "\n" not in msg, msg
    assert not out.exists() and no_leftovers(tmp_path)


# --------------------------------------------------------------------------- one folder per person
def make_people(root: Path, people: dict) -> Path:
    """people = {folder: n images or [relative file names]}; tiny distinct jpgs/pngs/tifs."""
    k = 0
    for person, files in people.items():
        if isinstance(files, int):
            files = [f"img{i:02d}.jpg" for i in range(files)]
        for name in files:
            k += 1
            path = root / person / name
            if name.lower().endswith(converters.SRC_IMG_EXTS):
                save(path, pixels(k))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("not an image")
    return root


def test_folders_without_cameras_split_query_gallery_and_report(tmp_path):
    src = make_people(tmp_path / "crops", {
        "Ana María": 3, "李 雷": ["a.png", "b.tif", "c.JPG", "d.jpeg"], "bob": 1, "carl": 2,
        "dora": ["x.jpg", "y.jpg", "z.jpg", "notes.txt", "Thumbs.db"], "eve": 6, "emptyone": ["readme.md"]})
    (src / "loose.jpg").write_bytes((src / "bob" / "img00.jpg").read_bytes())
    before = digest(src)
    said = []
    out = tmp_path / "out"
    stats = converters.convert_folders(src, out, test_ids=0.5, seed=0, log=said.append)
    assert digest(src) == before
    persons = converters.read_tsv(out / "persons.tsv")
    assert [row["folder"] for row in persons] == ["Ana María", "bob", "carl", "dora", "eve", "李 雷"]
    split_of = {row["folder"]: row["split"] for row in persons}
    assert split_of["bob"] == "train"                                   # one image: cannot be queried
    tested = sorted(n for n, s in split_of.items() if s == "test")
    assert len(tested) == 2 and "bob" not in tested                     # round(0.5 * 5 eligible)
    assert stats["persons"] == 6 and stats["images"] == 3 + 4 + 1 + 2 + 3 + 6
    assert stats["query"] == 2 and stats["query_ids"] == 2 and stats["single"] == ["bob"]
    assert stats["non_images"] == 3 and stats["stray_images"] == 1 and stats["skipped_folders"] == ["emptyone"]
    text = "\n".join(said)
    assert "went to bounding_box_train/: bob" in text and "no camera information" in text
    assert "skipped 3 non-image file(s)" in text and "dora/notes.txt" in text and "loose.jpg" in text
    data = D.load_dataset(out, **QUIET)
    assert {c for _, _, c in data.query} == {0} and {c for _, _, c in data.gallery} == {1}
    assert {c for _, _, c in data.train} == {0}
    src_of = sources(out)
    q_src = {src_of[f"{QUERY}/{Path(p).name}"] for p, _, _ in data.query}
    g_src = {src_of[f"{GALLERY}/{Path(p).name}"] for p, _, _ in data.gallery}
    assert not q_src & g_src and len(set(src_of.values())) == len(src_of)  # the query's own image never in the gallery
    for pid in {p for _, p, _ in data.query}:                                  # every other image of the person is
        name = persons[pid - 1]["folder"]
        assert sum(p == pid for _, p, _ in data.gallery) == stats_images(src, name) - 1
    for rel, source in src_of.items():                                         # .tif re-encoded losslessly, rest copied
        if source.endswith(".tif"):
            assert rel.endswith(".png") and np.array_equal(read(out / rel), read(src / source))
        else:
            assert (out / rel).read_bytes() == (src / source).read_bytes()
    assert prepare.check_dataset(out, workers=1, **QUIET) == []
    again = tmp_path / "again"
    converters.convert_folders(src, again, test_ids=0.5, seed=0, **QUIET)
    assert digest(again) == digest(out)                                        # seeded
    # all ids for testing: a test-only set, the one-image person joins the gallery as a negative
    said.clear()
    stats = converters.convert_folders(src, tmp_path / "all", test_ids=1, query_per_id=2, log=said.append)
    assert not (tmp_path / "all" / TRAIN).exists() and stats["train"] == 0
    assert stats["query"] == 2 + 2 + 1 + 2 + 2 and stats["gallery_ids"] == 6   # min(2, n - 1) per person
    assert "went to the gallery (no query): bob" in "\n".join(said)
    assert prepare.check_dataset(tmp_path / "all", workers=1, **QUIET) == []
    # the same through the command line
    cli = tmp_path / "cli"
    assert prepare.main(["--folders", str(src), str(cli), "--cams", "none", "--query_per_id", "2",
                         "--test_ids", "3", "--seed", "1"]) == 0
    rows = [list(r.values()) for r in converters.read_tsv(cli / "persons.tsv")]
    tested = {int(r[0]): int(r[3]) for r in rows if r[1] == "test"}
    assert len(tested) == 3
    assert sorted(int(n[:4]) for n in names(cli / QUERY)) == sorted(
        pid for pid, n in tested.items() for _ in range(min(2, n - 1)))    # 2 queries, one left for the gallery
    assert prepare.main(["--folders", str(src), str(cli), "--test_ids", "0"]) == 2


def stats_images(src: Path, person: str) -> int:
    return sum(1 for f in (src / person).rglob("*") if f.name.lower().endswith(converters.SRC_IMG_EXTS))


def test_folders_with_camera_subfolders_keep_cameras_and_a_cross_camera_match(tmp_path):
    src = make_people(tmp_path / "crops", {
        "p1/camA": 2, "p1/camB": 1, "p2/camA": 1, "p2/camB": 2, "p2/cam10": 1, "p3/camA": 3,
        "p4/camB": 2, "p4/cam10": 2, "p5/camA": 1, "p5/camB": 1})
    save(src / "p4" / "cam10" / "deeper" / "x.jpg", pixels(99))
    said = []
    out = tmp_path / "out"
    stats = converters.convert_folders(src, out, test_ids=1, query_per_id=5, log=said.append)
    text = "\n".join(said)
    assert "cameras from the subfolders: 1=cam10, 2=camA, 3=camB" in text          # natural order
    assert "skipped 1 image(s) below <person>/<camera>/: p4/cam10/deeper/x.jpg" in text
    assert stats["cameras"] == 3 and stats["single"] == ["p3"] and stats["deeper_images"] == 1
    data = D.load_dataset(out, need=("query", "gallery"), **QUIET)
    src_of = sources(out)
    cam_name = {0: "cam10", 1: "camA", 2: "camB"}
    for p, pid, cam in data.query + data.gallery:
        split = QUERY if "/query/" in p else GALLERY
        assert src_of[f"{split}/{Path(p).name}"].split("/")[1] == cam_name[cam]
    for _, pid, cam in data.query:                 # every query has a match from another camera
        assert any(g == pid and c != cam for _, g, c in data.gallery), (pid, cam)
    # up to 5 queries per (id, camera), but each keeps a match: p1 camA 2 / camB 1 -> camA's 2;
    # p2 cam10 1 / camA 1 / camB 2 -> camA's and camB's; p4 -> all of cam10 or camB; p5 -> one
    assert [sum(p == pid for _, p, _ in data.query) for pid in (1, 2, 3, 4, 5)] == [2, 3, 0, 2, 1]
    assert 3 in {p for _, p, _ in data.gallery}
    assert prepare.check_dataset(out, workers=1, **QUIET) == []
    # mixed: some persons with camera subfolders, some without
    make_people(src, {"p6": 2})
    with pytest.raises(UserError, match="--cams none") as err:
        converters.convert_folders(src, tmp_path / "mixed", **QUIET)
    assert str(src) in str(err.value)
    stats = converters.convert_folders(src, tmp_path / "flat", cams="none", **QUIET)
    assert stats["cameras"] == 0 and stats["images"] == 16 + 1 + 2 and stats["non_images"] == 0


@pytest.mark.parametrize("case", ["missing", "no_persons", "bad_image", "inside_source", "test_ids", "one_person"])
def test_folders_bad_input_names_the_path(tmp_path, case):
    src = make_people(tmp_path / "crops", {"a": 3, "b": 2})
    out, kw, named = tmp_path / "out", {}, src
    if case == "missing":
        src = named = tmp_path / "nope"
    elif case == "no_persons":
        src = named = tmp_path / "flat"
        save(src / "x.jpg", pixels(0))
    elif case == "bad_image":
        named = src / "b" / "img01.jpg"
        named.write_bytes(named.read_bytes()[:40])
    elif case == "inside_source":
        out = named = src / "converted"
    elif case == "test_ids":
        kw, named = {"test_ids": 2.5}, "--test_ids 2.5"
    elif case == "one_person":
        src = named = make_people(tmp_path / "one", {"solo": 3})
    with pytest.raises(UserError) as err:
        converters.convert_folders(src, out, **kw, **QUIET)
    msg = str(err.value)
    assert str(named) in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
    if case == "bad_image":
        assert "cannot decode" in msg


# --------------------------------------------------------------------------- test-only benchmarks
def make_occluded_reid(root: Path, ids=(1, 2, 3), per=2, whole_only=(4,)):
    for pid in ids:
        for n in range(1, per + 1):
            save(root / "occluded_body_images" / f"{pid:03d}" / f"{pid:03d}_{n:02d}.tif", pixels([1, pid, n]))
    for pid in tuple(ids) + tuple(whole_only):
        for n in range(1, per + 1):
            save(root / "whole_body_images" / f"{pid:03d}" / f"{pid:03d}_{n:02d}.tif", pixels([2, pid, n]))
    return root


def test_occluded_reid_is_test_only_probes_camera_1_whole_body_camera_2(tmp_path, capsys):
    src = make_occluded_reid(tmp_path / "Occluded_REID")
    (src / "whole_body_images" / "readme.txt").write_text("x")
    before = digest(src)
    out = tmp_path / "occ"
    assert prepare.main(["--occluded_reid", str(src), str(out)]) == 0
    assert "query 6 images of 3 ids (camera 1), gallery 8 images of 4 ids (camera 2)" in capsys.readouterr().out
    assert digest(src) == before
    assert sorted(p.name for p in out.iterdir()) == [".awpcn-prepared", GALLERY, QUERY, "sources.tsv"]  # no training folder
    data = D.load_dataset(out, need=("query", "gallery"), **QUIET)
    assert sorted({p for _, p, _ in data.query}) == [1, 2, 3]
    assert sorted({p for _, p, _ in data.gallery}) == [1, 2, 3, 4]
    assert {c for _, _, c in data.query} == {0} and {c for _, _, c in data.gallery} == {1}
    for rel, source in sources(out).items():       # .tif -> lossless .png, same pixels
        assert rel.endswith(".png") and np.array_equal(read(out / rel), read(src / source))
    assert prepare.main(["--check", str(out)]) == 0
    assert "test-only set" in capsys.readouterr().out
    with pytest.raises(UserError, match="missing bounding_box_train/: a test-only dataset"):
        D.load_dataset(out, **QUIET)               # what train.py reads


def test_partial_reid_probe_choice_and_partial_ilids(tmp_path):
    dl = tmp_path / "downloads"
    src = dl / "Partial-REID_Dataset"
    for folder, tag in (("partial_body_images", 1), ("occluded_body_images", 2), ("whole_body_images", 3)):
        for pid in (1, 2, 3):
            for n in (1, 2):
                save(src / folder / f"{pid:03d}_{n:03d}.jpg", pixels([tag, pid, n]))
    for probe in ("partial", "occluded"):
        out = tmp_path / probe
        assert prepare.main(["--partial_reid", str(dl), str(out), "--probe", probe]) == 0  # found one level down
        assert len(names(out / QUERY)) == len(names(out / GALLERY)) == 6
        src_of = sources(out)
        assert {v.split("/")[1] for k, v in src_of.items() if k.startswith(QUERY)} == {f"{probe}_body_images"}
        assert {v.split("/")[1] for k, v in src_of.items() if k.startswith(GALLERY)} == {"whole_body_images"}
        assert all((out / k).read_bytes() == (dl / v).read_bytes() for k, v in src_of.items())
        assert prepare.check_dataset(out, workers=1, **QUIET) == []
    ilids = tmp_path / "PartialiLIDS"
    for pid in (1, 2, 3, 119):
        save(ilids / "Probe" / f"{pid}.jpg", pixels([4, pid]))
        save(ilids / "Gallery" / f"{pid}.jpg", pixels([5, pid]))
    out = tmp_path / "ilids"
    assert prepare.main(["--partial_ilids", str(ilids), str(out)]) == 0
    data = D.load_dataset(out, need=("query", "gallery"), **QUIET)
    assert sorted(p for _, p, _ in data.query) == sorted(p for _, p, _ in data.gallery) == [1, 2, 3, 119]
    assert prepare.check_dataset(out, workers=1, **QUIET) == []


@pytest.mark.parametrize("case", ["missing_folder", "wrong_layout", "bad_name", "bad_image", "overwrite"])
def test_test_only_converters_bad_input(tmp_path, case):
    occ = make_occluded_reid(tmp_path / "occ")
    ilids = tmp_path / "ilids"
    save(ilids / "Probe" / "1.jpg", pixels(1))
    save(ilids / "Gallery" / "1.jpg", pixels(2))
    out = tmp_path / "out"
    if case == "missing_folder":
        call, named, expect = (lambda: converters.convert_partial_ilids(tmp_path / "none", out, **QUIET),
                               tmp_path / "none", "no such folder")
    elif case == "wrong_layout":      # an Occluded-REID folder given to --partial_reid
        call, named, expect = (lambda: converters.convert_partial_reid(occ, out, **QUIET), occ,
                               "missing partial_body_images/")
    elif case == "bad_name":
        save(ilids / "Probe" / "first.jpg", pixels(3))
        call, named, expect = (lambda: converters.convert_partial_ilids(ilids, out, **QUIET),
                               ilids / "Probe" / "first.jpg", "name does not match")
    elif case == "bad_image":
        (ilids / "Gallery" / "1.jpg").write_bytes(b"\xff\xd8\xff")
        call, named, expect = (lambda: converters.convert_partial_ilids(ilids, out, **QUIET),
                               ilids / "Gallery" / "1.jpg", "cannot decode")
    else:
        converters.convert_occluded_reid(occ, out, **QUIET)
        call, named, expect = lambda: converters.convert_occluded_reid(occ, out, **QUIET), out, "--overwrite"
    with pytest.raises(UserError) as err:
        call()
    msg = str(err.value)
    assert str(named) in msg and expect in msg and "\n" not in msg, msg
    assert (out.exists() == (case == "overwrite")) and no_leftovers(tmp_path)
    if case == "overwrite":
        converters.convert_occluded_reid(occ, out, overwrite=True, **QUIET)
        assert len(names(out / QUERY)) == 6 and no_leftovers(tmp_path)


# --------------------------------------------------------------------------- test.py on a test-only set
def test_test_py_evaluates_a_test_only_set_and_names_both_sets(tmp_path, capsys):
    import demo
    import train
    from test_pipeline import test_mod, tiny_opts

    syn = tmp_path / "syn"
    prepare.make_synthetic(syn, ids=8, seed=0)       # 4 training ids: a few steps of training
    runs = tmp_path / "runs"
    train.train(tiny_opts(syn, runs, "run", "--epochs", "1"))
    # an Occluded-REID-shaped folder made of the synthetic test images (.tif, as the release)
    data = D.load_dataset(syn, **QUIET)
    src = tmp_path / "Occluded_REID"
    for split, folder in ((data.query, "occluded_body_images"), (data.gallery, "whole_body_images")):
        for n, (path, pid, _) in enumerate(split):
            if pid > 0:
                save(src / folder / f"{pid:03d}" / f"{pid:03d}_{n:02d}.tif", read(path))
    out = tmp_path / "occ"
    converters.convert_occluded_reid(src, out, **QUIET)
    with pytest.raises(UserError, match="missing bounding_box_train/"):
        train.train(tiny_opts(out, runs, "other"))
    args = ["--name", "run", "--runs_dir", str(runs), "--workers", "0", "--no_flip", "--data_dir", str(out)]
    res = test_mod.run_test(test_mod.build_parser().parse_args(args))
    line = f"cross-dataset: trained on {syn}, tested on {out}"
    assert line in capsys.readouterr().out and 0 <= res["plain"]["mAP"] <= 1
    text = (runs / "run" / "result.txt").read_text(encoding="utf-8")
    n_gallery = sum(p > 0 for _, p, _ in data.gallery)
    assert line in text and f"{len(data.query)} queries x {n_gallery} gallery" in text
    assert demo.main(["--name", "run", "--runs_dir", str(runs), "--query_index", "0", "--topk", "3"]) == 0
    assert (runs / "run" / "show.png").is_file()


def test_result_line_names_training_and_test_sets(tmp_path):
    from test_pipeline import test_mod

    a, b = tmp_path / "market", tmp_path / "occ"
    a.mkdir(), b.mkdir()
    assert test_mod.sets_line(str(a), a) == f"trained on {a}, tested on {a} (same dataset)"
    assert test_mod.sets_line(str(tmp_path / "x" / ".." / "market"), a).endswith("(same dataset)")
    assert test_mod.sets_line(str(a), b) == f"cross-dataset: trained on {a}, tested on {b}"
    assert test_mod.sets_line(None, b).startswith("trained on ? (opts.yaml has no data_root)")
