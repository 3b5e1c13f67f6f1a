"""train.py hardening (#22): run folders that are not ours, one trainer per run, what --resume
applies and records, checkpoints that cannot be resumed, bad flags, interrupted first epochs,
changed training sets, finished runs, stale temp files."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train
import utils
from model import build_model
from utils import UserError, load_checkpoint, load_yaml, save_checkpoint, save_yaml

REPO = Path(__file__).resolve().parents[1]


def flags(data_dir, runs_dir, name="run", *extra):
    """A run as small as train.py allows: 2 stripes of 8 dims over 32x16 images, 4 per batch."""
    return ["--data_dir", str(data_dir), "--runs_dir", str(runs_dir), "--name", name, "--preset", "cpu",
            "--height", "32", "--width", "16", "--parts", "2", "--embed_dim", "8", "--batchsize", "4",
            "--instances", "2", "--epochs", "1", "--workers", "0", "--warmup", "0", *extra]


def resume(runs_dir, name="run", *extra):
    return train.parse_opts(["--runs_dir", str(runs_dir), "--name", name, "--resume", *extra])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    import prepare

    out = tmp_path_factory.mktemp("tiny") / "syn"
    prepare.make_synthetic(out, ids=6, seed=0)   # 3 training ids, 23 images
    return out


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A run that has finished its 1 epoch; tests copy it."""
    runs = tmp_path_factory.mktemp("runs")
    train.train(train.parse_opts(flags(tiny_data, runs)))
    return runs / "run"


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- 3: foreign files
def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tiny_data, tmp_path):
    market = tmp_path / "market"
    market.mkdir()
    for name in ("awpcn.onnx", "notes.txt", "report.html"):
        (market / name).write_text(name)
    before = _files(market)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(UserError, match=r"market is not a run folder: it holds notes\.txt, which no AWPCN"):
            train.train(train.parse_opts(flags(tiny_data, tmp_path, "market", *extra)))
        assert _files(market) == before
    # Our names only, but nothing that says a run lived here: not reused, and not replaced.
    (market / "notes.txt").unlink()
    with pytest.raises(UserError, match=r"holds awpcn\.onnx, report\.html but no checkpoint.*not reused"):
        train.train(train.parse_opts(flags(tiny_data, tmp_path, "market")))
    with pytest.raises(UserError, match="not recognisably a run folder"):
        train.train(train.parse_opts(flags(tiny_data, tmp_path, "market", "--overwrite")))
    assert sorted(p.name for p in market.iterdir()) == ["awpcn.onnx", "report.html"]


def test_overwrite_keeps_a_file_of_the_user_in_a_run_folder(tiny_data, run):
    (run / "notes.txt").write_text("mine")
    before = _files(run)
    with pytest.raises(UserError, match=r"holds notes\.txt besides the run's files.*--resume continues"):
        train.train(train.parse_opts(flags(tiny_data, run.parent, "run", "--overwrite")))
    assert {k: v for k, v in _files(run).items() if k != utils.RUN_LOCK} == \
        {k: v for k, v in before.items() if k != utils.RUN_LOCK}


def test_run_files_name_what_the_other_tools_write():
    import report
    import search
    assert {report.REPORT_FILE, search.CACHE_DIR, utils.FEATURES_FILE, "awpcn.onnx"} <= train.RUN_FILES
    import demo
    assert train._ours(demo.search_figure_name("/data/q/0001_c1s1_000151_01.jpg"))
    assert not train._ours("search_notes.png") and not train._ours("thesis.pdf")


# --------------------------------------------------------------------------- 4: one trainer per run
def test_a_second_training_of_a_run_in_progress_is_refused(tiny_data, tmp_path, monkeypatch):
    seen, nested = [], []
    real_end = train._end_epoch

    def end_epoch_then_start_again(loop, epoch, record):
        real_end(loop, epoch, record)
        if nested:   # a second training that was let in ends its epochs here too: no third
            return
        nested.append(True)
        for extra in ([], ["--overwrite"]):
            try:
                train.train(train.parse_opts(flags(tiny_data, tmp_path, "run", *extra)))
            except UserError as exc:
                seen.append(str(exc))
        try:
            train.train(resume(tmp_path, "run", "--epochs", "2"))
        except UserError as exc:
            seen.append(str(exc))

    monkeypatch.setattr(train, "_end_epoch", end_epoch_then_start_again)
    train.train(train.parse_opts(flags(tiny_data, tmp_path)))
    assert len(seen) == 3
    for msg in seen:
        assert f"{tmp_path / 'run'} is being trained by process {os.getpid()}" in msg, msg
    # The first run's own files, and it let go of the run when it ended.
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    utils.lock_run(tmp_path / "run").close()


def test_the_lock_names_the_holder_and_dies_with_it(run):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(REPO)!r})
            import utils
            lock = utils.lock_run({str(run)!r})
            print("held", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(run)
        with pytest.raises(UserError, match=rf"run is being trained by process {holder.pid} "):
            train.train(resume(run.parent, "run", "--epochs", "2"))
        assert _files(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    utils.lock_run(run).close()     # a killed holder leaves the run free


# --------------------------------------------------------------------------- 5: optimiser overrides
def test_optimiser_flags_given_on_resume_are_what_it_trains_with(run):
    train.train(resume(run.parent, "run", "--epochs", "2", "--lr", "0.02", "--momentum", "0.8",
                       "--weight_decay", "0.001", "--backbone_lr_mult", "0.5"))
    trunk, head = load_checkpoint(run / "last.pt")["optimizer"]["param_groups"]
    assert (trunk["base_lr"], head["base_lr"]) == (pytest.approx(0.01), pytest.approx(0.02))
    assert (trunk["lr"], head["lr"]) == (pytest.approx(0.01), pytest.approx(0.02))   # no warmup, before step
    assert {trunk["momentum"], head["momentum"]} == {0.8}
    assert {trunk["weight_decay"], head["weight_decay"]} == {0.001}


# --------------------------------------------------------------------------- 6: one record of the options
def test_each_resume_starts_from_the_options_the_last_one_recorded(run):
    train.train(resume(run.parent, "run", "--epochs", "3", "--lr", "0.02"), stop_after_epoch=2)
    stored = load_yaml(run / "opts.yaml")
    assert stored["epochs"] == 3 and stored["lr"] == 0.02
    assert load_checkpoint(run / "last.pt")["opts"] == stored
    out = train.train(resume(run.parent))            # no flags: the first resume's options hold
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    assert out["history"][-1]["lr"] == pytest.approx(0.02)
    assert load_checkpoint(run / "last.pt")["opts"] == load_yaml(run / "opts.yaml")
    with pytest.raises(UserError, match="has already trained 3 epochs and a run cannot be shortened"):
        train.train(resume(run.parent, "run", "--epochs", "2"))


def test_option_classes_are_defined_once_and_cover_the_parser():
    dests = {a.dest for a in train.build_parser()._actions if a.dest != "help"}
    derived = {"given", "data_root", "num_classes"}
    assert not train.FIXED & train.RUNTIME
    assert train.FIXED | train.RUNTIME <= dests | derived
    assert train.COMMAND <= train.RUNTIME and "allow_data_change" in train.COMMAND
    spec = importlib.util.spec_from_file_location("bench_accuracy_classes", REPO / "bench" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert train.RUNTIME <= bench._NOT_TRAINING and not (train.FIXED - {"data_dir", "preset"}) & bench._NOT_TRAINING


def test_resume_does_not_carry_over_a_flag_of_one_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(run / "opts.yaml", {**train.parse_opts(["--allow_data_change", "--overwrite"]), "name": "run",
                                  "runs_dir": str(tmp_path)})
    (run / "last.pt").write_bytes(b"")
    opts = train.resume_opts(run, resume(tmp_path), log=lambda _: None)
    assert opts["allow_data_change"] is False and opts["overwrite"] is False and opts["resume"] is True


# --------------------------------------------------------------------------- 13: checkpoints that cannot be resumed
def test_a_checkpoint_of_another_network_is_named(run, capsys):
    state = load_checkpoint(run / "last.pt")
    other = build_model({**state["opts"], "embed_dim": 16}, pretrained="none")
    save_checkpoint({**state, "model": other.state_dict(), "opts": {**state["opts"], "embed_dim": 16}},
                    run / "last.pt")
    with pytest.raises(UserError, match=r"last\.pt was trained with embed_dim 16 but .*opts\.yaml says embed_dim 8"):
        train.train(resume(run.parent, "run", "--epochs", "2"))
    # Without the options inside, the weights themselves are found not to fit.
    save_checkpoint({**state, "model": other.state_dict(), "opts": None}, run / "last.pt")
    assert train.main(["--runs_dir", str(run.parent), "--name", "run", "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "last.pt does not fit the network" in err and "size mismatch" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_an_interrupted_pt_copied_over_last_pt_is_named(run):
    state = load_checkpoint(run / "last.pt")
    save_checkpoint({k: v for k, v in state.items() if k not in ("optimizer", "scaler")} | {"iteration": 3},
                    run / "last.pt")
    with pytest.raises(UserError, match=r"last\.pt has no optimizer state: it is an interrupted\.pt.*--overwrite"):
        train.train(resume(run.parent, "run", "--epochs", "2"))


# --------------------------------------------------------------------------- 16: bad flags
@pytest.mark.parametrize("bad,msg", [(["--workers", "-1"], "--workers -1: must be 0 or more"),
                                     (["--lr", "-1"], "--lr -1.0: must be above 0"),
                                     (["--lr", "nan"], "--lr nan: must be above 0"),
                                     (["--momentum", "0"], "--momentum 0.0: must be in (0, 1)"),
                                     (["--device", "tpu"], "--device 'tpu': not a device"),
                                     (["--seed", "-3"], "--seed -3: must be 0 or more")])
def test_bad_flags_are_refused_before_anything_is_created(tiny_data, tmp_path, capsys, bad, msg):
    assert train.main(flags(tiny_data, tmp_path / "runs", "run", *bad)) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_every_script_names_an_unknown_device(finished, capsys):
    with pytest.raises(UserError, match=r"--device 'tpu'.*auto, cpu, cuda or cuda:N"):
        utils.select_device("tpu")
    spec = importlib.util.spec_from_file_location("awpcn_test_py_device", REPO / "test.py")
    test_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_mod)
    assert test_mod.main(["--name", "run", "--runs_dir", str(finished.parent), "--device", "tpu",
                          "--workers", "0"]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err


# --------------------------------------------------------------------------- 17: Ctrl-C in the first epoch
def test_ctrl_c_in_the_first_epoch_offers_the_way_out_that_works(tiny_data, tmp_path, monkeypatch, capsys):
    args = flags(tiny_data, tmp_path)

    def ctrl_c(loop, epoch):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train, "_train_epoch", ctrl_c)
        assert train.main(args) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--overwrite" in err and "plus --resume" not in err
    run = tmp_path / "run"
    assert (run / "interrupted.pt").is_file() and not (run / "last.pt").exists()
    # Neither way says to take the other: both say --overwrite, and what interrupted.pt is.
    for extra in ([], ["--resume"]):
        assert train.main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "stopped during its first epoch" in err and "partial weights" in err, err
        assert "Pass --overwrite, without --resume" in err and "pass --resume" not in err
    assert train.main([*args, "--overwrite"]) == 0
    assert "--overwrite: deleting the previous run" in capsys.readouterr().out
    assert not (run / "interrupted.pt").exists() and load_checkpoint(run / "last.pt")["epoch"] == 1


def test_ctrl_c_during_the_first_plot_import_is_an_interrupt_not_a_traceback(tiny_data, tmp_path, monkeypatch,
                                                                            capsys):
    """Seen in a full suite: SIGINT right after epoch 1's last.pt landed while matplotlib's C
    extension initialised (its first import, in plot_history) and came out as ImportError."""
    args = flags(tiny_data, tmp_path, "run", "--epochs", "2")

    def import_cut_by_ctrl_c(history, path):
        raise ImportError("initialization failed") from KeyboardInterrupt()

    with monkeypatch.context() as m:
        m.setattr(train, "plot_history", import_cut_by_ctrl_c)
        assert train.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted:" in err and "plus --resume" in err and "interrupted.pt" in err
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and (run / "interrupted.pt").is_file()

    def disk_full(history, path):       # a real error stays one, with its traceback
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(train, "plot_history", disk_full)
        with pytest.raises(OSError, match="No space left"):
            train.main([*args, "--resume"])


# --------------------------------------------------------------------------- 19: changed training set
def test_resume_refuses_a_changed_training_set_unless_allowed(tiny_data, run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    opts = load_yaml(run / "opts.yaml")
    save_yaml(run / "opts.yaml", {**opts, "data_dir": str(data), "data_root": str(data)})
    # One image fewer of an identity that keeps others: the same ids, another list.
    first = sorted((data / "bounding_box_train").iterdir())[0]
    first.unlink()
    with pytest.raises(UserError, match=r"training images of .*data changed since .*last\.pt was written "
                                        r"\(23 images then, 22 now\).*--allow_data_change"):
        train.train(resume(run.parent, "run", "--epochs", "2"))
    assert "--allow_data_change" in train.build_parser().format_help()
    train.train(resume(run.parent, "run", "--epochs", "2", "--allow_data_change"))
    assert "continuing, as --allow_data_change asks" in (run / "train.log").read_text()
    assert load_checkpoint(run / "last.pt")["train_fingerprint"]["images"] == 22
    assert load_yaml(run / "opts.yaml")["allow_data_change"] is True   # this command's, not carried over


# --------------------------------------------------------------------------- 20: a finished run
def test_resuming_a_finished_run_says_so_and_how_to_extend_it(run, capsys):
    before = _files(run)
    assert train.main(["--runs_dir", str(run.parent), "--name", "run", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "has finished its 1 epoch: nothing to train" in out and "--resume --epochs M (M > 1)" in out
    assert "at epoch 2/1" not in out and "done: " not in out
    assert {k: v for k, v in _files(run).items() if k != utils.RUN_LOCK} == \
        {k: v for k, v in before.items() if k != utils.RUN_LOCK}


# --------------------------------------------------------------------------- 21: stale temp files
def test_stale_temp_files_are_removed_at_the_next_start_and_said(run, capsys):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = [run / f".last.pt.{dead}.tmp", run / f".opts.yaml.{dead}.tmp"]
        kept = [run / f".features.pt.{live.pid}.tmp", run / f".last.pt.{os.getpid()}.tmp", run / "last.pt.9.tmp"]
        for p in stale + kept:
            p.write_bytes(b"half")
        assert train.main(["--runs_dir", str(run.parent), "--name", "run", "--resume"]) == 0
        out = capsys.readouterr().out
        for p in stale:
            assert not p.exists() and f"removed {p}" in out and f"process {dead}, which is no longer running" in out
        assert all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait(timeout=60)
