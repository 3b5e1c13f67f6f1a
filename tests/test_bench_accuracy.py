"""Smoke run of bench/accuracy.py at a tiny size: the table it writes has every variant."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from utils import save_yaml

REPO = Path(__file__).resolve().parents[1]


# A training run as small as bench/accuracy.py can make: train.py flags after "--".
TINY = ["--", "--epochs", "1", "--height", "64", "--width", "32", "--batchsize", "8",
        "--instances", "2", "--workers", "0", "--embed_dim", "16"]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench():
    return _load("bench_accuracy", "accuracy.py")


def _probe():
    return _load("head_probe", "head_probe.py")


def test_accuracy_bench_tiny(synthetic_dir, tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "out"
    base = ["--data_dir", str(synthetic_dir), "--out", str(out), "--workers", "0"]
    rc = bench.main([*base, "--seeds", "0", *TINY])
    assert rc == 0
    table = (out / "results.md").read_text()
    for row in ("global (P=1)", "PCB (P=6, uniform)", "AWPCN (P=6, adaptive)", "uniform weights at test",
                "occluded (≥ half hidden)", "occluded queries only"):
        assert row in table, row
    records = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in records] == ["global", "pcb", "awpcn"]
    assert all(0 <= r["learned"]["mAP"] <= 1 for r in records)
    assert "AWPCN − PCB, paired by seed (0): mAP " in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second call reuses the finished runs instead of training again, and --records copies
    # their small record (what gets committed while the run itself lives elsewhere)...
    before = (out / "runs" / "pcb_s0" / "last.pt").stat().st_mtime_ns
    rec = tmp_path / "records"
    assert bench.main([*base, "--seeds", "0", "--variants", "pcb", "--records", str(rec), *TINY]) == 0
    assert (out / "runs" / "pcb_s0" / "last.pt").stat().st_mtime_ns == before
    assert sorted(p.name for p in (rec / "pcb_s0").iterdir()) == ["bench.json", "opts.yaml", "train.log"]
    assert json.loads((rec / "pcb_s0" / "bench.json").read_text())["variant"] == "pcb"
    # Features on another set (an occlusion benchmark) leave the run's own test results alone.
    run = out / "runs" / "pcb_s0"
    kept = {f: (run / f).read_bytes() for f in ("result.txt", "cmc.png", "features.pt")}
    feats = bench._test_features("pcb_s0", out / "runs", 0, str(synthetic_dir))
    assert feats["query"]["emb"].shape[1] == 6 and len(feats["query"]["paths"]) == len(feats["query"]["pids"])
    assert {f: (run / f).read_bytes() for f in kept} == kept
    # ...but never one made with other flags,
    capsys.readouterr()
    assert bench.main([*base, "--seeds", "0", "--variants", "pcb", "--", "--epochs", "2"]) == 2
    assert "pcb_s0/bench.json: this run was made with preset 'cpu' and train.py flags" in capsys.readouterr().err
    # and --report tabulates every finished run without training.
    (out / "results.md").unlink()
    assert bench.main([*base, "--report", *TINY]) == 0
    assert "| PCB (P=6, uniform) | 0 |" in (out / "results.md").read_text()
    assert bench.main([*base, "--report"]) == 2
    assert "no finished run made with preset 'cpu' and train.py flags []" in capsys.readouterr().err


def test_validation_uniform_weighting_reuses_the_learned_runs_features(synthetic_dir, tmp_path):
    # val_uniform is computed from the features the learned evaluation extracted: it must be
    # what test.py --split val --weighting uniform reports after extracting on its own (the
    # same split, the same images; features of any other set would not match).
    bench = _bench()
    out = tmp_path / "out"
    assert bench.main(["--data_dir", str(synthetic_dir), "--out", str(out), "--workers", "0", "--seeds", "0",
                       "--variants", "awpcn", *TINY, "--val_ids", "0.3"]) == 0
    record = json.loads((out / "runs" / "awpcn_s0" / "bench.json").read_text())
    import results
    args = results.build_parser().parse_args(["--name", "awpcn_s0", "--runs_dir", str(out / "runs"), "--workers",
                                              "0", "--split", "val", "--weighting", "uniform"])
    alone = results.run_test(args)["plain"]
    assert record["val_uniform"] == pytest.approx({m: float(alone[m]) for m in bench.METRICS}, abs=1e-6)


def test_a_finished_run_matches_its_flags_in_any_order_or_spelling(tmp_path):
    bench = _bench()
    record = {"variant": "awpcn", "preset": "cpu", "train_args": ["--epochs", "12", "--lr", "0.1", "--head", "spatial"]}
    args = lambda *flags: argparse.Namespace(preset="cpu", train_args=list(flags))  # noqa: E731
    same = lambda *flags: bench._made_with(record, args(*flags))  # noqa: E731
    assert same("--head", "spatial", "--lr=0.1", "--epochs", "12")
    assert not same("--epochs", "12", "--lr", "0.05", "--head", "spatial")
    assert not same("--epochs", "12", "--lr", "0.1")          # today's default head is another
    # A default typed out trains the same network as a default left out.
    assert same("--epochs", "12", "--lr", "0.1", "--head", "spatial", "--occlude_prob", "0.3")
    # With the run's opts.yaml at hand, what it was trained with decides, not the flags it was
    # started with under the defaults of its day: a run made when `spatial` was the default
    # is not today's default run, whatever its record says.
    run = tmp_path / "awpcn_s0"
    run.mkdir()
    trained = bench._train_settings("cpu", [*bench.VARIANTS["awpcn"], "--epochs", "12", "--head", "spatial"])
    save_yaml(run / "opts.yaml", {**trained, "name": "awpcn_s0", "data_root": "/somewhere", "num_classes": 7})
    old = {"variant": "awpcn", "preset": "cpu", "train_args": ["--epochs", "12"]}
    assert not bench._made_with(old, args("--epochs", "12"), run)
    assert bench._made_with(old, args("--epochs", "12", "--head", "spatial"), run)
    # An opts.yaml from before an option existed still matches (the option is not compared).
    save_yaml(run / "opts.yaml", {k: v for k, v in trained.items() if k != "invariance"})
    assert bench._made_with(old, args("--epochs", "12", "--head", "spatial", "--invariance", "0"), run)


def test_a_run_trained_from_the_same_weights_file_in_another_venv_still_matches(tmp_path):
    bench = _bench()
    here, there, other = tmp_path / "venv_a" / "w.pt", tmp_path / "venv_b" / "w.pt", tmp_path / "c" / "w.pt"
    for path, data in ((here, b"imagenet"), (there, b"imagenet"), (other, b"something else")):
        path.parent.mkdir()
        path.write_bytes(data)
    assert bench._same_setting("weights", str(there), str(here))
    assert bench._same_setting("weights", "/gone/venv/w.pt", str(here))     # the old venv is gone
    assert not bench._same_setting("weights", str(other), str(here))        # same name, other bytes
    assert not bench._same_setting("weights", str(tmp_path / "x.pt"), str(here))
    assert not bench._same_setting("lr", 0.1, 0.05)


def test_table_reports_paired_seeds_and_their_spread():
    bench = _bench()
    rec = lambda v, s, m: {"variant": v, "seed": s, "train_seconds": 60.0,  # noqa: E731
                           "learned": {"rank1": m + 0.2, "rank5": m + 0.3, "mAP": m, "mINP": m / 2}}
    records = [rec("pcb", 0, 0.50), rec("awpcn", 0, 0.55), rec("pcb", 1, 0.40), rec("awpcn", 1, 0.47),
               rec("global", 0, 0.30)]
    args = argparse.Namespace(data_dir="d", preset="cpu", train_args=[])
    text = bench.markdown(records, args)
    assert "| PCB (P=6, uniform) | 0,1 | 65.0 ± 7.1 | 75.0 ± 7.1 | 45.0 ± 7.1 | 22.5 ± 3.5 |" in text
    assert "| global (P=1) | 0 | 50.0 | 60.0 | 30.0 | 15.0 |" in text
    # Differences are paired by seed: +5 and +7 points.
    assert "AWPCN − PCB, paired by seed (0,1): mAP +6.0 ± 1.4, Rank-1 +6.0 ± 1.4 points." in text


def test_compare_picks_each_variant_on_validation_and_tabulates_the_chosen(tmp_path):
    bench = _bench()
    m = lambda x: {"rank1": x, "rank5": x, "mAP": x, "mINP": x}  # noqa: E731

    def write(out, lr, pcb_val, awpcn_val):
        out.mkdir()
        recs = [{"variant": v, "seed": 0, "preset": "cpu", "train_args": ["--lr", lr], "train_seconds": 60.0,
                 "val": m(val), "learned": m(val / 2)} for v, val in (("pcb", pcb_val), ("awpcn", awpcn_val))]
        (out / "results.json").write_text(json.dumps(recs))

    write(tmp_path / "a", "0.05", 0.50, 0.60)
    write(tmp_path / "b", "0.1", 0.55, 0.58)
    text = bench.compare([str(tmp_path / "a"), str(tmp_path / "b")])
    assert f"best pcb on validation mAP (seeds 0, common to every configuration): {tmp_path / 'b'} (55.0)" in text
    assert f"best awpcn on validation mAP (seeds 0, common to every configuration): {tmp_path / 'a'} (60.0)" in text
    # The test-split table holds the chosen runs: PCB at 0.1 (27.5), AWPCN at 0.05 (30.0).
    assert "| PCB (P=6, uniform) | 0 | 27.5 | 27.5 | 27.5 | 27.5 |" in text
    assert "AWPCN − PCB, paired by seed (0): mAP +2.5, Rank-1 +2.5 points." in text
    # More seeds of the chosen configuration (a worse seed 1) do not change the choice: it is
    # made on the seeds every configuration has; the table then holds both seeds.
    recs = json.loads((tmp_path / "a" / "results.json").read_text())
    recs.append({**recs[1], "seed": 1, "val": m(0.40), "learned": m(0.20)})
    (tmp_path / "a" / "results.json").write_text(json.dumps(recs))
    text = bench.compare([str(tmp_path / "a"), str(tmp_path / "b")])
    assert f"best awpcn on validation mAP (seeds 0, common to every configuration): {tmp_path / 'a'} (60.0)" in text
    assert "| AWPCN (P=6, adaptive) | 0,1 | 25.0 ± 7.1 |" in text


def test_occlusion_benchmark_oracle_and_clean_spread_on_a_hand_built_case():
    import torch

    bench = _bench()
    t = torch.tensor
    # Query a (id 1) has its lower stripe hidden, and that stripe looks like id 2's; query b
    # (id 2) is clean. Gallery: g0 = id 1, g1 = id 2, both seen by another camera.
    feats = {
        "query": {"paths": ["x/query/a.jpg", "x/query/b.jpg"], "pids": t([1, 2]), "cams": t([1, 1]),
                  "emb": t([[[1.0, 0.0], [1.0, 0.0]], [[0.9, 0.1], [1.0, 0.0]]]),
                  "weights": t([[0.8, 0.2], [0.5, 0.5]])},
        "gallery": {"paths": ["x/bounding_box_test/g0.jpg", "x/bounding_box_test/g1.jpg"], "pids": t([1, 2]),
                    "cams": t([2, 2]), "emb": t([[[1.0, 0.0], [0.0, 1.0]], [[0.9, 0.1], [1.0, 0.0]]]),
                    "weights": t([[0.55, 0.45], [0.5, 0.5]])}}
    truth = {"root": Path("x"), "images": {"query/a.jpg": {"hidden_rows": [0, 0, 1, 1]}, "query/b.jpg": None,
                                           "bounding_box_test/g0.jpg": None, "bounding_box_test/g1.jpg": None}}
    opts = {"weighting": "adaptive", "parts": 2, "height": 64, "last_stride": 1}     # 4 feature rows
    originals = t([[[1.0, 0.0], [0.0, 1.0]], [[0.9, 0.1], [1.0, 0.0]]])            # a unoccluded = g0
    rec = bench.occlusion_benchmark(feats, truth, opts, "bench", originals)
    # uniform: the hidden stripe pulls a to id 2; the oracle drops it and finds id 1 first
    assert rec["uniform_at_test"]["occluded"]["rank1"] == 0
    assert rec["oracle_weights"]["occluded"]["rank1"] == 1
    assert rec["learned"]["clean"]["rank1"] == 1
    w = rec["weights"]
    assert w["occluded_stripes"] == pytest.approx(0.4) and w["visible_stripes_of_occluded_images"] == pytest.approx(1.6)
    # clean stripes x P: 1, 1 (b), 1.1, 0.9 (g0), 1, 1 (g1)
    assert w["stripes_of_clean_images"] == pytest.approx(1.0)
    assert w["clean_mean_abs_deviation"] == pytest.approx(0.2 / 6)
    assert w["clean_within_0.05"] == pytest.approx(4 / 6)
    c = rec["contamination"]                                          # occluded query a only
    assert c["original"]["rank1"] == 1 and c["occluded"]["rank1"] == 0
    assert c["original_visible_only"]["rank1"] == 1 and c["occluded_visible_only"]["rank1"] == 1
    assert c["cos_visible"] == pytest.approx(1.0) and c["cos_hidden"] == pytest.approx(0.0)
    assert bench._bench_done(rec, opts)
    assert not bench._bench_done({k: v for k, v in rec.items() if k != "contamination"}, opts)
    text = "\n".join(bench._bench_section([{"variant": "awpcn", "seed": 0, "occ_bench": rec}], "occ_bench", "T"))
    assert "| AWPCN checkpoint, true visibility as query weights (oracle) | 0 | 100.0 |" in text
    assert "AWPCN learned − true-visibility (oracle) weights, same checkpoints (0): mAP" in text
    assert "| clean images: share of stripes within 1 ± 0.05 | 0.667 |" in text
    # official (trapezoid) AP of one match at rank 2: (0 + 1/2) / 2
    assert "| awpcn | 0 | 100.0 | 25.0 | 100.0 | 100.0 | 1.000 | 0.000 |" in text


def test_head_probe_scores_a_perfect_head_on_a_hand_built_case():
    import torch

    probe = _probe()
    # Two images, a 6x1 trunk map whose one channel is +20 where visible and -20 where hidden;
    # the head is the identity, so it predicts visibility exactly. Image 0 has its lower half
    # hidden, image 1 is clean.
    vis = torch.ones(2, 12, 2)
    vis[0, 6:] = 0
    maps = torch.where(vis[:, ::2, :1] > 0, 20.0, -20.0).permute(0, 2, 1).unsqueeze(-1)   # (2, 1, 6, 1)
    head = torch.nn.Conv2d(1, 1, 1)
    torch.nn.init.ones_(head.weight)
    torch.nn.init.zeros_(head.bias)
    s = probe.score(head, maps, vis, parts=6)
    assert s["vis_mae"] < 1e-6
    # Image 0: three visible stripes share the weight, 1/3 each = 2 x uniform; hidden ones 0.
    assert s["w_occluded_stripes"] < 1e-6
    assert abs(s["w_visible_stripes_of_occluded"] - 2.0) < 1e-6
    # A head that says "all visible" everywhere errs by the hidden half of image 0 (3 of 12 stripes).
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, 20.0)
    s = probe.score(head, maps, vis, parts=6)
    assert abs(s["vis_mae"] - 0.25) < 1e-6 and abs(s["w_occluded_stripes"] - 1.0) < 1e-6


def test_head_probe_ranks_the_benchmark_with_the_given_head_and_leaves_the_model_alone(synthetic_dir, tmp_path):
    import torch

    import converters
    import train
    from model import build_model

    probe = _probe()
    occluded = tmp_path / "occ"
    converters.make_occluded(synthetic_dir, occluded, fraction=0.5, seed=0, log=lambda *_: None)
    opts = train.parse_opts(["--data_dir", str(synthetic_dir), "--backbone", "resnet18", "--pretrained", "none",
                             "--height", "64", "--width", "32", "--head", "spatial", "--embed_dim", "16"])
    torch.manual_seed(0)
    model = build_model({**opts, "num_classes": 5}).eval()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    # A head that calls every location equally visible: the benchmark must see uniform weights.
    flat = probe.make_head("linear", model)
    torch.nn.init.zeros_(flat.weight)
    torch.nn.init.constant_(flat.bias, 3.0)
    rec = probe.ranked_with_head(model, opts, flat, str(occluded))
    assert rec["weights"]["clean_mean_abs_deviation"] < 1e-6
    assert abs(rec["weights"]["occluded_stripes"] - 1.0) < 1e-6
    for part in ("occluded", "clean"):
        assert rec["learned"][part]["mAP"] == pytest.approx(rec["uniform_at_test"][part]["mAP"], abs=1e-4)
    # A head with random weights does not (the model's own starts flat too): the given head is used.
    noisy = probe.make_head("linear", model)
    torch.nn.init.normal_(noisy.weight, std=1.0)
    torch.nn.init.zeros_(noisy.bias)
    assert probe.ranked_with_head(model, opts, noisy, str(occluded))["weights"]["clean_mean_abs_deviation"] > 0.05
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
