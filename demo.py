"""Show one query's top-k gallery matches with the part weights the model used.

    python demo.py --name RUN --query_index N [--topk 10]

Reads model/RUN/features.pt (written by test.py) and saves model/RUN/show.png.
Green border: same identity; red: different. Under each image: its distance to the
query. Beside each image: a strip of its P part weights, one cell per stripe, darker =
trusted more (numbers in the cells).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import evaluate
from utils import FEATURES_FILE, UserError, cli, load_features, save_figure

def rank_gallery(feats: dict, index: int, topk: int, weighting: str):
    """Gallery ranking of query ``index`` under the evaluation protocol.

    Junk (pid -1) and same-id-same-camera gallery images are left out, as in evaluation.
    Returns (gallery indices (k,), distances (k,)).
    """
    q, g = feats["query"], feats["gallery"]
    qw, gw = evaluate.weights_for(weighting, q["weights"][index:index + 1], g["weights"])
    dist = evaluate.weighted_distance(q["emb"][index:index + 1], qw, g["emb"], gw)[0]
    pid, cam = int(q["pids"][index]), int(q["cams"][index])
    drop = (g["pids"] == -1) | ((g["pids"] == pid) & (g["cams"] == cam))
    dist = dist.masked_fill(drop, float("inf"))
    k = min(topk, int((~drop).sum()))
    # Stable sort: ties go to the lower gallery index, as in evaluate.py.
    order = torch.sort(dist, stable=True).indices[:k]
    return order, dist[order]


def draw(feats: dict, index: int, order, dists, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    q, g = feats["query"], feats["gallery"]
    qpid = int(q["pids"][index])
    cols = 1 + len(order)
    fig, axes = plt.subplots(1, cols, figsize=(1.5 * cols, 3.4), squeeze=False)
    parts = int(q["weights"].shape[1])

    def panel(ax, img_path, weights, title, colour, caption):
        try:
            ax.imshow(Image.open(img_path).convert("RGB"))
        except OSError:
            ax.text(0.5, 0.5, "missing\nimage", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_color(colour), side.set_linewidth(4)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(caption, fontsize=8)
        # One cell per stripe, level with the stripe it weighs; colour = weight x P, so
        # 1.0 (yellow) is "uniform", green trusted more, red trusted less.
        wax = ax.inset_axes([1.03, 0.0, 0.16, 1.0])
        w = weights.reshape(-1, 1).float().numpy()
        wax.imshow(w * parts, cmap="RdYlGn", vmin=0, vmax=2, aspect="auto")
        for i, val in enumerate(w[:, 0]):
            wax.text(0, i, f"{val:.2f}", ha="center", va="center", fontsize=5, rotation=90)
        wax.set_xticks([]), wax.set_yticks([])

    panel(axes[0, 0], q["paths"][index], q["weights"][index], f"query {index}\nid {qpid}", "black", "query")
    for j, (gi, d) in enumerate(zip(order.tolist(), dists.tolist())):
        gpid = int(g["pids"][gi])
        panel(axes[0, j + 1], g["paths"][gi], g["weights"][gi], f"#{j + 1} id {gpid}",
              "green" if gpid == qpid else "red", f"d={d:.3f}")
    fig.suptitle(f"run {feats.get('run', '?')}: query {index} and its top-{len(order)} "
                 "(border green = same id, red = different; strips: part weights)", fontsize=9)
    fig.subplots_adjust(wspace=0.35)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> Path:
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
    draw(feats, args.query_index, order, dists, out)
    qpid = int(feats["query"]["pids"][args.query_index])
    hits = [int(feats["gallery"]["pids"][i]) == qpid for i in order.tolist()]
    print(f"query {args.query_index} (id {qpid}): top-{len(hits)} "
          + " ".join("✓" if h else "✗" for h in hits) + f"\nsaved {out}")
    return out


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Draw a query's ranked list with part weights.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--name", required=True, help="run name (folder under --runs_dir)")
    ap.add_argument("--runs_dir", default="model")
    ap.add_argument("--query_index", type=int, required=True)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--weighting", default=None, choices=["adaptive", "uniform"],
                    help="weights for ranking (default: the run's)")
    run_demo(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
