"""utils.py: atomic writes, safe checkpoint loading, device selection, the cli wrapper."""
import errno

import pytest
import torch

from utils import (UserError, atomic_write, atomic_write_text, cli, interrupt_of, load_checkpoint, load_features,
                   plain_interrupts, save_checkpoint, save_features, select_device)


class _RunsCode:
    """Unpickling this creates a file: proof that code would have run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_atomic_write_keeps_previous_version_on_crash(tmp_path):
    path = tmp_path / "result.txt"
    atomic_write_text(path, "old")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]  # no temp file left


def test_disk_full_is_a_clear_error_and_cleans_up(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write_text(path, "previous")

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="disk full.*previous version.*intact"):
        atomic_write(path, full)
    assert path.read_text() == "previous" and len(list(tmp_path.iterdir())) == 1


def test_checkpoint_roundtrip(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "history": [{"loss": 1.5}], "opts": {"a": None}}
    save_checkpoint(state, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": _RunsCode(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_are_named(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(UserError, match="cut.pt.*truncated"):
        load_checkpoint(cut)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match="not an AWPCN checkpoint"):
        load_checkpoint(other)
    with pytest.raises(UserError, match="not found.*good.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_features_file_roundtrip_and_errors(tmp_path):
    run = tmp_path / "run"
    save_features(run, {"query": {"emb": torch.ones(2, 3, 4)}, "gallery": {}})
    assert load_features(run)["query"]["emb"].shape == (2, 3, 4)
    with pytest.raises(UserError, match="no such run.*runs with features: run"):
        load_features(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="test.py --name empty"):
        load_features(tmp_path / "empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu():
    with pytest.raises(UserError, match="no CUDA device.*--device cpu"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"


def test_cli_turns_user_errors_into_exit_2(capsys):
    def main():
        raise UserError("data/x: not found")

    assert cli(main)() == 2
    assert capsys.readouterr().err == "error: data/x: not found\n"
    assert cli(lambda: None)() == 0


def test_interrupt_of_follows_causes_not_contexts():
    kb = KeyboardInterrupt()
    assert interrupt_of(kb) is kb
    try:
        raise ImportError("initialization failed") from kb
    except ImportError as exc:
        assert interrupt_of(exc) is kb
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OSError("disk full while saving")      # context only: a real error
    except OSError as exc:
        assert interrupt_of(exc) is None
    assert interrupt_of(ValueError("x")) is None


def test_plain_interrupts_reraises_the_ctrl_c_behind_an_import_error():
    kb = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as caught:
        with plain_interrupts():
            raise ImportError("initialization failed") from kb
    assert caught.value is kb
    with pytest.raises(OSError):
        with plain_interrupts():
            raise OSError("a real error")
