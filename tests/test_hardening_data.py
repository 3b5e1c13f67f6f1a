"""Hardening of the dataset builders (issue #22): OUT never overlaps the source, --overwrite
replaces only our own outputs, symlinked folders are not followed, OUT's own failures and
damaged CUHK03 files are one line, interruptions leave nothing (and what a SIGKILL leaves is
cleaned at the next start), huge images and odd folder names are handled."""
import csv
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import converters
import prepare
from test_converters import make_occluded_reid, make_people, no_leftovers, pixels, save, sources, write_cuhk03
from test_datasets import _tiny_msmt17, digest
from test_occluders import occ_source
from utils import UserError

QUIET = dict(log=lambda *_: None)
MARKER = ".awpcn-prepared"


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- 1: OUT vs SRC, every builder
def make_source(kind: str, root: Path) -> Path:
    if kind == "msmt17":
        _tiny_msmt17(root)
    elif kind == "cuhk03":
        write_cuhk03(root)
    elif kind == "folders":
        make_people(root, {"a": 3, "b": 2})
    elif kind == "occluded_reid":
        make_occluded_reid(root)
    elif kind == "partial_reid":
        for folder in ("partial_body_images", "whole_body_images"):
            for pid in (1, 2):
                save(root / folder / f"{pid:03d}_001.jpg", pixels([pid, len(folder)]))
    elif kind == "partial_ilids":
        for folder in ("Probe", "Gallery"):
            for pid in (1, 2):
                save(root / folder / f"{pid}.jpg", pixels([pid, len(folder)]))
    else:
        occ_source(root)
    return root


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
@pytest.mark.parametrize("kind", ["msmt17", "occlude", "folders", "cuhk03", "occluded_reid", "partial_reid",
                                  "partial_ilids"])
def test_output_equal_to_inside_or_holding_the_source_is_refused(tmp_path, capsys, kind, where):
    box = tmp_path / "box"
    src = make_source(kind, box / "SRC")
    out = {"same": src, "inside": src / "out", "holds": box}[where]
    before = digest(box)
    assert prepare.main([f"--{kind}", str(src), str(out), "--overwrite"]) == 2
    err = one_error_line(capsys.readouterr().err)
    how = {"same": "is the source itself", "inside": "is inside the source", "holds": "holds the source"}[where]
    assert f"{out}: the output {how} {src}" in err
    assert digest(box) == before and no_leftovers(box) and no_leftovers(tmp_path)


# --------------------------------------------------------------------------- 2: --overwrite
@pytest.mark.parametrize("how", ["synthetic", "folders"])
def test_overwrite_refuses_a_folder_prepare_did_not_write(tmp_path, capsys, how):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "chapters" / "intro.tex").write_text("years of work")
    (thesis / "notes.txt").write_text("more")
    before = digest(thesis)
    src = make_people(tmp_path / "crops", {"a": 3, "b": 2})
    argv = ["--synthetic", str(thesis), "--ids", "4"] if how == "synthetic" else ["--folders", str(src), str(thesis)]
    assert prepare.main(argv + ["--overwrite"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{thesis}: was not written by prepare.py (no {MARKER} file" in err
    assert "chapters/" in err and "choose another OUT" in err
    assert digest(thesis) == before and no_leftovers(tmp_path)
    # a file, or a link, in OUT's place is never replaced either
    (tmp_path / "afile").write_text("x")
    (tmp_path / "alink").symlink_to(thesis)
    for target, why in (("afile", "exists and is not a folder"), ("alink", "is a symbolic link")):
        assert prepare.main(["--synthetic", str(tmp_path / target), "--ids", "4", "--overwrite"]) == 2
        assert why in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "afile").read_text() == "x" and digest(thesis) == before


def test_overwrite_replaces_our_own_output_and_says_so(tmp_path, capsys):
    out = tmp_path / "syn"
    assert prepare.main(["--synthetic", str(out), "--ids", "4"]) == 0
    assert (out / MARKER).is_file()
    first = digest(out)
    capsys.readouterr()
    assert prepare.main(["--synthetic", str(out), "--ids", "4"]) == 2
    assert "already exists; pass --overwrite" in one_error_line(capsys.readouterr().err)
    assert prepare.main(["--synthetic", str(out), "--ids", "4", "--seed", "1", "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert f"--overwrite: {out} holds a previous prepare.py output (" in said and "bounding_box_train/" in said
    assert digest(out) != first and (out / MARKER).is_file() and no_leftovers(tmp_path)
    # an empty folder is nobody's work: used without --overwrite
    (tmp_path / "empty").mkdir()
    assert prepare.main(["--synthetic", str(tmp_path / "empty"), "--ids", "4"]) == 0


def test_a_folder_appearing_at_out_while_building_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = prepare.draw_person

    def meanwhile(*a, **k):              # the user starts filling OUT while prepare.py runs
        if not out.exists():
            out.mkdir()
            (out / "mine.txt").write_text("keep")
        return real(*a, **k)

    monkeypatch.setattr(prepare, "draw_person", meanwhile)
    with pytest.raises(UserError, match="was not written by prepare.py") as err:
        prepare.make_synthetic(out, ids=4, overwrite=True)
    assert str(out) in str(err.value) and (out / "mine.txt").read_text() == "keep" and no_leftovers(tmp_path)


# --------------------------------------------------------------------------- 9: symlinked folders
def test_folders_never_follow_symlinked_folders(tmp_path):
    src = make_people(tmp_path / "crops", {"ana": 3, "bob": 2, "carl": ["cam1/x.jpg", "cam1/y.jpg"]})
    make_people(tmp_path / "elsewhere", {"zed": 4})
    (src / "everyone").symlink_to(src)                         # a cycle: one "person" of all the images
    (src / "outsider").symlink_to(tmp_path / "elsewhere" / "zed")
    (src / "ana" / "loop").symlink_to(src)                     # inside a person folder
    (src / "carl" / "cam2").symlink_to(src / "ana")             # a camera folder borrowed from another person
    said = []
    stats = converters.convert_folders(src, tmp_path / "out", cams="none", log=said.append)
    assert stats["persons"] == 3 and stats["images"] == 3 + 2 + 2
    assert stats["linked_folders"] == ["ana/loop", "carl/cam2", "everyone", "outsider"]
    assert "skipped 4 symbolic link(s) to folders, not followed" in "\n".join(said)
    assert sorted(r["folder"] for r in converters.read_tsv(tmp_path / "out" / "persons.tsv")) == ["ana", "bob", "carl"]
    from_links = [s for s in sources(tmp_path / "out").values() if s.startswith(("everyone", "outsider", "ana/loop"))]
    assert not from_links


def test_test_only_converters_do_not_follow_symlinked_person_folders(tmp_path):
    src = make_occluded_reid(tmp_path / "occ")
    (src / "occluded_body_images" / "009").symlink_to(src / "whole_body_images" / "001")
    said = []
    stats = converters.convert_occluded_reid(src, tmp_path / "out", log=said.append)
    assert stats["query"] == 6 and stats["linked_folders"] == ["occluded_body_images/009"]
    assert any(s.startswith("warning: skipped 1 symbolic link(s) to folders") for s in said), said


# --------------------------------------------------------------------------- 10: OUT cannot be written
def _fail_mkdir(monkeypatch, error):
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if ".tmp-" in self.name:
            raise error
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def _fail_rename(monkeypatch, error, out):
    real = os.replace

    def replace(a, b, *args, **kwargs):
        if Path(b) == out:
            raise error
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("builder", ["synthetic", "folders", "occlude"])
@pytest.mark.parametrize("case", ["parent_is_a_file", "permission", "read_only", "rename_read_only"])
def test_out_that_cannot_be_written_is_one_line_with_the_fix(tmp_path, capsys, monkeypatch, builder, case):
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path / ("notes.txt" if case == "parent_is_a_file" else "data") / "out"
    if case == "permission":
        _fail_mkdir(monkeypatch, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
        expect = f"cannot write in {tmp_path} (permission denied)"
    elif case == "read_only":
        _fail_mkdir(monkeypatch, OSError(errno.EROFS, os.strerror(errno.EROFS)))
        expect = f"cannot write in {tmp_path}: it is on a read-only filesystem"
    elif case == "rename_read_only":
        _fail_rename(monkeypatch, OSError(errno.EROFS, os.strerror(errno.EROFS)), out)
        expect = "read-only filesystem"
    else:
        expect = f"{tmp_path / 'notes.txt'} is a file, not a folder"
    if builder == "synthetic":
        argv = ["--synthetic", str(out), "--ids", "4"]
    elif builder == "folders":
        argv = ["--folders", str(make_people(tmp_path / "crops", {"a": 3, "b": 2})), str(out)]
    else:
        argv = ["--occlude", str(occ_source(tmp_path / "src")), str(out)]
    assert prepare.main(argv) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"error: {out}: " in err and expect in err, err
    assert not out.exists() and (tmp_path / "notes.txt").read_text() == "a file"
    assert not list(tmp_path.rglob(".out.*")), list(tmp_path.rglob(".out.*"))


# --------------------------------------------------------------------------- 14: damaged CUHK03 files
@pytest.mark.parametrize("case", ["truncated_split_file", "damaged_hdf5_object"])
def test_damaged_cuhk03_files_are_one_line_naming_the_file(tmp_path, case):
    import h5py

    src = tmp_path / "src"
    write_cuhk03(src)
    if case == "truncated_split_file":         # scipy fails with IndexError deep in its header reader
        named = src / "cuhk03_new_protocol_config_labeled.mat"
        named.write_bytes(named.read_bytes()[:64])
    else:                                      # h5py: KeyError "bad object header version number"
        named = src / "cuhk-03.mat"
        with h5py.File(named, "r") as f:
            addr = h5py.h5o.get_info(f["#refs#"]["labeled_pair1"].id).addr
        data = bytearray(named.read_bytes())
        data[512 + addr: 512 + addr + 16] = bytes(16)       # 512: MATLAB's user block before the HDF5 data
        named.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        converters.convert_cuhk03(src, out, **QUIET)
    msg = str(err.value)
    assert msg.startswith(f"{named}: ") and "\n" not in msg and ("truncated" in msg or "damaged" in msg), msg
    assert not out.exists() and no_leftovers(tmp_path)


# --------------------------------------------------------------------------- 20: empty person folder
def test_occluded_reid_names_empty_person_folders(tmp_path):
    src = make_occluded_reid(tmp_path / "occ")
    (src / "occluded_body_images" / "005").mkdir()
    (src / "whole_body_images" / "006").mkdir()
    (src / "whole_body_images" / "006" / "notes.txt").write_text("no image")
    said = []
    stats = converters.convert_occluded_reid(src, tmp_path / "out", log=said.append)
    assert ("warning: skipped 2 person folder(s) without images: occluded_body_images/005, whole_body_images/006"
            in said), said
    assert stats["empty_folders"] == ["occluded_body_images/005", "whole_body_images/006"]


# --------------------------------------------------------------------------- 21: interruptions
def test_stale_staging_folders_of_dead_processes_are_cleaned_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "syn"
    dead = dead_pid()
    stale = tmp_path / f".syn.tmp-{dead}"                       # what a SIGKILL mid-build leaves
    (stale / "query").mkdir(parents=True)
    (stale / MARKER).write_text("x")
    (stale / "query" / "0001_c1s1_000001_00.jpg").write_bytes(b"half")
    alive = tmp_path / ".syn.tmp-1"                             # PID 1 runs: maybe building right now
    other = tmp_path / f".other.tmp-{dead}"                     # beside another OUT
    loose = tmp_path / f".syn.tmp-{dead}x"                      # not exactly our name
    for p in (alive, other, loose):
        p.mkdir()
    assert prepare.main(["--synthetic", str(out), "--ids", "4"]) == 0
    said = capsys.readouterr().out
    assert f"removed {stale}: an unfinished prepare.py output of process {dead}, which is no longer running" in said
    assert not stale.exists() and alive.is_dir() and other.is_dir() and loose.is_dir()
    # killed between the two renames of the final swap: OUT is missing, the previous one beside it
    os.replace(out, tmp_path / f".syn.old-{dead}")
    assert prepare.main(["--synthetic", str(out), "--ids", "4"]) == 2          # restored, so it exists
    std = capsys.readouterr()
    assert f"restored {out} from .syn.old-{dead}" in std.out and "--overwrite" in std.err
    assert (out / MARKER).is_file() and (out / "occlusion.json").is_file()


# Runs prepare.main in its own process: a signal to the pytest process itself crashed it
# (SIGSEGV) once an earlier test had loaded OpenVINO, and a signal prepare failed to handle
# must fail this test, not end the suite.
_INTERRUPT_DRIVER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import prepare
signum = getattr(signal, sys.argv[2])
calls = []
real = prepare.draw_person
def draw_then_signal(*a, **k):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signum)
    return real(*a, **k)
prepare.draw_person = draw_then_signal
# Python's own SIGINT handler, also where the suite was started in the background (SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
rc = prepare.main(["--synthetic", sys.argv[3], "--ids", "4", *sys.argv[4:]])
print(f"rc={rc} calls={len(calls)}")
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_interrupt_leaves_nothing_and_is_one_line(tmp_path, signame):
    signum = getattr(signal, signame)
    out = tmp_path / "syn"
    assert prepare.main(["--synthetic", str(out), "--ids", "4"]) == 0
    before = digest(out)
    repo = str(Path(__file__).resolve().parents[1])
    for target, flags in ((out, ["--overwrite", "--seed", "3"]), (tmp_path / "new", [])):
        p = subprocess.run([sys.executable, "-c", _INTERRUPT_DRIVER, repo, signame, str(target), *flags],
                           capture_output=True, text=True, timeout=300)
        assert p.stdout.strip().splitlines()[-1] == f"rc={128 + signum} calls=3", (p.returncode, p.stderr[-2000:])
        by = "" if signame == "SIGINT" else f" by {signame}"
        assert p.stderr == f"interrupted{by}: nothing written to {target}\n"
    assert digest(out) == before and not (tmp_path / "new").exists() and no_leftovers(tmp_path)


def test_ctrl_c_that_surfaces_as_an_import_error_is_an_interrupt(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while a C extension initialises reaches Python as ImportError caused by it."""
    real, calls = prepare.draw_person, []

    def draw_then_import_cut(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise ImportError("initialization failed") from KeyboardInterrupt()
        return real(*a, **k)

    monkeypatch.setattr(prepare, "draw_person", draw_then_import_cut)
    assert prepare.main(["--synthetic", str(tmp_path / "new"), "--ids", "4"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err == f"interrupted: nothing written to {tmp_path / 'new'}\n"
    assert not (tmp_path / "new").exists() and no_leftovers(tmp_path)


# --------------------------------------------------------------------------- 22: huge images, odd names
def test_decompression_bomb_warning_becomes_one_line_naming_the_file(tmp_path, monkeypatch, recwarn):
    src = make_people(tmp_path / "crops", {"a": 3, "b": 2})                  # 12 x 6 = 72 pixels each
    big = save(src / "b" / "huge.png", pixels(7, h=16, w=10))                  # 160 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)                       # warns above 100, fails above 200
    said = []
    converters.convert_folders(src, tmp_path / "out", log=said.append)
    note = f"above PIL's decompression-bomb limit of 100 pixels, read anyway: {big} (10 x 16)"
    assert [s for s in said if "decompression-bomb" in s] == [f"warning: 1 image(s) {note}; check that they are "
                                                            "photos and not damaged or hostile files"]
    checked = []
    assert prepare.check_dataset(tmp_path / "out", workers=1, log=checked.append) == []
    assert any(s.startswith("warning: 1 image(s) above PIL's decompression-bomb limit") for s in checked), checked
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_tabs_newlines_and_quotes_in_folder_names_keep_their_tsv_columns(tmp_path):
    people = {"tab\there": 2, "new\nline": 2, 'say "hi"': 2, "plain": 2}
    src = make_people(tmp_path / "crops", people)
    out = tmp_path / "out"
    converters.convert_folders(src, out, test_ids=0.5, **QUIET)
    with open(out / "persons.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert sorted(r["folder"] for r in rows) == sorted(people)
    assert all(len(r) == 4 and None not in r and r["images"] == "2" for r in rows)
    assert converters.read_tsv(out / "persons.tsv") == rows
    src_of = sources(out)                  # the test helper reads with csv too
    assert len(src_of) == 8 and all((src / s).is_file() and (out / o).is_file() for o, s in src_of.items())
    assert {s.split("/")[0] for s in src_of.values()} == set(people)
