"""report.py: the HTML page of a test run, parsed (html.parser) and opened in headless Chromium;
evaluate.PerQuery and evaluate.ranked_lists against the plain oracle."""
import base64
import importlib.util
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import evaluate as E
import report
import train
from test_evaluate import oracle, random_problem
from utils import load_features, load_yaml, save_features, save_yaml

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("header", "metrics", "weights", "cameras", "occlusion", "failures", "successes")
_spec = importlib.util.spec_from_file_location("awpcn_test_py", REPO / "test.py")
test_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_mod)


# --------------------------------------------------------------------------- parsing the page
class Page(HTMLParser):
    """What the tests read: title, section ids, query rows with their tiles, images, metric cells."""

    def __init__(self, text: str):
        super().__init__()
        self.title, self.sections, self.rows, self.imgs, self.cells = "", [], [], [], []
        self.tags, self.section, self._in_title, self._cell = set(), None, False, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        self.tags.add(tag)
        if tag == "title" and self.section is None:   # the page's, not an SVG tooltip's
            self._in_title = True
        elif tag == "section":
            self.section = a["id"]
            self.sections.append(a["id"])
        elif tag == "div" and "row" in cls:
            self.rows.append({"section": self.section, "kind": cls[1], "query": int(a["data-query"]),
                              "ap": float(a["data-ap"]), "first": int(a["data-first"]), "tiles": []})
        elif tag == "figure" and self.section in ("failures", "successes"):   # tiles only live in rows there
            self.rows[-1]["tiles"].append({"kind": cls[1], "caption": ""})
        elif tag == "img":
            self.imgs.append({"src": a["src"], "section": self.section, "height": a.get("height")})
        elif tag == "td" and "data-metric" in a:
            self._cell = {"section": self.section, "metric": a["data-metric"], "column": a.get("data-column"),
                          "value": float(a["data-value"]), "text": ""}
            self.cells.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell["text"] += data


def result_lines(run_dir: Path) -> dict:
    """The last entry of result.txt: {"plain": {metric: "xx.xx"}, "rerank": {...}}."""
    entry = run_dir.joinpath("result.txt").read_text().strip().split("\n\n")[-1]
    out = {}
    for line in entry.splitlines():
        m = re.search(r"Rank-1 ([\d.]+)% \| Rank-5 ([\d.]+)% \| Rank-10 ([\d.]+)% \| mAP ([\d.]+)%.*mINP ([\d.]+)%", line)
        if m:
            out["rerank" if line.startswith("re-ranked") else "plain"] = dict(
                zip(("rank1", "rank5", "rank10", "mAP", "mINP"), m.groups()))
    return out


# --------------------------------------------------------------------------- a tiny trained run
@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    """A 2-epoch tiny AWPCN run tested with --report --rerank: (run_dir, features)."""
    runs = tmp_path_factory.mktemp("report_runs")
    train.train(train.parse_opts([
        "--data_dir", str(synthetic_dir), "--runs_dir", str(runs), "--name", "run", "--preset", "cpu",
        "--height", "64", "--width", "32", "--parts", "4", "--embed_dim", "32", "--batchsize", "8",
        "--instances", "2", "--epochs", "2", "--workers", "0", "--warmup", "1", "--step", "1"]))
    test_mod.run_test(test_mod.build_parser().parse_args(
        ["--name", "run", "--runs_dir", str(runs), "--workers", "0", "--report", "--rerank"]))
    return runs / "run", load_features(runs / "run")


def test_report_has_every_section_the_worst_queries_and_the_metrics_of_result_txt(run):
    run_dir, feats = run
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert page.title == "AWPCN report — run"
    assert page.sections == list(SECTIONS)
    # Self-contained: no script, no external stylesheet, nothing fetched from anywhere.
    assert "script" not in page.tags
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    q, g = feats["query"], feats["gallery"]
    nq, ng = len(q["paths"]), len(g["paths"])
    assert f"{nq} queries" in text and f"{ng} gallery images" in text
    assert "same dataset as training" in text and "cross-dataset" not in text

    # Metrics: the learned column is test.py's result.txt (plain and re-ranked), the uniform one
    # is the same features evaluated with equal weights.
    lines = result_lines(run_dir)
    cell = {(c["column"], c["metric"]): c for c in page.cells if c["section"] == "metrics"}
    for key, col in (("plain", "learned weights"), ("rerank", "learned weights, re-ranked")):
        for metric, want in lines[key].items():
            assert cell[col, metric]["text"] == want, (col, metric)
    uqw, ugw = E.weights_for("uniform", q["weights"], g["weights"])
    uni = E.evaluate_features(q["emb"], uqw, g["emb"], ugw, q["pids"], g["pids"], q["cams"], g["cams"])
    for metric in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert cell["uniform weights", metric]["value"] == pytest.approx(float(uni[metric]), abs=1e-12)
    assert ("uniform weights, re-ranked", "mAP") in cell

    # Failures: the 30 lowest-AP queries (all when fewer), lowest first, 10 results each; the
    # rank of the first true match agrees with the borders shown.
    pq = E.evaluate_features(q["emb"], q["weights"], g["emb"], g["weights"], q["pids"], g["pids"], q["cams"],
                             g["cams"]).per_query
    valid = (pq.first >= 0).nonzero(as_tuple=True)[0]
    worst = [r for r in page.rows if r["section"] == "failures"]
    assert len(worst) == min(30, len(valid))
    aps = [r["ap"] for r in worst]
    assert aps == sorted(aps) and aps == pytest.approx(sorted(pq.ap[valid].tolist())[:len(worst)])
    for r in worst:
        kinds = [t["kind"] for t in r["tiles"]]
        assert kinds[0] == "query" and len([k for k in kinds if k in ("hit", "miss")]) == 10, kinds
        assert r["first"] == int(pq.first[r["query"]]) + 1
        if r["first"] <= 10:
            assert kinds.index("hit") == r["first"] and "first" not in kinds
        else:
            assert "hit" not in kinds and kinds[-1] == "first"
    typical = [r for r in page.rows if r["section"] == "successes"]
    chosen = set(r["query"] for r in worst)
    candidates = [i for i in (pq.first == 0).nonzero(as_tuple=True)[0].tolist() if i not in chosen]
    assert len(typical) == min(5, len(candidates)) > 0
    assert all(r["tiles"][1]["kind"] == "hit" and len(r["tiles"]) == 11 for r in typical)

    # Per-camera and occlusion tables: cells row by row, (learned, uniform) x metrics.
    cams = sorted(set(q["cams"].tolist()))
    cam_cells = [c for c in page.cells if c["section"] == "cameras"]
    assert len(cam_cells) == 4 * len(cams)
    for r, cam in enumerate(cams):
        keep = q["cams"] == cam
        sub = E.evaluate_features(q["emb"][keep], q["weights"][keep], g["emb"], g["weights"], q["pids"][keep],
                                  g["pids"], q["cams"][keep], g["cams"])
        assert [c["metric"] for c in cam_cells[4 * r:4 * r + 2]] == ["rank1", "mAP"]
        assert cam_cells[4 * r]["value"] == pytest.approx(sub.rank1, abs=1e-12)
        assert cam_cells[4 * r + 1]["value"] == pytest.approx(sub.mAP, abs=1e-12)
    truth = datasets.occlusion_truth(feats["data_root"])
    occ = torch.tensor([bool(datasets.occluded_rows(truth, p)) for p in q["paths"]])
    sub = E.evaluate_features(q["emb"][occ], q["weights"][occ], g["emb"], g["weights"], q["pids"][occ], g["pids"],
                              q["cams"][occ], g["cams"])
    occ_cells = [c for c in page.cells if c["section"] == "occlusion"]
    assert occ_cells[0]["metric"] == "rank1" and occ_cells[0]["value"] == pytest.approx(sub.rank1, abs=1e-12)
    assert occ_cells[2]["metric"] == "mAP" and occ_cells[2]["value"] == pytest.approx(sub.mAP, abs=1e-12)

    # Every embedded image decodes; thumbnails only for images shown.
    assert page.imgs
    shown = sum(len(r["tiles"]) for r in page.rows) + 20
    assert len({i["src"] for i in page.imgs}) <= shown
    for img in page.imgs:
        assert img["src"].startswith("data:image/jpeg;base64,")
        pic = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        pic.load()
        assert pic.format == "JPEG" and pic.height == report.THUMB_HEIGHT == int(img["height"])
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".report.html")]  # no temp file left


def test_report_py_rebuilds_from_features_alone(run, tmp_path, capsys):
    run_dir, _ = run
    copy = tmp_path / "runs" / "run"
    copy.mkdir(parents=True)
    for name in ("features.pt", "opts.yaml"):      # no checkpoint: nothing can be re-extracted
        shutil.copy(run_dir / name, copy / name)
    assert report.main(["--name", "run", "--runs_dir", str(tmp_path / "runs"), "--weighting", "uniform",
                        "--ap", "standard"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = Page((copy / "report.html").read_text(encoding="utf-8"))
    assert page.sections == list(SECTIONS)
    assert "standard, mean precision at hits" in (copy / "report.html").read_text(encoding="utf-8")
    assert not any(c["column"] and "re-ranked" in c["column"] for c in page.cells)
    # --weighting uniform ranks the failure lists with equal weights.
    feats = load_features(copy)
    q, g = feats["query"], feats["gallery"]
    qw, gw = E.weights_for("uniform", q["weights"], g["weights"])
    pq = E.evaluate_features(q["emb"], qw, g["emb"], gw, q["pids"], g["pids"], q["cams"], g["cams"],
                             ap="standard").per_query
    worst = [r for r in page.rows if r["section"] == "failures"]
    assert [r["ap"] for r in worst] == pytest.approx([float(pq.ap[r["query"]]) for r in worst])
    # A run trained elsewhere is flagged as a cross-dataset result.
    assert '<span class="badge">cross-dataset</span>' not in (copy / "report.html").read_text(encoding="utf-8")
    save_yaml(copy / "opts.yaml", {**load_yaml(copy / "opts.yaml"), "data_root": str(tmp_path / "elsewhere")})
    assert report.main(["--name", "run", "--runs_dir", str(tmp_path / "runs"), "--weighting", "uniform"]) == 0
    assert '<span class="badge">cross-dataset</span>' in (copy / "report.html").read_text(encoding="utf-8")


def test_uniform_run_no_occlusion_truth_and_missing_images(run, tmp_path, capsys):
    run_dir, feats = run
    feats = {**feats, "weighting": "uniform", "data_root": str(tmp_path)}   # no occlusion.json there
    feats.pop("format")
    gone = feats["gallery"]["paths"][:3]
    feats["gallery"] = {**feats["gallery"], "paths": [str(tmp_path / "moved.jpg")] * 3 + feats["gallery"]["paths"][3:]}
    copy = tmp_path / "run"
    save_features(copy, feats)
    path = report.build_report(copy)
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert {c["column"] for c in page.cells if c["section"] == "metrics"} == {"uniform weights"}
    assert "learned − uniform" not in text and "training set unknown" in text
    assert "has no occlusion.json" in text
    assert gone and "images could not be read" in text
    # A features file of another run is refused, by name.
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    assert report.main(["--name", "other", "--runs_dir", str(tmp_path)]) == 2
    assert "holds features of run 'run', not 'other'" in capsys.readouterr().err
    assert report.main(["--name", "nothing", "--runs_dir", str(tmp_path)]) == 2
    assert "nothing: no such run" in capsys.readouterr().err


# --------------------------------------------------------------------------- in a real browser
def test_report_renders_in_headless_chromium(run):
    import headless

    exe = headless.find_chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (no chromium, chromium-browser or google-chrome on PATH); "
                    ".ci/run installs Debian's chromium with apt-get where it runs as root")
    run_dir, _ = run
    with headless.Chromium(exe, width=1280, height=900) as browser:
        browser.open(run_dir / "report.html")
        assert browser.js("document.title") == "AWPCN report — run"
        assert browser.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert browser.js("document.images.length") > 30
        top = Image.open(io.BytesIO(browser.screenshot()))
        # The worst-queries section: laid out, not hidden, and on screen once scrolled to.
        box = browser.js("""(() => { const s = document.getElementById('failures');
            s.scrollIntoView(); const r = s.getBoundingClientRect(), st = getComputedStyle(s);
            return {w: r.width, h: r.height, top: r.top, vis: st.visibility, disp: st.display,
                    rows: s.querySelectorAll('.row').length}; })()""")
        assert box["w"] > 500 and box["h"] > 500 and box["vis"] == "visible" and box["disp"] != "none"
        assert 0 <= box["top"] < 900 and box["rows"] > 0      # below the sticky bar (scroll-margin-top)
        failures = Image.open(io.BytesIO(browser.screenshot()))
        errors = browser.errors()
    for shot in (top, failures):
        arr = np.asarray(shot.convert("RGB")).astype(float)
        assert shot.size == (1280, 900)
        assert arr.std() > 20 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 200   # not blank
    assert errors == []


# --------------------------------------------------------------------------- evaluate.py pieces
@pytest.mark.parametrize("ap", ["official", "standard"])
def test_per_query_ap_matches_the_oracle_query_by_query(ap):
    rng = np.random.default_rng(3)
    for _ in range(20):
        dist, qp, gp, qc, gc = random_problem(rng, int(rng.integers(1, 15)), int(rng.integers(1, 50)), ties=True,
                                              nans=bool(rng.integers(0, 2)))
        res = E.evaluate(torch.from_numpy(dist), qp, gp, qc, gc, ap=ap, chunk=int(rng.integers(1, 5)))
        pq = res.per_query
        assert pq.ap.shape == pq.first.shape == (len(qp),) and pq.ap_formula == ap
        for i in range(len(qp)):
            ref, skipped = oracle(dist[i:i + 1], qp[i:i + 1], gp, qc[i:i + 1], gc, ap)
            if ref is None:
                assert skipped == 1 and pq.first[i] == -1 and np.isnan(float(pq.ap[i]))
            else:
                assert float(pq.ap[i]) == pytest.approx(ref["mAP"], abs=1e-9)
                assert float(pq.inp[i]) == pytest.approx(ref["mINP"], abs=1e-9)
                assert int(pq.first[i]) == int(np.argmax(ref["cmc"] > 0))
        # The summary is the mean of the per-query values; a subset equals evaluating the subset.
        valid = pq.first >= 0
        if valid.any():
            assert res.mAP == pytest.approx(float(pq.ap[valid].mean()), abs=1e-12)
        keep = torch.from_numpy(rng.random(len(qp)) < 0.5)
        if keep.any():
            sub = E.evaluate(torch.from_numpy(dist)[keep], qp[keep.numpy()], gp, qc[keep.numpy()], gc, ap=ap)
            part = pq.result(keep)
            assert (part.mAP, part.mINP, part.num_valid_queries, part.num_skipped_queries) == \
                (sub.mAP, sub.mINP, sub.num_valid_queries, sub.num_skipped_queries)
            assert torch.equal(part.cmc, sub.cmc)


def test_ranked_lists_follow_the_protocol_and_the_evaluator_order():
    rng = np.random.default_rng(5)
    for _ in range(30):
        dist, qp, gp, qc, gc = random_problem(rng, int(rng.integers(1, 8)), int(rng.integers(1, 40)), ties=True,
                                              nans=True)
        k = int(rng.integers(1, 12))
        idx, d = E.ranked_lists(torch.from_numpy(dist), qp, qc, gp, gc, k)
        assert idx.shape == d.shape == (len(qp), min(k, len(gp)))
        for i in range(len(qp)):
            key = np.where(np.isnan(dist[i]), np.inf, dist[i])
            order = np.argsort(key, kind="stable")
            kept = [j for j in order if gp[j] != -1 and not (gp[j] == qp[i] and gc[j] == qc[i])][:k]
            assert idx[i].tolist() == kept + [-1] * (idx.shape[1] - len(kept))
            assert d[i, :len(kept)].tolist() == pytest.approx(key[kept].tolist())
