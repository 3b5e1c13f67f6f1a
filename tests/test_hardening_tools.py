"""Hardening of the tools that load a finished run (issue #22): search cache stamps, opts.yaml
held to the checkpoint, export destinations, unreadable gallery files, clear input errors."""
import errno
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
import export
import search
from inference import Extractor, run_options
from test_pipeline import one_epoch_run, test_mod
from utils import UserError, load_yaml, save_yaml


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    return one_epoch_run(synthetic_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def ext(run):
    return Extractor.from_run(run, device="cpu")


def _edited_run(run: Path, root: Path, edit) -> Path:
    """A run folder sharing ``run``'s checkpoint (a link: no copy) whose opts.yaml is ``edit(opts)``."""
    other = root / "runs" / "edited"
    other.mkdir(parents=True)
    os.symlink(run / "last.pt", other / "last.pt")
    opts = load_yaml(run / "opts.yaml")
    edit(opts)
    save_yaml(other / "opts.yaml", opts)
    return other


def _gallery_images(synthetic_dir, n):
    """n test images of n different identities."""
    seen, out = set(), []
    for p in sorted((synthetic_dir / "bounding_box_test").glob("*.jpg")):
        pid = p.name.split("_")[0]
        if pid not in seen:
            seen.add(pid)
            out.append(p)
    assert len(out) >= n
    return out[:n]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- 7: cache stamps
def test_search_cache_sees_a_same_size_replacement_whose_mtime_was_set_back(ext, synthetic_dir, tmp_path):
    *others, who = _gallery_images(synthetic_dir, 4)
    folder = tmp_path / "gallery"
    folder.mkdir()
    size = Image.open(who).size
    for i, p in enumerate(others):      # BMP: the same size in bytes for the same size in pixels
        Image.open(p).convert("RGB").resize(size).save(folder / f"{i}.bmp")
    query = tmp_path / "query.jpg"
    shutil.copyfile(who, query)
    cache = tmp_path / "cache"
    first = search.search(ext, query, folder, topk=3, cache_dir=cache, log=lambda _m: None)
    assert first["extracted"] == 3
    target = folder / "2.bmp"
    before = target.stat()
    # Replaced in place by the query's person, then `touch -r`-ed back to the old times.
    Image.open(who).convert("RGB").save(target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    res = search.search(ext, query, folder, topk=3, cache_dir=cache, log=lambda _m: None)
    assert (res["extracted"], res["cached"]) == (1, 2)
    best = res["order"][0]
    assert res["paths"][best] == str(target) and float(res["dists"][0]) < 1e-4


# --------------------------------------------------------------------------- 8, 15: opts.yaml vs checkpoint
@pytest.mark.parametrize("key,value", [("height", 128), ("last_stride", 2), ("temperature", 2.0)])
def test_an_opts_yaml_that_disagrees_with_the_checkpoint_is_refused_by_every_tool(
        run, tmp_path, key, value, capsys):
    stored = load_yaml(run / "opts.yaml")[key]
    other = _edited_run(run, tmp_path, lambda o: o.update({key: value}))
    expect = f"{key} is {value!r} in opts.yaml but {stored!r} in the checkpoint"
    base = ["--name", "edited", "--runs_dir", str(other.parent)]

    assert test_mod.main(base + ["--workers", "0", "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert str(other / "opts.yaml") in err and expect in err
    assert not (other / "result.txt").exists() and not (other / "features.pt").exists()
    assert export.main(base + ["--out", str(tmp_path / "x.onnx")]) == 2
    assert expect in _one_line_error(capsys)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))
    assert demo.main(base + ["--query", str(tmp_path / "q.jpg"), "--gallery", str(tmp_path), "--device", "cpu"]) == 2
    assert expect in _one_line_error(capsys)
    with pytest.raises(UserError, match=re.escape(expect)):
        Extractor.from_run(other, device="cpu")
    with pytest.raises(UserError, match=re.escape(expect)):
        run_options(other, "last")      # what report.py and demo.py read a run with


@pytest.mark.parametrize("edit,says", [
    (lambda o: o.pop("height"), "no 'height' key; set it back to `height: 64`"),
    (lambda o: o.update(height="64"), "height is '64' (str), expected an integer; set it back to `height: 64`"),
    (lambda o: o.update(parts=4.0), "parts is 4.0 (float), expected an integer; set it back to `parts: 4`"),
    (lambda o: o.update(width=True), "width is True (bool), expected an integer"),
    (lambda o: o.update(head="bogus"), "head is 'bogus', expected one of visibility, spatial, region, softmax"),
    (lambda o: o.pop("embed_dim"), "no 'embed_dim' key; set it back to `embed_dim: 32`"),
    (lambda o: [o.pop("data_root"), o.pop("data_dir")], "no data_root or data_dir key"),
])
def test_an_opts_yaml_with_a_missing_key_or_a_wrong_type_is_one_line(run, tmp_path, edit, says, capsys):
    other = _edited_run(run, tmp_path, edit)
    assert test_mod.main(["--name", "edited", "--runs_dir", str(other.parent), "--workers", "0",
                          "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert str(other / "opts.yaml") in err and says in err


# --------------------------------------------------------------------------- 11: export destination
def _spy_export(monkeypatch):
    calls = []
    real = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: (calls.append(a), real(*a, **k)))
    return calls


def _read_only(monkeypatch, where: Path):
    """Creating or removing files under ``where`` fails as on a read-only mount."""
    real_open, real_unlink = os.open, Path.unlink

    def ro_open(path, flags, *a, **k):
        if str(path).startswith(str(where)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    def ro_unlink(self, *a, **k):
        if str(self).startswith(str(where)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(Path, "unlink", ro_unlink)


@pytest.mark.parametrize("case", ["folder", "under a file", "read-only"])
def test_export_checks_its_destination_before_exporting(run, tmp_path, monkeypatch, case, capsys):
    pytest.importorskip("onnxruntime")
    calls = _spy_export(monkeypatch)
    if case == "folder":
        out, says = tmp_path / "exports", "is a folder; give a file path"
        out.mkdir()
    elif case == "under a file":
        (tmp_path / "notes").write_text("a file")
        out, says = tmp_path / "notes" / "sub" / "x.onnx", f"{tmp_path / 'notes'} is a file, not a folder"
    else:
        (tmp_path / "ro").mkdir()
        out, says = tmp_path / "ro" / "x.onnx", "Read-only file system"
        _read_only(monkeypatch, tmp_path / "ro")
    assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"--out {out}" in err and says in err
    assert calls == []
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_failing_cleanup_does_not_hide_the_export_error(run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")

    def fails(*_a, **_k):      # the mount turned read-only during the export
        _read_only(monkeypatch, tmp_path)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(export, "export_onnx", fails)
    assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--out", str(tmp_path / "x.onnx")]) == 2
    err = _one_line_error(capsys)
    assert "ONNX export failed (OSError: [Errno 30] Read-only file system)" in err


# --------------------------------------------------------------------------- 12: unreadable gallery files
def test_search_lists_unreadable_gallery_files_and_goes_on(ext, synthetic_dir, tmp_path, monkeypatch):
    folder = tmp_path / "gallery"
    folder.mkdir()
    imgs = _gallery_images(synthetic_dir, 5)
    for i, p in enumerate(imgs):
        shutil.copyfile(p, folder / f"{i}.jpg")
    os.symlink(tmp_path / "nowhere.jpg", folder / "link.jpg")
    query = tmp_path / "query.jpg"
    shutil.copyfile(imgs[0], query)

    real_list = search.list_images

    def listing_then_removed(f):
        found = real_list(f)
        (folder / "1.jpg").unlink()         # gone between the listing and its stat
        return found

    real_extract = ext.extract_files

    def extraction_after_removal(paths, **kw):
        (folder / "2.jpg").unlink()         # gone between its stat and its decoding
        return real_extract(paths, **kw)

    monkeypatch.setattr(search, "list_images", listing_then_removed)
    monkeypatch.setattr(ext, "extract_files", extraction_after_removal)
    res = search.search(ext, query, folder, topk=5)
    assert sorted(Path(p).name for p in res["paths"]) == ["0.jpg", "3.jpg", "4.jpg"]
    assert res["order"].numel() == 3 and res["bad"] == []
    assert sorted((Path(p).name, why) for p, why in res["unreadable"]) == [
        ("1.jpg", "removed while the search ran"), ("2.jpg", "removed while the search ran"),
        ("link.jpg", "dangling symbolic link")]
    note = [n for n in search.notes(res, folder) if "cannot be read" in n]
    assert note and "link.jpg (dangling symbolic link)" in note[0] and note[0].startswith("skipped 3 file(s)")


# --------------------------------------------------------------------------- 16, 18: clear errors
@pytest.mark.parametrize("flag,value", [("--batchsize", "0"), ("--workers", "-1")])
def test_test_py_refuses_bad_batch_and_worker_counts(run, flag, value, capsys):
    assert test_mod.main(["--name", "run", "--runs_dir", str(run.parent), "--device", "cpu", flag, value]) == 2
    assert f"{flag} {value}: must be" in _one_line_error(capsys)


def test_extractor_refuses_mismatched_features_unknown_weightings_and_empty_images(ext):
    a = ext(torch.rand(2, 3, 64, 32))
    for shape in ((3, 2, 32), (3, 4, 16)):      # another P, another D
        b = (torch.rand(*shape), torch.rand(*shape[:2]))
        with pytest.raises(UserError, match=re.escape(f"a has emb of shape (2, 4, 32) and b {shape}")):
            ext.distance(a, b)
    with pytest.raises(UserError, match=r"weighting='bogus'.*'adaptive', 'uniform'"):
        ext.distance(a, a, weighting="bogus")
    assert ext.distance(a, a, weighting="uniform").shape == (2, 2)
    with pytest.raises(UserError, match=r"shape \(2, 3, 0, 64\).*height or width 0"):
        ext(torch.rand(2, 3, 0, 64))
    with pytest.raises(UserError, match=r"images\[0\]: PIL image of size 0x0: an image of height or width 0"):
        ext([Image.new("RGB", (0, 0))])
    with pytest.raises(UserError, match=r"images\[1\]: numpy array of shape \(0, 5, 3\).*: an image of height or wid"):
        ext([np.zeros((8, 4, 3), np.uint8), np.zeros((0, 5, 3), np.uint8)])
    assert ext(torch.rand(0, 3, 64, 32))[0].shape == (0, 4, 32)


# --------------------------------------------------------------------------- 22: figures, lone query
def test_searches_of_different_queries_keep_their_own_figure(run, synthetic_dir, tmp_path, capsys):
    folder = tmp_path / "gallery"
    folder.mkdir()
    imgs = _gallery_images(synthetic_dir, 4)
    for i, p in enumerate(imgs[:3]):
        shutil.copyfile(p, folder / f"{i}.jpg")
    (tmp_path / "b").mkdir()
    queries = [tmp_path / "q.jpg", tmp_path / "b" / "q.jpg", tmp_path / "other.jpg"]
    for q in queries:
        shutil.copyfile(imgs[3], q)
    base = ["--name", "run", "--runs_dir", str(run.parent), "--gallery", str(folder), "--device", "cpu",
            "--no_cache", "--topk", "2"]
    saved = []
    for q in queries:
        assert demo.main(base + ["--query", str(q)]) == 0
        saved.append(Path(re.search(r"^saved (.+)$", capsys.readouterr().out, re.M).group(1)))
    assert len(set(saved)) == 3 and all(p.parent == run for p in saved)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in saved)
    assert saved[2].name.startswith("search_other_")


def test_a_gallery_holding_only_the_query_says_so(run, synthetic_dir, tmp_path, capsys):
    folder = tmp_path / "gallery"
    folder.mkdir()
    query = folder / "me.jpg"
    shutil.copyfile(_gallery_images(synthetic_dir, 1)[0], query)
    (folder / "notes.txt").write_text("x")
    assert demo.main(["--name", "run", "--runs_dir", str(run.parent), "--query", str(query), "--gallery",
                      str(folder), "--device", "cpu", "--no_cache"]) == 2
    err = _one_line_error(capsys)
    assert "the gallery is empty apart from the query itself (me.jpg)" in err
