"""Show one query's top-k gallery matches with the part weights the model used.

    python demo.py [--name RUN] --query_index N [--topk 10]
    python demo.py [--name RUN] --query IMAGE --gallery DIR [--topk 10] [--no_cache]
    python demo.py [--name RUN] --gallery DIR --index INDEX [--index_kind auto] [--milvus lite|URI]
    python demo.py [--name RUN] --query IMAGE --index INDEX [--topk 10] [--threshold auto|none|D]

--query_index: a query of the run's test set; reads model/RUN/features.pt (written by
test.py) and saves model/RUN/show.png. Green border: same identity; red: different.
--query/--gallery: your own images (any names, any depth under DIR; search.py): prints the
ranked list with distances and saves model/RUN/search_<query name>_<hash>.png (one file per
query image, so concurrent searches do not overwrite each other's), without borders
(identities unknown); gallery features are cached in model/RUN/search_cache/.
--index: a persistent gallery index (gallery_index.py; docs/search.md): --gallery builds or
updates it (new and changed images extracted, vanished ones removed), --query searches it.
Open set: with model/RUN/threshold.json (test.py --split val --calibrate FMR) a search lists only
images nearer than the calibrated threshold, and says "no match" when there is none.
Under each image: its distance to the query. Beside each image: a strip of its P part
weights, one cell per stripe (region head: per body part, head to feet, wherever the image
shows it), green = trusted more, red = less, yellow = uniform (numbers in the cells).
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import torch

import evaluate
from inference import Extractor, add_eval_arguments, find_run, run_options
from model import weight_unit
from utils import FEATURES_FILE, UserError, add_run_arguments, cli, load_features, save_figure

def rank_gallery(feats: dict, index: int, topk: int, weighting: str):
    """Gallery ranking of query ``index`` under the evaluation protocol.

    Junk (pid -1) and same-id-same-camera gallery images are left out, as in evaluation.
    Returns (gallery indices (k,), distances (k,)).
    """
    q, g = feats["query"], feats["gallery"]
    qw, gw = evaluate.weights_for(weighting, q["weights"][index:index + 1], g["weights"])
    dist = evaluate.weighted_distance(q["emb"][index:index + 1], qw, g["emb"], gw)
    order, dist = evaluate.ranked_lists(dist, q["pids"][index:index + 1], q["cams"][index:index + 1],
                                        g["pids"], g["cams"], topk)
    keep = order[0] >= 0
    return order[0][keep], dist[0][keep]


def draw(feats: dict, index: int, order, dists, path: Path, unit: str = "stripe") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    q, g = feats["query"], feats["gallery"]
    known = q.get("pids") is not None       # None: the user's own images (search mode)
    qpid = int(q["pids"][index]) if known else None
    cols = 1 + len(order)
    fig, axes = plt.subplots(1, cols, figsize=(1.5 * cols, 3.4), squeeze=False)
    parts = int(q["weights"].shape[1])

    def panel(ax, img_path, weights, title, colour, caption):
        try:
            ax.imshow(Image.open(img_path).convert("RGB"))
        except OSError:
            ax.text(0.5, 0.5, "missing\nimage", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values() if colour else ():
            side.set_color(colour), side.set_linewidth(4)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(caption, fontsize=8)
        # One cell per stripe (level with the stripe it weighs) or per body part (region head:
        # cell i is body part i, wherever the image shows it); colour = weight x P, so 1.0
        # (yellow) is "uniform", green trusted more, red trusted less.
        wax = ax.inset_axes([1.03, 0.0, 0.16, 1.0])
        w = weights.reshape(-1, 1).float().numpy()
        wax.imshow(w * parts, cmap="RdYlGn", vmin=0, vmax=2, aspect="auto")
        for i, val in enumerate(w[:, 0]):
            wax.text(0, i, f"{val:.2f}", ha="center", va="center", fontsize=5, rotation=90)
        wax.set_xticks([]), wax.set_yticks([])

    def short(path):
        name = Path(path).name
        return name if len(name) <= 18 else name[:8] + "…" + name[-9:]

    panel(axes[0, 0], q["paths"][index], q["weights"][index],
          f"query {index}\nid {qpid}" if known else f"query\n{short(q['paths'][index])}", "black", "query")
    for j, (gi, d) in enumerate(zip(order.tolist(), dists.tolist())):
        gpid = int(g["pids"][gi]) if known else None
        panel(axes[0, j + 1], g["paths"][gi], g["weights"][gi],
              f"#{j + 1} id {gpid}" if known else f"#{j + 1}\n{short(g['paths'][gi])}",
              ("green" if gpid == qpid else "red") if known else None, f"d={d:.3f}")
    strips = ("strips: body parts seen, head to feet (region head)" if unit == "body part"
              else "strips: part weights, one per stripe")
    fig.suptitle(f"run {feats.get('run', '?')}: {f'query {index}' if known else 'the query'} and its top-{len(order)} "
                 + (f"(border green = same id, red = different; {strips})" if known
                    else f"in {feats.get('gallery_dir', 'the gallery')} ({strips})"), fontsize=9)
    fig.subplots_adjust(wspace=0.35)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def search_figure_name(query) -> str:
    """search_<stem>_<hash of the query's full path>.png: readable, and distinct for two queries
    that share a name in different folders."""
    path = Path(query).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._")[:40] or "query"
    return f"search_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}.png"


def run_search(args: argparse.Namespace) -> Path:
    """--query IMAGE --gallery DIR: rank the user's own images, print the list, draw it."""
    import search

    if not (args.query and args.gallery) or args.query_index is not None:
        raise UserError("search your own images with --query IMAGE --gallery DIR together, without --query_index")
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: must be at least 1")
    if args.batchsize < 1:
        raise UserError(f"--batchsize {args.batchsize}: must be at least 1")
    run_dir = find_run(args.runs_dir, args.name)
    ext = Extractor.from_run(run_dir, args.which, device=args.device, batch_size=args.batchsize)
    weighting = args.weighting or ext.weighting
    res = search.search(ext, args.query, args.gallery, topk=args.topk, weighting=weighting,
                        cache_dir=None if args.no_cache else run_dir / search.CACHE_DIR)
    print(f"query {args.query} vs {len(res['paths']) - len(res['self'])} images under {args.gallery} "
          f"({res['extracted']} extracted, {res['cached']} from the cache) | run {args.name} "
          f"[{args.which}, epoch {ext.epoch}] | weights: {weighting}")
    for note in search.notes(res, args.gallery):
        print(note)
    threshold, why = search.resolve_threshold(args.threshold, run_dir, lambda: _identity(ext), weighting)
    print(why)
    order, dists = res["order"], res["dists"]
    keep = dists < threshold if threshold is not None else torch.ones_like(dists, dtype=torch.bool)
    _print_answer([res["paths"][i] for i in order.tolist()], dists.tolist(), keep.tolist(), threshold)
    feats = {"run": args.name, "gallery_dir": args.gallery,
             "query": {"paths": [res["query"]], "weights": res["query_weights"], "pids": None},
             "gallery": {"paths": res["paths"], "weights": res["weights"], "pids": None}}
    out = run_dir / search_figure_name(args.query)
    draw(feats, 0, order[keep], dists[keep], out, weight_unit(weighting, (ext.opts or {}).get("head")))
    print(f"saved {out}")
    return out


def _identity(ext: Extractor) -> dict:
    import gallery_index

    return gallery_index.run_identity(ext)


def _print_answer(paths: list, dists: list, keep: list, threshold) -> None:
    """The ranked list (rank, distance, image), only the images within the threshold; "no
    match" when none is."""
    shown = [(p, d) for p, d, k in zip(paths, dists, keep) if k]
    if threshold is not None and not shown:
        nearest = f"; the nearest image is at d = {dists[0]:.4f}" if dists else ""
        print(f"no match within the threshold (d < {threshold:.4f}): nobody here looks like the query{nearest}")
        return
    if threshold is not None and len(shown) < len(paths):
        print(f"{len(shown)} of the top {len(paths)} within the threshold (d < {threshold:.4f})")
    print(f"{'rank':>4}  {'distance':>8}  image")
    for j, (p, d) in enumerate(shown):
        print(f"{j + 1:>4}  {d:8.4f}  {p}")


def run_index(args: argparse.Namespace) -> Path | None:
    """--index DIR: with --gallery build or update the index from a folder; with --query search it."""
    import search

    if args.query_index is not None:
        raise UserError("--index searches your own images: use --query IMAGE (and --gallery DIR to build or "
                        "update the index), not --query_index")
    if not (args.query or args.gallery):
        raise UserError(f"--index {args.index}: give --gallery DIR to build or update it, and/or --query IMAGE to "
                        "search it")
    for flag in ("topk", "batchsize", "passes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    run_dir = find_run(args.runs_dir, args.name)
    ext = Extractor.from_run(run_dir, args.which, device=args.device, batch_size=args.batchsize)
    if args.gallery:
        res = search.index_folder(ext, args.gallery, args.index, weighting=args.weighting, kind=args.index_kind,
                                  milvus=args.milvus)
        print(f"index {res['description']}")
        print(f"{args.gallery}: {res['added']} added, {res['removed']} removed, {res['unchanged']} unchanged")
        for note in search.notes({**res, "self": []}, args.gallery):
            print(note)
    if not args.query:
        return None
    import gallery_index

    weighting = gallery_index.read_meta(Path(args.index))["weighting"]
    if args.weighting and args.weighting != weighting:
        raise UserError(f"--index {args.index}: built to rank with {weighting} weights, not {args.weighting}; drop "
                        "--weighting, or build another index with that weighting")
    threshold, why = search.resolve_threshold(args.threshold, run_dir, lambda: _identity(ext), weighting)
    res = search.search_index(ext, args.query, args.index, topk=args.topk, threshold=threshold,
                              candidates=args.candidates, nprobe=args.nprobe, ef=args.ef, passes=args.passes)
    hits = res["hits"]
    print(f"query {args.query} vs {res['description']} | run {args.name} [{args.which}, epoch {ext.epoch}]")
    print(why)
    if res["self"]:
        print(f"left out the query itself: {', '.join(res['self'])}")
    keep = hits.within()[0]
    _print_answer(hits.names[0], hits.dists[0].tolist(), keep.tolist(), threshold)
    n = int(keep.sum())
    feats = {"run": args.name, "gallery_dir": args.index,
             "query": {"paths": [res["query"]], "weights": res["query_weights"], "pids": None},
             "gallery": {"paths": [hits.names[0][j] for j in range(n)],
                         "weights": torch.from_numpy(hits.weights[0][:n]), "pids": None}}
    out = run_dir / search_figure_name(args.query)
    draw(feats, 0, torch.arange(n), torch.from_numpy(hits.dists[0][:n]), out,
         weight_unit(weighting, (ext.opts or {}).get("head")))
    print(f"saved {out}")
    return out


def run_demo(args: argparse.Namespace) -> Path | None:
    if args.index:
        return run_index(args)
    if args.query or args.gallery:
        return run_search(args)
    if args.query_index is None:
        raise UserError("give --query_index N (a query of the run's test set, after test.py) "
                        "or --query IMAGE --gallery DIR (your own images)")
    run_dir = Path(args.runs_dir) / args.name
    feats = load_features(run_dir)
    if feats.get("run") != args.name:
        raise UserError(f"{run_dir / FEATURES_FILE} holds features of run {feats.get('run')!r}, not {args.name!r} "
                        f"(copied from another run?); rewrite it with python test.py --name {args.name}")
    nq = len(feats["query"]["paths"])
    if not 0 <= args.query_index < nq:
        raise UserError(f"--query_index {args.query_index}: out of range; {run_dir / FEATURES_FILE} "
                        f"has {nq} queries (0..{nq - 1})")
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: must be at least 1")
    weighting = args.weighting or feats.get("weighting", "adaptive")
    order, dists = rank_gallery(feats, args.query_index, args.topk, weighting)
    out = run_dir / "show.png"
    head = run_options(run_dir, feats.get("checkpoint") or args.which).get("head")
    draw(feats, args.query_index, order, dists, out, weight_unit(weighting, head))
    qpid = int(feats["query"]["pids"][args.query_index])
    hits = [int(feats["gallery"]["pids"][i]) == qpid for i in order.tolist()]
    print(f"query {args.query_index} (id {qpid}): top-{len(hits)} "
          + " ".join("✓" if h else "✗" for h in hits) + f"\nsaved {out}")
    return out


@cli
def main(argv=None) -> int:
    import gallery_index

    ap = argparse.ArgumentParser(description="Draw a query's ranked list with part weights.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap, which=None)
    ap.add_argument("--query_index", type=int, default=None, help="a query of the run's test set (features.pt)")
    ap.add_argument("--query", default=None, help="your own query image (with --gallery)")
    ap.add_argument("--gallery", default=None, help="folder of your own images, any names and depth (with --query)")
    ap.add_argument("--which", default="last", help="checkpoint for --query/--gallery: last, epoch_NNN, interrupted")
    ap.add_argument("--device", default="auto", help="device for --query/--gallery")
    ap.add_argument("--batchsize", type=int, default=64, help="images per batch for --query/--gallery")
    ap.add_argument("--no_cache", action="store_true", help="do not read or write RUN/search_cache/")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--index", default=None, metavar="DIR",
                    help="a persistent gallery index: --gallery builds/updates it, --query searches it")
    ap.add_argument("--index_kind", default="auto", choices=["auto", "flat", "ivf", "hnsw", "ivfpq"],
                    help="for a new --index: auto = exact (flat) below 50k images, an HNSW graph above, IVF-PQ "
                         "once the full vectors pass 8 GiB")
    ap.add_argument("--milvus", default=None, metavar="URI",
                    help="for a new --index: keep it in Milvus: 'lite' (a Milvus Lite file inside DIR) or a "
                         "server URI such as http://host:19530")
    ap.add_argument("--candidates", type=int, default=None,
                    help="--index: candidates re-scored exactly per query (default max(100, 10 x topk))")
    ap.add_argument("--nprobe", type=int, default=None, help="--index: inverted lists scanned per query (ivf, ivfpq)")
    ap.add_argument("--ef", type=int, default=None, help="--index: graph candidates explored per query (hnsw)")
    ap.add_argument("--passes", type=int, default=gallery_index.DEFAULT_PASSES,
                    help="--index: candidate passes at most; 1 is about twice as fast on a large HNSW index, and "
                         "loses recall mostly on partial and occluded queries (docs/search.md)")
    ap.add_argument("--threshold", default="auto",
                    help="auto: RUN/threshold.json if there is one (test.py --split val --calibrate); none; or a "
                         "distance: only images nearer than it are answers")
    add_eval_arguments(ap, weighting_help="weights for ranking (default: the run's)", ap_formula=False, rerank=False)
    run_demo(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
