"""train.py: exact and honest resumption, out-of-memory handling, run folders, random streams
under several processes, and the validation split."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datasets
import train
from test_pipeline import tiny_opts
from utils import UserError, load_checkpoint, load_yaml

REPO = Path(__file__).resolve().parents[1]


def _log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


def test_resume_keeps_stored_options_and_says_what_the_command_line_changes(synthetic_dir, tmp_path):
    runs = tmp_path / "runs"
    # A run made with --epochs 2 --save_every 1 (the cpu preset says 8 and 0).
    first = ["--data_dir", str(synthetic_dir), "--runs_dir", str(runs), "--preset", "cpu", "--height", "64",
             "--width", "32", "--parts", "4", "--embed_dim", "16", "--batchsize", "8", "--instances", "2",
             "--workers", "0", "--warmup", "1", "--epochs", "2", "--save_every", "1"]
    train.train(train.parse_opts(first), stop_after_epoch=1)
    # Resuming with no flags at all (not even the preset) keeps every stored option.
    out = train.train(train.parse_opts(["--runs_dir", str(runs), "--resume"]))
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert (runs / "awpcn" / "epoch_002.pt").is_file()          # save_every 1 kept, not the default 10
    assert load_yaml(runs / "awpcn" / "opts.yaml")["epochs"] == 2
    assert "->" not in _log(runs / "awpcn")
    # A flag given on the command line extends the run and is said.
    out = train.train(train.parse_opts(["--runs_dir", str(runs), "--resume", "--epochs", "3"]))
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    assert "--epochs 2 -> 3 (from the command line)" in _log(runs / "awpcn")
    # What the network or the data is cannot change under --resume.
    with pytest.raises(UserError, match="--parts 6 differs from the run.*parts 4"):
        train.train(train.parse_opts(["--runs_dir", str(runs), "--resume", "--parts", "6"]))


def test_parse_opts_records_only_the_flags_typed():
    opts = train.parse_opts(["--preset", "cpu", "--epochs", "3", "--no-channels_last", "--amp"])
    assert opts["given"] == ["amp", "channels_last", "epochs", "preset"]
    assert train.parse_opts([])["given"] == []


class _OOMInBackward(torch.autograd.Function):
    """Identity forward; raises what torch raises when memory runs out, during backward."""
    kind = RuntimeError

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise _OOMInBackward.kind("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("kind", ["cuda", "plain"])
def test_out_of_memory_in_backward_is_a_clear_message(synthetic_dir, tmp_path, monkeypatch, kind):
    # torch.cuda.OutOfMemoryError exists on every torch the requirements admit; before 2.5 there
    # is no torch.OutOfMemoryError, and a CPU allocator failure is a plain RuntimeError.
    _OOMInBackward.kind = torch.cuda.OutOfMemoryError if kind == "cuda" else RuntimeError
    real = train.awpcn_loss

    def loss_that_fails_in_backward(*a, **k):
        loss, terms = real(*a, **k)
        return _OOMInBackward.apply(loss), terms

    monkeypatch.setattr(train, "awpcn_loss", loss_that_fails_in_backward)
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)   # as on torch < 2.5
    with pytest.raises(UserError, match=r"out of memory on a batch of 8 images at 64x32 \(epoch 1, iteration 1\)"):
        train.train(tiny_opts(synthetic_dir, tmp_path))


def test_other_runtime_errors_are_not_called_out_of_memory(synthetic_dir, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(train, "awpcn_loss", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train.train(tiny_opts(synthetic_dir, tmp_path))


def test_a_run_that_cannot_start_leaves_no_folder_and_an_empty_one_is_reused(synthetic_dir, tmp_path,
                                                                              monkeypatch, capsys):
    import model

    def offline(name):
        raise UserError(f"could not get ImageNet weights for {name} (URLError: no network?)")

    monkeypatch.setattr(model, "_imagenet_state_dict", offline)
    with pytest.raises(UserError, match="could not get ImageNet weights"):
        train.train(tiny_opts(synthetic_dir, tmp_path, "run", "--pretrained", "imagenet"))
    assert not (tmp_path / "run").exists()
    # A folder an earlier version left without any checkpoint is not a run to protect.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "opts.yaml").write_text("{}\n")
    (tmp_path / "run" / "train.log").write_text("")
    train.train(tiny_opts(synthetic_dir, tmp_path, "run", "--epochs", "1"))
    assert "reusing" in capsys.readouterr().out and (tmp_path / "run" / "last.pt").is_file()
    with pytest.raises(UserError, match="already exists"):
        train.train(tiny_opts(synthetic_dir, tmp_path, "run", "--epochs", "1"))


def test_relative_data_dir_is_stored_absolute(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(synthetic_dir.parent)
    train.train(tiny_opts(Path(synthetic_dir.name), tmp_path, "run", "--epochs", "1"))
    stored = load_yaml(tmp_path / "run" / "opts.yaml")
    assert stored["data_dir"] == str(synthetic_dir.resolve()) and Path(stored["data_root"]).is_absolute()


def _batch(loader):
    return next(iter(loader))[0]


def test_augmentation_streams_differ_by_rank_and_replay_by_rank(synthetic_dir):
    data = datasets.load_dataset(synthetic_dir, log=lambda *_: None)
    bank = [(p, label) for p, label, _ in data.train]
    t = datasets.build_transforms(64, 32, train=True, occlude_prob=0.5, occluder="patch", occluder_bank=bank)
    ds = datasets.ImageDataset(data.train, t)
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]

    def loader(rank):
        return train.train_loader(ds, batches, seed=0, epoch=3, rank=rank, workers=2)

    r0, r0_again, r1 = _batch(loader(0)), _batch(loader(0)), _batch(loader(1))
    assert torch.equal(r0, r0_again)          # the same rank replays exactly (resume)
    assert not torch.equal(r0, r1)            # another rank draws other crops, flips, occluders
    other_epoch = _batch(train.train_loader(ds, batches, seed=0, epoch=4, rank=0, workers=2))
    assert not torch.equal(r0, other_epoch)
    assert len({train.stream_seed(s, e, r, k) for s in range(3) for e in range(3) for r in range(3)
                for k in range(2)}) == 54


def test_unused_parameters_are_declared_when_the_head_gets_no_gradient():
    base = {"weighting": "adaptive", "head": "visibility", "vis_weight": 1.0, "fused_weight": 1.0}
    assert not train.has_unused_parameters(base)
    assert train.has_unused_parameters({**base, "vis_weight": 0.0})
    assert train.has_unused_parameters({**base, "head": "spatial", "vis_weight": 0.0})
    assert train.has_unused_parameters({**base, "head": "softmax", "fused_weight": 0.0})
    assert not train.has_unused_parameters({**base, "head": "softmax"})
    assert not train.has_unused_parameters({**base, "weighting": "uniform", "vis_weight": 0.0})


def test_ddp_with_workers_and_a_head_without_gradient(synthetic_dir, tmp_path):
    """Two gloo processes, 2 loader workers each, and the softmax head with no fused CE (its
    parameters get no gradient: DDP must have been told)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), "--data_dir", str(synthetic_dir), "--runs_dir", str(tmp_path),
           "--name", "ddp", "--preset", "cpu", "--height", "64", "--width", "32", "--parts", "4",
           "--embed_dim", "16", "--batchsize", "8", "--instances", "2", "--epochs", "1", "--workers", "2",
           "--device", "cpu", "--head", "softmax", "--fused_weight", "0"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["epoch"] == 1


def test_validation_split_trains_on_the_rest_and_reports_visibility_error(synthetic_dir, tmp_path):
    out = train.train(tiny_opts(synthetic_dir, tmp_path, "run", "--val_ids", "0.25", "--epochs", "1"))
    full = datasets.load_dataset(synthetic_dir, log=lambda *_: None)
    rest, val = datasets.carve_validation(full, 0.25)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["train_pids"] == rest.train_pids and len(rest.train_pids) == 9
    assert not set(rest.train_pids) & {p for _, p, _ in val.query + val.gallery}
    assert 0 <= out["history"][-1]["vis_mae"] <= 1
    assert "vis_mae" in _log(tmp_path / "run") and "validation: 3 ids" in _log(tmp_path / "run")


def test_invariance_training_logs_the_term_and_pulls_occluded_features_to_clean(synthetic_dir, tmp_path):
    out = train.train(tiny_opts(synthetic_dir, tmp_path, "inv", "--invariance", "1", "--epochs", "1"))
    rec = out["history"][-1]
    assert 0 < rec["invariance"] < 2 and "invariance" in _log(tmp_path / "inv")
    # off by default: no term, no clean copies
    assert train.parse_opts(["--data_dir", str(synthetic_dir)])["invariance"] == 0
