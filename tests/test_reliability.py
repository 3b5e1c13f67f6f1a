"""Interrupted runs lose at most one epoch; kills never leave half-written checkpoints."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from utils import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def train_cmd(data_dir, runs_dir, *extra):
    return [sys.executable, str(REPO / "train.py"), "--data_dir", str(data_dir), "--runs_dir", str(runs_dir),
            "--name", "run", "--preset", "cpu", "--height", "64", "--width", "32", "--parts", "4",
            "--embed_dim", "16", "--batchsize", "8", "--instances", "2", "--workers", "0", "--epochs", "3",
            "--warmup", "1", "--step", "2", *extra]


def wait_for_epoch(ckpt: Path, epoch: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        try:
            if ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= epoch:
                return
        except Exception:
            pass  # being replaced right now; look again
        time.sleep(0.2)
    raise AssertionError(f"no epoch {epoch} checkpoint within {timeout} s")


def test_checkpoint_write_killed_midway_leaves_previous_intact(tmp_path):
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import utils
        utils.save_checkpoint({{"epoch": 1, "model": {{"w": torch.ones(3)}}}}, {str(path)!r})
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        utils.save_checkpoint({{"epoch": 2, "model": {{"w": torch.zeros(3)}}}}, {str(path)!r})
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


@pytest.mark.slow
def test_sigkill_during_training_then_resume_equals_uninterrupted(synthetic_dir, tmp_path):
    """python -m pytest -m slow tests/test_reliability.py"""
    full = tmp_path / "full"
    subprocess.run(train_cmd(synthetic_dir, full), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(synthetic_dir, killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_epoch(killed / "run" / "last.pt", 1, proc)
    time.sleep(0.5)  # well inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert load_checkpoint(killed / "run" / "last.pt")["epoch"] in (1, 2)
    subprocess.run(train_cmd(synthetic_dir, killed, "--resume"), check=True, capture_output=True, timeout=600)
    a = load_checkpoint(full / "run" / "last.pt")
    b = load_checkpoint(killed / "run" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_ctrl_c_saves_weights_and_exits_cleanly(synthetic_dir, tmp_path):
    # A suite started in the background (nohup ... &) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child the default, as a terminal would.
    proc = subprocess.Popen(train_cmd(synthetic_dir, tmp_path, "--epochs", "50"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_epoch(tmp_path / "run" / "last.pt", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    inter = load_checkpoint(tmp_path / "run" / "interrupted.pt")
    assert inter["epoch"] >= 1 and "model" in inter
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] >= 1
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
