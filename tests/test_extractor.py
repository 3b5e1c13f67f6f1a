"""inference.Extractor = test.py's features; demo.py --query/--gallery on a folder of anonymous crops."""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import demo
import evaluate
import search
from inference import Extractor, load_model
from test_pipeline import one_epoch_run, test_mod
from utils import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    """A one-epoch tiny run (ResNet-18, 64x32, P=4) with test.py's features.pt."""
    run_dir = one_epoch_run(synthetic_dir, tmp_path_factory)
    test_mod.run_test(test_mod.build_parser().parse_args(
        ["--name", "run", "--runs_dir", str(run_dir.parent), "--workers", "0"]))
    return run_dir


@pytest.fixture(scope="module")
def ext(run):
    return Extractor.from_run(run, device="cpu")


def _features(run):
    return torch.load(run / "features.pt", weights_only=True)


def test_extractor_gives_test_py_features_for_every_input_kind(run, ext):
    feats = _features(run)["query"]
    idx = list(range(0, len(feats["paths"]), max(1, len(feats["paths"]) // 9)))[:9]
    paths = [feats["paths"][i] for i in idx]
    ref_e, ref_w = feats["emb"][idx], feats["weights"][idx]
    assert (ext.height, ext.width, ext.parts) == (64, 32, 4)

    def same(out, atol=1e-5):
        emb, w = out
        assert emb.dtype == torch.float32 and emb.shape == ref_e.shape and w.shape == ref_w.shape
        assert (emb - ref_e).abs().max() <= atol and (w - ref_w).abs().max() <= atol

    same(ext(paths))
    same(ext([Path(p) for p in paths]))
    same(ext([Image.open(p) for p in paths]))
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    same(ext(rgb))
    same(ext([a[:, :, ::-1].copy() for a in rgb], bgr=True))
    same(ext(np.stack(rgb)))                                  # an (N,H,W,3) batch
    # A float tensor in [0,1] at the run's size: the same pixels test.py's resize makes.
    small = [np.asarray(datasets.load_image(p).resize((32, 64), Image.BILINEAR)) for p in paths]
    x = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float() / 255
    same(ext(x))
    same(ext(x[:, [2, 1, 0]], bgr=True))
    e0, w0 = ext(x[0])                                        # one (3,H,W) image
    assert e0.shape == (1, 4, 32) and (e0[0] - ref_e[0]).abs().max() <= 1e-5
    # Another size goes through torch's antialiased resize: close to PIL's, not identical.
    big = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255
    cos = torch.nn.functional.cosine_similarity(ext(big)[0], ref_e, dim=-1)
    assert cos.min() > 0.9, cos.min()
    # Batching does not change the numbers.
    model, _opts, _ckpt = load_model(run)
    same(Extractor(model, 64, 32, device="cpu", batch_size=2)(paths))
    empty_e, empty_w = ext([])
    assert empty_e.shape == (0, 4, 32) and empty_w.shape == (0, 4)


def test_distance_is_evaluate_weighted_distance(ext, run):
    feats = _features(run)
    q, g = feats["query"], feats["gallery"]
    a, b = (q["emb"][:5], q["weights"][:5]), (g["emb"][:20], g["weights"][:20])
    d = ext.distance(a, b)
    assert d.shape == (5, 20)
    assert torch.equal(d, evaluate.weighted_distance(*a, *b))
    du = ext.distance(a, b, weighting="uniform")
    assert torch.equal(du, evaluate.weighted_distance(a[0], torch.full((5, 4), 0.25), b[0], torch.full((20, 4), 0.25)))
    assert ext.distance(a, a).diagonal().abs().max() < 1e-5
    with pytest.raises(UserError, match=r"distance\(b=...\).*\(emb \(N,P,D\), weights \(N,P\)\)"):
        ext.distance(a, b[0])


@pytest.mark.parametrize("images,kw,message", [
    ([np.zeros((10, 10), np.uint8)], {}, r"images\[0\]: numpy array of shape \(10, 10\) and dtype uint8; expected HxWx3 uint8"),
    ([np.zeros((8, 4, 3), np.uint8), np.zeros((8, 4, 3), np.float32)], {}, r"images\[1\]: .*dtype float32"),
    (["missing.jpg"], {}, r"images\[0\]: missing\.jpg: no such file"),
    (torch.rand(2, 3, 8, 4) * 2, {}, r"tensor values span \[.*\]; expected unnormalised RGB in \[0, 1\]"),
    (torch.full((1, 3, 8, 4), float("nan")), {}, r"tensor values span \[nan"),
    (torch.zeros(2, 3, 8, 4, dtype=torch.uint8), {}, r"torch tensor of shape \(2, 3, 8, 4\) and dtype torch.uint8; expected a float"),
    (torch.rand(2, 1, 8, 4), {}, r"expected a float tensor \(N,3,H,W\)"),
    (42, {}, r"images: a int; expected a list of paths"),
    ([3.5], {}, r"images\[0\]: a float; expected a path, a PIL image"),
])
def test_bad_input_is_one_line_naming_it(ext, images, kw, message):
    with pytest.raises(UserError, match=message) as err:
        ext(images, **kw)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_an_image_is_named(ext, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(UserError, match=re.escape(str(bad)) + ": cannot decode image"):
        ext([bad])
    with pytest.raises(UserError, match="no trained run here"):
        Extractor.from_run(tmp_path)


def test_readme_tracker_example_runs_as_written(run, synthetic_dir, tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it from code", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 8 <= len(code.strip().splitlines()) <= 14
    run_path = re.search(r'Extractor\.from_run\("([^"]+)"', code).group(1)
    data_path = re.search(r'glob\.glob\("([^"*]+)/bounding_box_test', code).group(1)
    (tmp_path / run_path).parent.mkdir(parents=True)
    os.symlink(run, tmp_path / run_path)
    (tmp_path / data_path).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(synthetic_dir, tmp_path / data_path)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md (Use it from code)", "exec"), ns)
    dist = ns["dist"]
    # Crops 0 and 1 are the track images themselves, cut out of the stand-in frame.
    assert dist.shape == (4, 2)
    assert dist[0, 0] < 1e-5 and dist[1, 1] < 1e-5 and dist[0, 1] > 1e-3
    assert ns["dist"].argmin(1)[:2].tolist() == [0, 1]
    assert "tensor(" in capsys.readouterr().out


# --------------------------------------------------------------------------- search
@pytest.fixture()
def crops(synthetic_dir, tmp_path):
    """A folder of crops with names that carry no ids (nested, jpg and png), one non-image
    file, one broken image, and a query that is a renamed copy of one crop."""
    src = sorted((synthetic_dir / "bounding_box_test").glob("*.jpg"))[:14]
    folder = tmp_path / "my crops"
    (folder / "cam b").mkdir(parents=True)
    names = []
    for i, p in enumerate(src):
        sub = folder / "cam b" if i % 2 else folder
        if i % 3 == 0:
            dest = sub / f"person {chr(97 + i)}.png"
            Image.open(p).save(dest)
        else:
            dest = sub / f"det_{i * 7919 % 1000:03d}.jpg"
            shutil.copyfile(p, dest)
        names.append(dest)
    (folder / "readme.txt").write_text("not an image")
    (folder / "cam b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    query = tmp_path / "who is this.jpg"
    shutil.copyfile(src[4], query)
    return folder, query, names


def _ranked(out: str):
    return [(int(r), float(d), p) for r, d, p in re.findall(r"^\s*(\d+)\s+([0-9.]+)\s+(.+)$", out, re.M)]


def test_search_ranks_a_folder_of_anonymous_crops_and_caches_it(run, ext, crops, capsys):
    folder, query, names = crops
    args = ["--name", "run", "--runs_dir", str(run.parent), "--query", str(query), "--gallery", str(folder),
            "--topk", "5", "--device", "cpu"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "14 extracted, 0 from the cache" in out
    assert "skipped 1 image(s) that cannot be decoded: cam b/broken.jpg" in out
    assert "ignored 1 non-image file(s)" in out and "readme.txt" in out
    rows = _ranked(out)
    assert [r for r, _, _ in rows] == [1, 2, 3, 4, 5]
    dists = [d for _, d, _ in rows]
    assert dists == sorted(dists)
    # The renamed copy of the query ranks first at distance 0; the distances are the extractor's.
    assert rows[0][2] == str(names[4]) and rows[0][1] < 1e-4
    expect = ext.distance(ext([query]), ext([p for _, _, p in rows]))[0]
    assert np.allclose(dists, expect.numpy(), atol=1e-4)
    png = Path(re.search(r"^saved (.+)$", out, re.M).group(1))
    assert png.parent == run and png.name == demo.search_figure_name(query)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((run / search.CACHE_DIR).glob("*.pt"))) == 1

    # Again: everything from the cache, same list.
    assert demo.main(args) == 0
    out2 = capsys.readouterr().out
    assert "0 extracted, 14 from the cache" in out2 and _ranked(out2) == rows
    # An added image is extracted alone; a removed one is dropped.
    shutil.copyfile(names[1], folder / "new one.jpg")
    names[2].unlink()
    assert demo.main(args) == 0
    assert "1 extracted, 13 from the cache" in capsys.readouterr().out
    # A changed checkpoint discards the cache.
    ckpt = run / "last.pt"
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert demo.main(args) == 0
        out4 = capsys.readouterr().out
        assert "checkpoint (or its opts.yaml) changed" in out4 and "14 extracted, 0 from the cache" in out4
    finally:
        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    # --no_cache neither reads nor writes it.
    assert demo.main(args + ["--no_cache"]) == 0
    assert "14 extracted, 0 from the cache" in capsys.readouterr().out


def test_search_leaves_the_query_itself_out(run, crops, capsys):
    folder, _query, names = crops
    assert demo.main(["--name", "run", "--runs_dir", str(run.parent), "--query", str(names[0]),
                      "--gallery", str(folder), "--topk", "3", "--device", "cpu", "--no_cache"]) == 0
    out = capsys.readouterr().out
    assert f"left out the query itself: {names[0].name}" in out
    assert str(names[0]) not in [p for _, _, p in _ranked(out)]


def test_search_errors_name_the_path(run, crops, tmp_path, capsys):
    folder, query, _ = crops
    base = ["--name", "run", "--runs_dir", str(run.parent), "--device", "cpu"]
    assert demo.main(base + ["--query", str(folder / "readme.txt"), "--gallery", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--query {folder / 'readme.txt'}: not an image" in err
    assert demo.main(base + ["--query", str(tmp_path / "nope.jpg"), "--gallery", str(folder)]) == 2
    assert "nope.jpg: no such file" in capsys.readouterr().err
    assert demo.main(base + ["--query", str(query), "--gallery", str(tmp_path / "nowhere")]) == 2
    assert "--gallery" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo.main(base + ["--query", str(query), "--gallery", str(empty)]) == 2
    assert "no images to rank" in capsys.readouterr().err
    assert demo.main(base + ["--query", str(query)]) == 2
    assert "--query IMAGE --gallery DIR together" in capsys.readouterr().err
    assert demo.main(base) == 2
    assert "give --query_index N" in capsys.readouterr().err
