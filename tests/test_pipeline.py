"""train.py -> test.py -> demo.py on a tiny synthetic set (CPU, ResNet-18, 64x32 images)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import inference
import train
from utils import UserError, load_checkpoint, load_yaml

REPO = Path(__file__).resolve().parents[1]
# test.py by path: "import test" could find the standard library's test package.
_spec = importlib.util.spec_from_file_location("awpcn_test_py", REPO / "test.py")
test_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_mod)


def tiny_opts(data_dir, runs_dir, name="run", *extra):
    return train.parse_opts([
        "--data_dir", str(data_dir), "--runs_dir", str(runs_dir), "--name", name,
        "--preset", "cpu", "--height", "64", "--width", "32", "--parts", "4", "--embed_dim", "32",
        "--batchsize", "8", "--instances", "2", "--epochs", "2", "--workers", "0", "--warmup", "1",
        "--step", "1", *extra])


def one_epoch_run(data_dir, tmp_path_factory):
    """A one-epoch tiny run (ResNet-18, 64x32 input, P=4, D=32) in a fresh folder: its run dir."""
    runs = tmp_path_factory.mktemp("runs")
    train.train(tiny_opts(data_dir, runs, "run", "--epochs", "1"))
    return runs / "run"


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = train.train(tiny_opts(synthetic_dir, runs))
    return runs, out


def test_train_leaves_a_complete_run_folder(trained):
    runs, out = trained
    run = runs / "run"
    for name in ("opts.yaml", "last.pt", "train.log", "train.jpg"):
        assert (run / name).is_file(), name
    opts = load_yaml(run / "opts.yaml")
    assert opts["backbone"] == "resnet18" and opts["parts"] == 4 and opts["num_classes"] > 1
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert "epoch 2/2" in (run / "train.log").read_text()


def test_refuses_to_overwrite_a_run(trained, synthetic_dir):
    runs, _ = trained
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        train.train(tiny_opts(synthetic_dir, runs))


def test_resume_reproduces_an_uninterrupted_run(synthetic_dir, tmp_path, trained):
    runs, full = trained
    train.train(tiny_opts(synthetic_dir, tmp_path), stop_after_epoch=1)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    resumed = train.train(tiny_opts(synthetic_dir, tmp_path, "run", "--resume"))
    for a, b in zip(full["history"], resumed["history"]):
        for key in ("loss", "part_ce", "fused_ce", "vis_bce", "acc"):
            assert a[key] == b[key], (key, a[key], b[key])
    wa = load_checkpoint(runs / "run" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("spike,amp", [(float("nan"), False), (float("inf"), True)])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(synthetic_dir, tmp_path, monkeypatch, spike, amp):
    real = train.awpcn_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * spike if calls["n"] > steps_per_epoch else loss), terms

    opts = tiny_opts(synthetic_dir, tmp_path, "run", *(["--amp"] if amp else []))
    import datasets
    data = datasets.load_dataset(synthetic_dir, log=lambda *a: None)
    steps_per_epoch = len(datasets.PKSampler([l for _, l, _ in data.train], 4, 2))
    monkeypatch.setattr(train, "awpcn_loss", poisoned)
    with pytest.raises(UserError, match=rf"loss is {spike} at epoch 2, iteration 1.*last\.pt \(epoch 1\)"):
        train.train(opts)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_help_documents_every_flag_of_the_interface():
    text = train.build_parser().format_help()
    for flag in ("--data_dir", "--name", "--backbone", "--pretrained", "--weights", "--parts", "--weighting",
                 "--height", "--width", "--epochs", "--batchsize", "--instances", "--lr", "--amp",
                 "--channels_last", "--triplet", "--resume", "--overwrite", "--seed"):
        assert flag in text, flag


def test_preset_is_overridden_by_explicit_flags():
    opts = train.parse_opts(["--preset", "cpu", "--epochs", "3"])
    assert opts["backbone"] == "resnet18" and opts["epochs"] == 3 and opts["backbone_lr_mult"] == 1.0
    assert train.parse_opts([])["backbone_lr_mult"] == 0.1


def test_lr_schedule_warmup_step_and_cosine():
    opts = {"warmup": 2, "schedule": "step", "step": 4, "gamma": 0.1, "epochs": 6}
    assert [round(train.lr_factor(e, opts), 3) for e in range(6)] == [0.1, 0.55, 1.0, 1.0, 0.1, 0.1]
    opts["schedule"] = "cosine"
    assert train.lr_factor(2, opts) == 1.0 and train.lr_factor(4, opts) == pytest.approx(0.5)


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    rc = train.main(["--data_dir", str(tmp_path / "missing"), "--runs_dir", str(tmp_path), "--preset", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "Traceback" not in err
    rc = train.main(["--batchsize", "10", "--instances", "4", "--runs_dir", str(tmp_path)])
    assert rc == 2 and "multiple of --instances" in capsys.readouterr().err


def test_ddp_two_processes_with_gloo(synthetic_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), "--data_dir", str(synthetic_dir), "--runs_dir", str(tmp_path),
           "--name", "ddp", "--preset", "cpu", "--height", "64", "--width", "32", "--parts", "4",
           "--embed_dim", "32", "--batchsize", "8", "--instances", "2", "--epochs", "1", "--workers", "0",
           "--device", "cpu"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    assert res.stdout.count("epoch 1/1") == 1  # only rank 0 logs


# --------------------------------------------------------------------------- test.py / demo.py
def test_test_py_evaluates_and_writes_results(trained, capsys):
    runs, _ = trained
    res = test_mod.run_test(test_mod.build_parser().parse_args(
        ["--name", "run", "--runs_dir", str(runs), "--workers", "0", "--rerank"]))
    out = capsys.readouterr().out
    assert "Rank-1" in out and "mAP" in out and "official" in out and "re-ranked" in out
    for name in ("result.txt", "features.pt", "cmc.png"):
        assert (runs / "run" / name).is_file(), name
    plain = res["plain"]
    assert 0 <= plain["mAP"] <= 1 and 0 <= plain["rank1"] <= plain["rank5"] <= plain["rank10"] <= 1
    # Uniform ablation on the same checkpoint appends to result.txt and names the weighting.
    test_mod.run_test(test_mod.build_parser().parse_args(
        ["--name", "run", "--runs_dir", str(runs), "--workers", "0", "--weighting", "uniform", "--ap", "standard"]))
    text = (runs / "run" / "result.txt").read_text()
    assert text.count("weights: adaptive") == 1 and text.count("weights: uniform") == 1
    assert "standard" in text


def test_demo_draws_a_ranked_list(trained, capsys):
    runs, _ = trained
    if not (runs / "run" / "features.pt").exists():
        test_mod.main(["--name", "run", "--runs_dir", str(runs), "--workers", "0"])
    assert demo.main(["--name", "run", "--runs_dir", str(runs), "--query_index", "3", "--topk", "5"]) == 0
    png = runs / "run" / "show.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    w, h = Image.open(png).size
    assert w > 2 * h  # a row of 6 images with weight strips
    out = capsys.readouterr().out
    assert out.count("✓") + out.count("✗") == 5


def test_demo_and_test_errors_name_what_exists(trained, capsys):
    runs, _ = trained
    if not (runs / "run" / "features.pt").exists():
        test_mod.main(["--name", "run", "--runs_dir", str(runs), "--workers", "0"])
    assert demo.main(["--name", "run", "--runs_dir", str(runs), "--query_index", "100000"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert demo.main(["--name", "nope", "--runs_dir", str(runs), "--query_index", "0"]) == 2
    assert "runs with features: run" in capsys.readouterr().err
    import shutil
    shutil.copytree(runs / "run", runs / "copy")
    assert demo.main(["--name", "copy", "--runs_dir", str(runs), "--query_index", "0"]) == 2
    assert "features of run 'run', not 'copy'" in capsys.readouterr().err
    assert test_mod.main(["--name", "nope", "--runs_dir", str(runs)]) == 2
    assert "Runs in" in capsys.readouterr().err


def test_checkpoint_from_another_model_is_named(trained, tmp_path):
    import shutil
    runs, _ = trained
    other = tmp_path / "other"
    shutil.copytree(runs / "run", other)
    opts = load_yaml(other / "opts.yaml")
    opts["parts"], opts["backbone"] = 6, "resnet34"
    from utils import save_yaml
    save_yaml(other / "opts.yaml", opts)
    with pytest.raises(UserError) as err:
        inference.load_model(other)
    msg = str(err.value)
    assert "disagrees with last.pt" in msg and "parts is 6 in opts.yaml but 4 in the checkpoint" in msg
    assert "backbone is 'resnet34' in opts.yaml but 'resnet18' in the checkpoint" in msg


def test_out_of_memory_is_a_clear_message(synthetic_dir, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "awpcn_loss", oom)
    with pytest.raises(UserError, match=r"out of memory on a batch of 8 images at 64x32.*--batchsize \(e.g. 4\)"):
        train.train(tiny_opts(synthetic_dir, tmp_path))


def test_resume_on_a_changed_dataset_names_the_difference(tmp_path):
    import prepare
    data = tmp_path / "data"
    prepare.make_synthetic(data, ids=16, seed=1)
    train.train(tiny_opts(data, tmp_path / "runs"), stop_after_epoch=1)
    prepare.make_synthetic(data, ids=20, seed=1, overwrite=True)
    with pytest.raises(UserError, match="10 training ids that differ from the 8 the run was started with"):
        train.train(tiny_opts(data, tmp_path / "runs", "run", "--resume"))


def test_rerank_too_large_is_refused_before_extraction(trained, tmp_path, monkeypatch, capsys):
    import shutil

    import evaluate
    runs, _ = trained
    shutil.copytree(runs / "run", tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    monkeypatch.setattr(evaluate, "RERANK_MAX_ITEMS", 10)
    monkeypatch.setattr(inference, "extract", lambda *a, **k: pytest.fail("extracted before refusing --rerank"))
    assert test_mod.main(["--name", "run", "--runs_dir", str(tmp_path), "--workers", "0", "--rerank"]) == 2
    err = capsys.readouterr().err
    assert "re-ranking" in err and "limit of 10" in err and "without --rerank" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before                      # nothing half-done: no result line, no features


def test_test_and_demo_default_to_the_run_train_py_writes(trained, tmp_path, capsys):
    import shutil

    from utils import DEFAULT_RUN
    runs, _ = trained
    name = train.build_parser().parse_args([]).name
    assert name == DEFAULT_RUN == "awpcn" and test_mod.build_parser().parse_args([]).name == name
    # python train.py; python test.py; python demo.py --query_index N: no --name anywhere
    shutil.copytree(runs / "run", tmp_path / name)
    assert test_mod.main(["--runs_dir", str(tmp_path), "--workers", "0"]) == 0
    assert demo.main(["--runs_dir", str(tmp_path), "--query_index", "2", "--topk", "3"]) == 0
    assert (tmp_path / name / "show.png").is_file()
    assert f"{name} [last" in (tmp_path / name / "result.txt").read_text()
