"""Partial views: the crop augmentation and its body-row labels, the region head (pooling,
weights, the fixed-stripe switch), its loss and error, the --partial benchmark and its report."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import converters
import datasets as D
import losses as L
import prepare
import train
from model import AWPCN
from test_pipeline import tiny_opts
from utils import UserError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- labels
def test_partial_box_and_box_rows_on_hand_built_cases():
    assert D.partial_box("top", 0.6) == (0.0, 0.0, 0.6, 1.0)
    assert D.partial_box("bottom", 0.6) == pytest.approx((0.4, 0.0, 1.0, 1.0))
    assert D.partial_box("side", 0.5, "right") == (0.0, 0.5, 1.0, 1.0)
    # The upper half stretched to 4 rows: row centres at 1/16, 3/16, 5/16, 7/16 of the body.
    assert D.box_rows(0.0, 0.5, 4).tolist() == pytest.approx([0.0625, 0.1875, 0.3125, 0.4375])
    assert D.parts_shown([0.0, 0.0, 0.5, 1.0], 4) == pytest.approx([1, 1, 0, 0])
    assert D.parts_shown([0.4, 0.0, 1.0, 1.0], 2) == pytest.approx([0.2, 1.0])
    assert D.parts_shown(None, 3) == [1.0, 1.0, 1.0]


def _img(h=64, w=32):
    # Each row its own grey level, so a crop shows up in the pixels.
    rows = np.repeat(np.linspace(0, 255, h).astype(np.uint8)[:, None], w, 1)
    return Image.fromarray(np.stack([rows] * 3, -1))


def test_the_crop_keeps_a_top_bottom_or_side_part_and_labels_each_row():
    t = D.build_transforms(64, 32, train=True, pad=0, flip=False, erasing_prob=0, partial_prob=1.0,
                           partial_min=0.5, body_rows=True)
    torch.manual_seed(0)
    kinds = set()
    for _ in range(40):
        x, vis, rows = t(_img())
        assert x.shape == (3, 64, 32) and vis.shape == (64, 32) and rows.shape == (64,)
        assert bool((vis == 1).all())                         # a crop hides nothing: it cuts
        step = rows[1:] - rows[:-1]
        assert torch.allclose(step, step[0].expand_as(step), atol=1e-6)   # linear in the row
        y0, y1 = float(rows[0] - step[0] / 2), float(rows[-1] + step[0] / 2)
        assert y0 >= -1e-6 and y1 <= 1 + 1e-6 and y1 - y0 >= 0.5 - 2 / 64
        kinds.add("side" if y1 - y0 > 1 - 1e-3 else "top" if y0 < 1e-3 else "bottom")
    assert kinds == {"top", "bottom", "side"}


def test_padding_rows_are_outside_the_body_and_invisible():
    t = D.build_transforms(64, 32, train=True, pad=10, flip=False, erasing_prob=0, body_rows=True)
    torch.manual_seed(3)
    seen = False
    for _ in range(20):
        _, vis, rows = t(_img())
        padded = rows < 0
        if padded.any():
            seen = True
            assert bool((vis[padded] == 0).all())
        assert bool((rows[~padded] >= 0).all() and (rows[~padded] <= 1).all())
    assert seen


def test_without_body_rows_the_transform_returns_what_it_did():
    t = D.build_transforms(64, 32, train=True, partial_prob=0.5)
    assert len(t(_img())) == 2
    with pytest.raises(UserError, match="--partial_prob 1.5"):
        D.build_transforms(64, 32, train=True, partial_prob=1.5)


def test_region_target_and_row_error_on_hand_built_cases():
    # Two images of 4 rows x 2 columns: the upper half stretched; a whole body, bottom row hidden.
    vis = torch.ones(2, 4, 2)
    vis[1, 3] = 0
    rows = torch.stack([D.box_rows(0, 0.5, 4), D.box_rows(0, 1, 4)])
    t = L.region_target(vis, rows, 2, (4, 2))
    assert t.shape == (2, 3, 4, 2)
    assert torch.allclose(t.sum(1), torch.ones(2, 4, 2))
    assert t[0, 0].tolist() == [[1, 1]] * 4 and t[0, 1].sum() == 0      # all of it is part 0
    assert t[1, :, :, 0].t().tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # A perfect one-hot head places each cell at its part's centre: error = |centre - true row|.
    err = L.region_row_error(t, t, torch.nn.functional.adaptive_avg_pool1d(rows.unsqueeze(1), 4).squeeze(1))
    want = [abs(0.25 - r) for r in D.box_rows(0, 0.5, 4).tolist()] + \
        [abs(c - r) for c, r in zip([0.25, 0.25, 0.75], D.box_rows(0, 1, 4).tolist()[:3])]
    assert float(err) == pytest.approx(sum(want) / len(want))


def test_part_ce_counts_only_the_parts_an_image_shows():
    torch.manual_seed(0)
    logits = torch.zeros(1, 2, 3)
    logits[0, 0, 1] = 5.0                       # part 0 right, part 1 says nothing useful
    out = {"logits": logits, "fused": logits[:, 0], "scores": None, "vis_logits": None,
           "region_logits": torch.zeros(1, 3, 4, 1), "feat_hw": (4, 1), "emb": torch.zeros(1, 2, 4)}
    label, vis = torch.tensor([1]), torch.ones(1, 8, 2)
    top_half = D.box_rows(0, 0.5, 8).unsqueeze(0)
    _, terms = L.awpcn_loss(out, label, vis, rows=top_half, fused_weight=0.0)
    ce0 = torch.nn.functional.cross_entropy(logits[0, :1], label)
    assert float(terms["part_ce"]) == pytest.approx(float(ce0), rel=1e-5)
    _, whole = L.awpcn_loss(out, label, vis, rows=D.box_rows(0, 1, 8).unsqueeze(0), fused_weight=0.0)
    assert float(whole["part_ce"]) > float(terms["part_ce"]) + 0.1
    assert float(terms["region_ce"]) == pytest.approx(np.log(3), rel=1e-5)   # zero logits: uniform


# --------------------------------------------------------------------------- the region head
def _region(parts=2, **kw):
    torch.manual_seed(0)
    return AWPCN(5, backbone="resnet18", parts=parts, embed_dim=8, head="region", pretrained="none", **kw).eval()


def test_fixed_stripes_switch_gives_pcb_pooling_and_uniform_weights():
    m = _region()
    pcb = AWPCN(5, backbone="resnet18", parts=2, embed_dim=8, weighting="uniform", pretrained="none").eval()
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("region_")}
    pcb.load_state_dict(state)
    x = torch.rand(3, 3, 64, 32)
    m.fixed_stripes = True
    with torch.no_grad():
        e, w = m(x)
        e2, w2 = pcb(x)
    assert torch.allclose(e, e2, atol=1e-5) and torch.equal(w, torch.full((3, 2), 0.5))


def test_a_hard_stripe_prior_pools_exactly_the_stripes():
    m = _region()
    x = torch.rand(2, 3, 64, 32)                 # 4x2 map, 2 parts: rows 0-1 and 2-3
    with torch.no_grad():
        m.region_prior.mul_(100)                 # one-hot: part of each row = its stripe
        aligned, w = m(x)
        m.fixed_stripes = True
        fixed, _ = m(x)
    assert torch.allclose(aligned, fixed, atol=1e-4)
    assert torch.allclose(w, torch.full((2, 2), 0.5), atol=1e-4)


def test_a_part_the_model_does_not_see_gets_no_weight():
    m = _region(parts=3)
    with torch.no_grad():
        m.region_prior.zero_()
        m.region_prior[0, :24] = 50.0            # upper half of the map: part 0
        m.region_prior[1, 24:] = 50.0            # lower half: part 1; part 2 nowhere
        _, w = m(torch.rand(2, 3, 64, 32))
        probs = m.predict_regions(torch.rand(1, 3, 64, 32))
    assert probs.shape == (1, 4, 4, 2)
    assert (w[:, 2] * 3).max() < 1e-6 and torch.allclose(w[:, :2], torch.full((2, 2), 0.5), atol=1e-4)


def test_an_untrained_region_head_starts_as_the_fixed_stripes():
    m = _region(parts=4)
    with torch.no_grad():
        _, w = m(torch.rand(2, 3, 64, 32))
    assert torch.allclose(w, torch.full((2, 4), 0.25), atol=1e-3)


@pytest.fixture(scope="module")
def region_run(synthetic_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    train.train(tiny_opts(synthetic_dir, runs, "region", "--epochs", "1", "--head", "region",
                          "--partial_prob", "0.5", "--val_ids", "0.3"))
    return runs / "region"


def test_region_head_trains_and_logs_its_row_error(region_run):
    hist = load_checkpoint(region_run / "last.pt")["history"]
    assert 0 < hist[-1]["region_mae"] < 0.5 and hist[-1]["region_ce"] > 0
    log = (region_run / "train.log").read_text()
    assert "region_mae" in log and "region_ce" in log


def test_report_splits_partial_queries_and_labels_body_parts(region_run, synthetic_dir, tmp_path, monkeypatch):
    import report
    import results

    bench = tmp_path / "part"
    converters.make_partial(synthetic_dir, bench, fraction=0.5, seed=0, log=lambda *_: None)
    args = results.build_parser().parse_args(["--name", region_run.name, "--runs_dir", str(region_run.parent),
                                              "--data_dir", str(bench), "--workers", "0", "--report"])
    results.run_test(args)
    page = (region_run / "report.html").read_text()
    assert '<section id="partial">' in page and 'id="partial-table"' in page
    table = page.split('id="partial-table"')[1].split("</table>")[0]
    assert ">partial<" in table and ">whole<" in table
    assert 'title="body part 1: weight x P' in page and "partial: " in page
    # demo.py's picture says the same: its strips are body parts, not stripes of the image
    import demo
    titles = []
    monkeypatch.setattr(demo, "save_figure", lambda fig, path, **kw: titles.append(fig._suptitle.get_text()))
    assert demo.main(["--name", region_run.name, "--runs_dir", str(region_run.parent), "--query_index", "0",
                      "--topk", "2"]) == 0
    assert "strips: body parts seen, head to feet (region head)" in titles[0]


def test_region_export_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import export
    from inference import fuse_for_inference

    m = _region(parts=3)
    with torch.no_grad():
        m.region_conv.weight.normal_(0, 0.05)
    net = export.onnx_net(fuse_for_inference(m), flip=False)
    path = tmp_path / "r.onnx"
    export.export_onnx(net, path, 64, 32)
    x = torch.rand(2, 3, 64, 32)
    emb, w = export.ort_session(path).run(["emb", "weights"], {"images": x.numpy()})
    with torch.no_grad():
        ref_e, ref_w = net(x)
    assert np.abs(emb - ref_e.numpy()).max() < 1e-4 and np.abs(w - ref_w.numpy()).max() < 1e-4
    assert ort is not None


# --------------------------------------------------------------------------- the benchmark
def test_partial_benchmark_cuts_queries_and_records_the_box(synthetic_dir, tmp_path):
    out = tmp_path / "part"
    stats = converters.make_partial(synthetic_dir, out, fraction=0.5, seed=1, log=lambda *_: None)
    truth = json.loads((out / D.PARTIAL_FILE).read_text())["images"]
    queries = sorted((synthetic_dir / "query").iterdir())
    assert stats["queries"] == len(queries) and stats["partial"] == round(0.5 * len(queries))
    cut = {k: v for k, v in truth.items() if k.startswith("query/") and v}
    assert len(cut) == stats["partial"]
    for key, v in cut.items():
        y0, x0, y1, x1 = v["box"]
        src, made = Image.open(synthetic_dir / key), Image.open(out / key)
        assert made.size == src.size                              # resized back
        keep = (y1 - y0) if v["kind"] != "side" else (x1 - x0)
        assert 0.4 - 0.05 <= keep <= 0.8 + 0.05
        assert (v["kind"] == "top") == (y0 == 0 and y1 < 1)
    whole = [k for k, v in truth.items() if k.startswith("query/") and v is None]
    for key in whole:
        assert (out / key).read_bytes() == (synthetic_dir / key).read_bytes()
    gallery = sorted(p.name for p in (out / "bounding_box_test").iterdir())
    assert gallery == sorted(p.name for p in (synthetic_dir / "bounding_box_test").iterdir())
    # Same seed, same benchmark.
    again = tmp_path / "again"
    converters.make_partial(synthetic_dir, again, fraction=0.5, seed=1, log=lambda *_: None)
    assert json.loads((again / D.PARTIAL_FILE).read_text())["images"] == truth


def test_prepare_partial_refuses_to_write_into_its_source(synthetic_dir, capsys):
    assert prepare.main(["--partial", str(synthetic_dir), str(synthetic_dir / "part")]) != 0
    assert "inside" in capsys.readouterr().err
    assert not (synthetic_dir / "part").exists()


def _bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_partial_split_and_view_weights_on_a_hand_built_case(tmp_path):
    bench = _bench()
    # Two queries of pid 1 (one cut to its top half), gallery: pid 1 and pid 2; 2 parts.
    truth = {"root": tmp_path, "images": {"query/1_c1_a.jpg": {"kind": "top", "box": [0, 0, 0.5, 1]},
                                          "query/1_c1_b.jpg": None}}
    e = torch.nn.functional.normalize(torch.tensor([[[1.0, 0], [0, 1]]]), dim=-1)
    q = {"emb": torch.cat([e, e]), "weights": torch.tensor([[0.9, 0.1], [0.5, 0.5]]),
         "pids": torch.tensor([1, 1]), "cams": torch.tensor([0, 0]), "paths": ["q/query/1_c1_a.jpg",
                                                                               "q/query/1_c1_b.jpg"]}
    g = {"emb": torch.cat([e, -e]), "weights": torch.full((2, 2), 0.5), "pids": torch.tensor([1, 2]),
         "cams": torch.tensor([1, 1]), "paths": ["g1", "g2"]}
    feats = {"query": q, "gallery": g}
    split = bench.split_by_view(feats, truth, "adaptive")
    assert set(split) == {"partial", "whole", "top"}
    assert split["partial"]["rank1"] == 1.0 and split["whole"]["mAP"] == 1.0
    w = bench.view_weight_summary(feats, truth)
    assert w["outside_view"] == pytest.approx(0.2) and w["inside_view"] == pytest.approx(1.8)
    assert w["whole_queries"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="no entry for query/9_c1.jpg"):
        D.partial_view(truth, "x/query/9_c1.jpg")
