"""Smoke run of bench/accuracy.py at a tiny size: the table it writes has every variant."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_accuracy_bench_tiny(synthetic_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    rc = bench.main(["--data_dir", str(synthetic_dir), "--out", str(out), "--seeds", "0", "--workers", "0",
                     "--", "--epochs", "1", "--height", "64", "--width", "32", "--batchsize", "8",
                     "--instances", "2", "--workers", "0", "--embed_dim", "16"])
    assert rc == 0
    table = (out / "results.md").read_text()
    for row in ("global (P=1)", "PCB (P=6, uniform)", "AWPCN (P=6, adaptive)", "uniform weights at test",
                "occluded (≥ half hidden)", "occluded queries only"):
        assert row in table, row
    records = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in records] == ["global", "pcb", "awpcn"]
    assert all(0 <= r["learned"]["mAP"] <= 1 for r in records)
    # A second call reuses the finished runs instead of training again.
    before = (out / "runs" / "pcb_s0" / "last.pt").stat().st_mtime_ns
    bench.main(["--data_dir", str(synthetic_dir), "--out", str(out), "--seeds", "0", "--workers", "0",
                "--variants", "pcb"])
    assert (out / "runs" / "pcb_s0" / "last.pt").stat().st_mtime_ns == before
