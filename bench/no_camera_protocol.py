"""How much the no-camera protocol (prepare.py --folders --cams none) raises Rank-1 and mAP.

    python bench/no_camera_protocol.py [--data_dir ../shared/data/market1501-sub] [--run model/RUN]

Ranks the same queries against the same gallery twice: under the Market-1501 protocol
(gallery images of the query's identity from the query's own camera are ignored) and under
the protocol that --folders uses when it has no camera ids (queries written as camera 1,
gallery as camera 2, so every gallery image of the identity counts as a match). Descriptor:
a trained run's features (--run: the features.pt test.py wrote for this dataset) or, by
default, a colour histogram of 4 horizontal stripes, which needs no training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import datasets  # noqa: E402
import evaluate  # noqa: E402
from utils import load_features  # noqa: E402


def histogram(path: str) -> np.ndarray:
    """(64,) unit vector: per stripe (4), HSV histograms of 8 + 4 + 4 bins, square-rooted."""
    a = np.asarray(datasets.load_image(path).convert("HSV").resize((16, 32), Image.BILINEAR), np.float32) / 256
    out = []
    for stripe in np.array_split(a, 4, axis=0):
        for ch, bins in ((0, 8), (1, 4), (2, 4)):
            h = np.histogram(stripe[..., ch], bins=bins, range=(0, 1))[0].astype(np.float32)
            out.append(h / max(h.sum(), 1.0))
    v = np.sqrt(np.concatenate(out))
    return v / np.linalg.norm(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "market1501-sub"))
    ap.add_argument("--run", default=None, help="a run folder whose features.pt was extracted on --data_dir")
    args = ap.parse_args(argv)
    if args.run:
        feats = load_features(args.run)
        q, g = feats["query"], feats["gallery"]
        dist = evaluate.weighted_distance(q["emb"], q["weights"], g["emb"], g["weights"])
        qp, qc, gp, gc = q["pids"], q["cams"], g["pids"], g["cams"]
        what = f"features of {args.run} ({feats.get('data_root')})"
    else:
        data = datasets.load_dataset(args.data_dir, need=("query", "gallery"), log=lambda *_: None)
        qf = torch.tensor(np.stack([histogram(p) for p, _, _ in data.query]))
        gf = torch.tensor(np.stack([histogram(p) for p, _, _ in data.gallery]))
        dist = 1 - qf @ gf.T
        qp, qc = (torch.tensor([x[i] for x in data.query]) for i in (1, 2))
        gp, gc = (torch.tensor([x[i] for x in data.gallery]) for i in (1, 2))
        what = f"colour histograms of {data.root}"
    same = sum(int(((gp == p) & (gc == c)).sum()) for p, c in zip(qp.tolist(), qc.tolist())) / len(qp)
    cross = sum(int(((gp == p) & (gc != c)).sum()) for p, c in zip(qp.tolist(), qc.tolist())) / len(qp)
    print(f"{what}: {len(qp)} queries x {len(gp)} gallery; per query {cross:.1f} true matches from other "
          f"cameras, {same:.1f} from its own camera")
    for name, a, b in (("camera-filtered (Market-1501)", qc, gc),
                       ("no cameras (--cams none)", torch.ones_like(qc), torch.full_like(gc, 2))):
        print(f"{name:<30} {evaluate.format_result(evaluate.evaluate(dist, qp, gp, a, b))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
