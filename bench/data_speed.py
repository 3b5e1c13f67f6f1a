"""Images/s of decode + train transforms per worker, on real Market-1501 jpgs.

    python bench/data_speed.py [--data_dir ../shared/data/market1501-sub] [--n 1500] [--height 384 --width 128]

One process, one thread: what a single DataLoader worker delivers. Target: >= 400 img/s
per core, so 16 cores feed ~1,000 img/s of GPU training with room to spare.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import datasets  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "market1501-sub"))
    ap.add_argument("--n", type=int, default=1500, help="images per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = datasets.load_dataset(args.data_dir, log=lambda *_: None)
    items = data.train[:args.n]
    setups = {
        "decode only": None,
        "decode + test transform": datasets.build_transforms(args.height, args.width, train=False),
        "decode + train transforms (pad/crop, flip, erasing 0.5, occluder 0.3)":
            datasets.build_transforms(args.height, args.width, train=True, occlude_prob=0.3),
    }
    print(f"{len(items)} Market-1501 jpgs from {args.data_dir}, output {args.height}x{args.width}, 1 thread; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; median of {args.rounds}")
    for name, tf in setups.items():
        rates = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for path, _, _ in items:
                img = datasets.load_image(path)
                if tf is not None:
                    tf(img)
            rates.append(len(items) / (time.perf_counter() - t0))
        print(f"  {name:<72} {statistics.median(rates):7.0f} img/s per core")
    print("target: >= 400 img/s per core for decode + train transforms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
