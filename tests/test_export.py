"""export.py: ONNX of a tiny run, onnxruntime = PyTorch (dynamic and fixed batch), failures named."""
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export
from inference import Extractor
from model import AWPCN
from test_pipeline import one_epoch_run
from utils import save_checkpoint

ort = pytest.importorskip("onnxruntime", reason="requirements-export.txt not installed (scripts/venv.sh installs it)")
onnx = pytest.importorskip("onnx")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    return one_epoch_run(synthetic_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--out", str(out)]) == 0
    return out


def _delta(text: str, label: str) -> float:
    return float(re.search(re.escape(f"max |Δ{label}| ") + r"([0-9.e+-]+)", text).group(1))


def test_export_matches_pytorch_on_dynamic_batches_1_and_7(run, exported, capsys):
    proto = onnx.load(str(exported))
    inp = proto.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and dims == ["batch", 3, 64, 32]
    assert [o.name for o in proto.graph.output] == ["emb", "weights"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["flip_tta"] == "in graph" and meta["parts"] == "4" and "[0,1]" in meta["input"]
    assert meta["weighting"] == "adaptive" and meta["checkpoint"] == "last.pt" and meta["epoch"] == "1"
    # Folded: no BatchNormalization left in the trunk (the head's BatchNorm1d is a constant affine).
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) <= 1

    sess = export.ort_session(exported)
    ext = Extractor.from_run(run, device="cpu")
    g = torch.Generator().manual_seed(1)
    for n in (1, 7):
        x = torch.rand(n, 3, 64, 32, generator=g)
        emb, w = sess.run(["emb", "weights"], {"images": x.numpy()})
        ref_e, ref_w = ext(x)
        assert emb.shape == (n, 4, 32) and w.shape == (n, 4)
        assert np.abs(emb - ref_e.numpy()).max() <= 1e-4 and np.abs(w - ref_w.numpy()).max() <= 1e-4
    # Not the same output for every input (a classic broken export).
    emb, _ = sess.run(["emb", "weights"], {"images": torch.rand(3, 3, 64, 32, generator=g).numpy()})
    assert np.abs(emb[0] - emb[1]).max() > 1e-3


def test_export_prints_its_check_and_it_is_real(run, tmp_path, capsys):
    out = tmp_path / "fixed.onnx"
    assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--out", str(out), "--batch", "3",
                        "--opset", "18"]) == 0
    text = capsys.readouterr().out
    assert "random batches of 3 and 24 real images" in text
    assert "ranking of 8 real queries x 16 real gallery images: identical" in text
    assert _delta(text, "emb") <= 1e-4 and _delta(text, "emb/‖emb‖") <= 1e-4 and _delta(text, "weights") <= 1e-4
    sess = export.ort_session(out)
    assert sess.get_inputs()[0].shape == [3, 3, 64, 32]
    x = torch.rand(5, 3, 64, 32)
    emb, w = export.ort_embed(sess, x, 3)                 # 5 images through a batch-3 graph
    ref_e, ref_w = Extractor.from_run(run, device="cpu")(x)
    assert (emb - ref_e).abs().max() <= 1e-4 and (w - ref_w).abs().max() <= 1e-4
    assert not list(tmp_path.glob(".*.tmp"))


def test_stripes_that_do_not_divide_the_map_export_exactly(tmp_path):
    # 6 stripes of a 4-row map (64x32 input): the built-in ONNX adaptive pooling refuses this.
    torch.manual_seed(0)
    model = AWPCN(5, backbone="resnet18", parts=6, embed_dim=16, pretrained="none", head="spatial").eval()
    torch.nn.init.normal_(model.vis_conv.weight, std=0.05)     # weights that vary by image and stripe
    net = export.onnx_net(model)
    path = tmp_path / "p6.onnx"
    export.export_onnx(net, path, 64, 32, opset=17)
    x = torch.rand(4, 3, 64, 32)
    emb, w = export.ort_embed(export.ort_session(path), x)
    with torch.no_grad():
        ref_e, ref_w = net(x)
    assert emb.shape == (4, 6, 16)
    scale = ref_e.abs().max()
    assert (emb - ref_e).abs().max() <= 1e-4 * max(1.0, float(scale)) and (w - ref_w).abs().max() <= 1e-5
    assert ref_w.std(1).min() > 1e-4                           # not uniform: the check has teeth


def test_readme_onnxruntime_snippet_runs_and_matches(run, exported, synthetic_dir, tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Export", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    onnx_path = re.search(r'InferenceSession\("([^"]+)"', code).group(1)
    data_path = re.search(r'glob\.glob\("([^"*]+)/query', code).group(1)
    (tmp_path / onnx_path).parent.mkdir(parents=True)
    shutil.copyfile(exported, tmp_path / onnx_path)
    (tmp_path / data_path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / data_path).symlink_to(synthetic_dir)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md (Export)", "exec"), ns)
    ref_e, ref_w = Extractor.from_run(run, device="cpu")([ns["path"]])
    assert np.abs(ns["emb"] - ref_e.numpy()).max() <= 1e-4 and np.abs(ns["weights"] - ref_w.numpy()).max() <= 1e-4


def test_missing_onnxruntime_is_one_line(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "onnxruntime is not installed" in err and "pip install -r requirements-export.txt" in err
    assert not (tmp_path / "x.onnx").exists()


def test_foreign_checkpoints_are_named(run, tmp_path, capsys):
    other = tmp_path / "runs" / "foreign"
    shutil.copytree(run, other)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other / "last.pt")        # someone else's file
    assert export.main(["--name", "foreign", "--runs_dir", str(other.parent)]) == 2
    err = capsys.readouterr().err
    assert f"{other / 'last.pt'}: not an AWPCN checkpoint" in err
    save_checkpoint({"model": AWPCN(3, backbone="resnet18", parts=2, pretrained="none").state_dict()},
                    other / "last.pt")                                           # another model's weights
    assert export.main(["--name", "foreign", "--runs_dir", str(other.parent)]) == 2
    err = capsys.readouterr().err
    assert f"{other / 'last.pt'} does not fit the model described by {other / 'opts.yaml'}" in err
    assert not list(other.glob("*.onnx")) and not list(other.glob(".*.tmp"))


def test_a_failed_check_deletes_the_file_and_says_why(run, tmp_path, monkeypatch, capsys):
    real = export.ort_embed
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def normalised_twice(sess, x, batch="dynamic"):     # the classic mistake: the graph normalises already
        return real(sess, (x - mean) / std, batch)
    monkeypatch.setattr(export, "ort_embed", normalised_twice)
    out = tmp_path / "bad.onnx"
    assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{out}: the exported graph does not match PyTorch (max |Δemb/‖emb‖| " in err
    assert _delta(err, "emb/‖emb‖") > 1e-2
    assert "file deleted" in err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_batch_flag_is_checked():
    with pytest.raises(SystemExit):
        export.build_parser().parse_args(["--batch", "0"])
    assert export.build_parser().parse_args(["--batch", "8"]).batch == 8
