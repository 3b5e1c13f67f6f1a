"""Deployment: Extractor on onnxruntime / OpenVINO = PyTorch; export.py --int8 and its budget; errors named."""
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import export
from inference import EXPORT_FILE, INT8_FILE, Extractor, ExportedModel
from test_pipeline import one_epoch_run
from utils import UserError, load_checkpoint, load_yaml, save_checkpoint

pytest.importorskip("onnxruntime", reason="requirements-export.txt not installed (scripts/venv.sh installs it)")
pytest.importorskip("onnx", reason="requirements-export.txt not installed (scripts/venv.sh installs it)")
REPO = Path(__file__).resolve().parents[1]
FP32_RUNTIMES = ["onnxruntime", "openvino"]
TOL = 1e-4


def _needs(runtime):
    pytest.importorskip(runtime, reason=f"{runtime} not installed (pip install -r requirements-export.txt)")


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    return one_epoch_run(synthetic_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run):
    """export.py --int8 into the run: (its printout, fp32 file, int8 file)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--int8", "--calib", "24"]) == 0
    return out.getvalue(), run / EXPORT_FILE, run / INT8_FILE


@pytest.fixture(scope="module")
def crops(synthetic_dir):
    return [str(p) for p in sorted((synthetic_dir / "query").glob("*.jpg"))[:10]]


def _unit(e):
    return F.normalize(e, dim=-1)


@pytest.mark.parametrize("runtime", FP32_RUNTIMES)
def test_fp32_runtimes_give_pytorchs_numbers(run, exported, crops, runtime):
    _needs(runtime)
    ref = Extractor.from_run(run, device="cpu")
    ext = Extractor.from_run(run, runtime=runtime, threads=1, batch_size=4)     # 10 crops: batches 4, 4, 2
    assert (ext.runtime, ext.parts, ext.embed_dim, ext.weighting) == (runtime, 4, 32, ref.weighting)
    assert ext.model.precision == "fp32" and ext.model.flip_in_graph
    x = torch.rand(3, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    for images in (crops, x):
        (e, w), (re, rw) = ext(images), ref(images)
        assert e.dtype == torch.float32 and e.shape == re.shape and w.shape == rw.shape
        assert (_unit(e) - _unit(re)).abs().max() <= TOL and (w - rw).abs().max() <= TOL
    assert rw.std(1).max() > 1e-4          # weights that vary by image: the comparison has teeth
    empty_e, empty_w = ext([])
    assert empty_e.shape == (0, 4, 32) and empty_w.shape == (0, 4)
    # What the feature cache keys on says which file and runtime made the numbers.
    assert ext.identity["runtime"] == runtime and ext.identity["model_file"] == str((run / EXPORT_FILE).resolve())
    assert ext.distance(ext(crops[:2]), ext(crops)).shape == (2, 10)
    same = Extractor.from_file(run / EXPORT_FILE, runtime)
    assert (same.height, same.width) == (64, 32) and (_unit(same(crops)[0]) - _unit(ref(crops)[0])).abs().max() <= TOL


def test_a_graph_without_flip_gets_the_mirror_around_it(run, crops, tmp_path):
    path = tmp_path / "single.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main(["--name", "run", "--runs_dir", str(run.parent), "--out", str(path), "--no_flip"]) == 0
    for flip in (True, False):
        ref = Extractor.from_run(run, device="cpu", flip=flip)(crops)
        out = Extractor.from_run(run, runtime="onnxruntime", model_file=path, flip=flip)(crops)
        assert (_unit(out[0]) - _unit(ref[0])).abs().max() <= TOL and (out[1] - ref[1]).abs().max() <= TOL
    with pytest.raises(UserError, match=r"flip TTA is inside this graph.*--no_flip"):
        Extractor.from_run(run, runtime="onnxruntime", flip=False)


def test_int8_is_written_verified_and_ranks_like_fp32(run, exported, crops, synthetic_dir):
    text, fp32, int8 = exported
    assert int8.is_file() and not list(run.glob(".*.tmp"))
    assert "int8 vs fp32 (onnxruntime" in text and f"wrote {int8}" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith(("fp32 ", "int8 "))}
    assert set(rows) == {"fp32", "int8"}
    net = ExportedModel(int8, "onnxruntime")
    assert net.precision == "int8" and "MinMax on 24 images" in net.meta["quantization"]
    import onnx
    n_int8, n_conv = export.int8_convolutions(onnx.load(str(int8)))
    assert n_int8 == n_conv > 0                             # every trunk convolution is int8
    assert int8.stat().st_size < fp32.stat().st_size / 2
    gallery = [str(p) for p in sorted((synthetic_dir / "bounding_box_test").glob("*.jpg"))[:40]]
    ref = Extractor.from_run(run, runtime="onnxruntime")
    runtimes = ["onnxruntime"] + (["openvino"] if _installed("openvino") else [])
    for runtime in runtimes:
        ext = Extractor.from_run(run, runtime=runtime, int8=True)
        d8, d32 = ext.distance(ext(crops), ext(gallery)), ref.distance(ref(crops), ref(gallery))
        cos = (_unit(ext(crops)[0]) * _unit(ref(crops)[0])).sum(-1)
        assert cos.mean() > 0.95, (runtime, cos.mean())
        top1 = (d8.argmin(1) == d32.argmin(1)).float().mean()
        assert top1 >= 0.6, (runtime, top1)


def _installed(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_int8_over_the_budget_is_refused_and_nothing_is_left(run, exported, tmp_path, capsys):
    # export.py's int8 step on a copy of the verified fp32 file (main() would export fp32 again first).
    out = tmp_path / "m.onnx"
    shutil.copyfile(exported[1], out)
    args = export.build_parser().parse_args(["--name", "run", "--runs_dir", str(run.parent), "--out", str(out),
                                             "--int8", "--calib", "8", "--max_map_loss", "-100"])
    opts = load_yaml(run / "opts.yaml")
    with pytest.raises(UserError) as err:
        export.export_int8(args, out, opts, *export._int8_inputs(args, run, opts))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'm.int8.onnx'}: int8 loses ")
    assert "> --max_map_loss -100" in msg and f"file not kept ({out} is)" in msg and "fp32 Rank-1" in msg
    assert "int8 vs fp32" in capsys.readouterr().out       # the side-by-side table came first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]     # fp32 kept, no int8, no temp file


def test_int8_inputs_are_checked_before_exporting(run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    base = ["--name", "run", "--runs_dir", str(run.parent), "--out", str(out), "--int8"]
    assert export.main(base + ["--calib_data", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such folder for the int8 calibration images" in capsys.readouterr().err
    assert export.main(base + ["--calib", "0"]) == 2
    assert "--calib 0: must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_missing_runtime_is_one_line_naming_the_package(run, exported, monkeypatch, runtime):
    monkeypatch.setitem(sys.modules, runtime, None)
    for make in (lambda: Extractor.from_run(run, runtime=runtime), lambda: ExportedModel(exported[1], runtime)):
        with pytest.raises(UserError) as err:
            make()
        msg = str(err.value)
        assert "\n" not in msg and f"needs the {runtime} package" in msg and f"pip install {runtime}" in msg


def test_a_missing_export_names_the_command_that_makes_it(run, tmp_path):
    bare = tmp_path / "runs" / "bare"
    bare.mkdir(parents=True)
    shutil.copyfile(run / "opts.yaml", bare / "opts.yaml")
    (bare / "last.pt").symlink_to(run / "last.pt")
    with pytest.raises(UserError) as err:
        Extractor.from_run(bare, runtime="onnxruntime")
    assert str(err.value) == (f"{bare / EXPORT_FILE}: no exported model; make it with "
                              f"`python export.py --runs_dir {bare.parent} --name bare`")
    with pytest.raises(UserError, match=rf"{INT8_FILE}: no exported model; .*--name bare --int8`"):
        Extractor.from_run(bare, runtime="openvino", int8=True)
    with pytest.raises(UserError, match=r"nope\.onnx: no such file; export\.py writes it"):
        Extractor.from_file(tmp_path / "nope.onnx")


def test_a_stale_or_foreign_export_is_refused(run, exported, tmp_path):
    other = tmp_path / "runs" / "later"
    other.mkdir(parents=True)
    shutil.copyfile(run / "opts.yaml", other / "opts.yaml")
    shutil.copyfile(exported[1], other / EXPORT_FILE)
    ckpt = load_checkpoint(run / "last.pt")
    save_checkpoint({**ckpt, "epoch": ckpt["epoch"] + 1}, other / "last.pt")        # trained on after the export
    with pytest.raises(UserError, match=rf"exported from last\.pt at epoch 1, and {other / 'last.pt'} is at epoch 2\); "
                                        rf"export it again: python export\.py --runs_dir {other.parent} --name later$"):
        Extractor.from_run(other, runtime="onnxruntime")
    (other / EXPORT_FILE).write_bytes(b"not a graph")
    with pytest.raises(UserError, match=r"onnxruntime cannot load it"):
        Extractor.from_run(other, runtime="onnxruntime")


def test_options_that_do_not_apply_are_named(run, exported):
    with pytest.raises(UserError, match=r"runtime='tensorrt': expected one of 'torch', 'onnxruntime', 'openvino'"):
        Extractor.from_run(run, runtime="tensorrt")
    with pytest.raises(UserError, match=r"threads are for runtime='onnxruntime' or 'openvino'.*torch\.set_num_threads"):
        Extractor.from_run(run, threads=2)
    with pytest.raises(UserError, match=r"device='cuda': runtime 'onnxruntime' runs on the CPU"):
        Extractor.from_run(run, runtime="onnxruntime", device="cuda")
    with pytest.raises(UserError, match=r"threads=0: expected a positive number"):
        ExportedModel(exported[1], threads=0)


def _deploy_speed(synthetic_dir, out, *extra):
    sys.path.insert(0, str(REPO / "bench"))
    import deploy_speed
    runtimes = "torch,ort,ort-int8" + (",ov,ov-int8" if _installed("openvino") else "")
    assert deploy_speed.main(["--backbones", "resnet18", "--sizes", "64x32", "--calls", "4", "--rounds", "2",
                              "--warmup", "1", "--settle", "0", "--threads", "1", "--batch", "2", "--batch_rounds", "1",
                              "--calib", "8", "--runtimes", runtimes, "--data", str(synthetic_dir), "--out", str(out),
                              *extra]) == 0
    return json.loads((out / "bench.json").read_text()), len(runtimes.split(","))


def test_deploy_speed_smoke(synthetic_dir, tmp_path, capsys):
    record, n = _deploy_speed(synthetic_dir, tmp_path)
    assert len(record["latency"]) == n and record["accuracy"] == []
    for row in record["latency"]:
        assert row["latency_ms"]["calls"] == 4 and row["throughput"]["batch"] == 2
        if row["runtime"] in ("ort", "ov"):
            assert row["vs_first"]["unit_emb"] <= TOL and row["vs_first"]["weights"] <= TOL
    assert "| model | runtime | threads | batch-1 median ms |" in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text().startswith("Command: `python bench/deploy_speed.py --backbones")


@pytest.mark.slow
def test_deploy_speed_accuracy_of_a_run(run, synthetic_dir, tmp_path, capsys):
    record, n = _deploy_speed(synthetic_dir, tmp_path, "--run", str(run), "--calls", "2", "--batch", "0")
    acc = {r["runtime"]: r for r in record["accuracy"]}
    assert len(acc) == n and acc["torch"]["top10_same"] == 1.0
    assert acc["ort"]["mAP"] == pytest.approx(acc["torch"]["mAP"], abs=1e-3) and acc["ort"]["top10_same"] == 1.0
    assert "| runtime | Rank-1 | mAP |" in capsys.readouterr().out
