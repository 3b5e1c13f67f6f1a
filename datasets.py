"""Reading a Market-1501-layout dataset, the PK identity sampler, and the transforms.

On-disk contract: a folder with ``bounding_box_train/``, ``query/``, ``bounding_box_test/``
holding images named ``PID_cCAM...`` (``NAME_RE``). Market-1501, DukeMTMC-reID and
CUHK03-NP already are this. Protocol: pid -1 is junk (dropped), pid 0 a distractor (kept in
the gallery), train pids relabelled 0..N-1, cameras 0-based.

Transforms return ``(image, vis)`` where ``vis (H,)`` is the visible fraction of each image
row after augmentation (padding, occluders and random erasing hide rows): the adaptive-weight
head is supervised with it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFile

from random_erasing import RandomErasing
from utils import UserError

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
NAME_RE = re.compile(r"^(-?\d+)_c(\d+)")
SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# Folder names a parent may hold; the first one present is used.
KNOWN_FOLDERS = ("Market-1501-v15.09.15", "Market-1501", "market1501", "DukeMTMC-reID",
                 "cuhk03-np/labeled", "cuhk03-np/detected", "msmt17")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LISTED = 20


def parse_name(path: str | os.PathLike) -> tuple[int, int]:
    """``.../0002_c3s1_000076_02.jpg`` -> (pid 2, cam 2); cameras become 0-based."""
    name = os.path.basename(path)
    m = NAME_RE.match(name)
    if not m or int(m.group(2)) < 1:
        raise UserError(f"{path}: name does not match PID_cCAM... (e.g. 0002_c3s1_000076_02.jpg, camera >= 1)")
    return int(m.group(1)), int(m.group(2)) - 1


def _is_layout(path: Path) -> bool:
    return all((path / d).is_dir() for d in SPLITS.values())


def resolve_root(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The dataset folder itself, or the one known dataset folder inside ``path``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such folder; expected a dataset folder with "
                        f"{', '.join(SPLITS.values())} (or its parent)")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder; expected a dataset folder")
    if _is_layout(path):
        return path, None
    for name in KNOWN_FOLDERS:
        if _is_layout(path / name):
            return path / name, f"using {path / name}"
    have = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:12]
    missing = [d for d in SPLITS.values() if not (path / d).is_dir()]
    raise UserError(f"{path}: not a dataset in Market-1501 layout: missing {', '.join(missing)}/ "
                    f"(found: {', '.join(have) or 'nothing'}); point --data_dir at the folder holding "
                    f"{', '.join(SPLITS.values())}, or prepare it with prepare.py")


@dataclass
class ReIDData:
    """Lists of (path, pid, cam); ``train`` holds labels 0..N-1 instead of pids."""

    root: Path
    train: list = field(default_factory=list)
    query: list = field(default_factory=list)
    gallery: list = field(default_factory=list)
    num_train_pids: int = 0
    num_cams: int = 0
    train_pids: list = field(default_factory=list)

    def summary(self) -> str:
        rows = [("train", [(p, self.train_pids[l], c) for p, l, c in self.train]),
                ("query", self.query), ("gallery", self.gallery)]
        lines = [f"dataset {self.root}", "  ----------------------------------------",
                 "  subset   | # ids | # images | # cameras", "  ----------------------------------------"]
        for name, items in rows:
            lines.append(f"  {name:<8} | {len({p for _, p, _ in items}):5d} | {len(items):8d} | "
                         f"{len({c for _, _, c in items}):9d}")
        lines.append("  ----------------------------------------")
        return "\n".join(lines)


def scan_split(folder: Path) -> tuple[list, list]:
    """(items [(path, pid, cam)] sorted by name, problems [(path, why)]); no decoding."""
    items, problems = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = os.path.join(folder, entry.name)
        if entry.is_dir(follow_symlinks=False):
            continue
        if not entry.name.lower().endswith(IMG_EXTS):
            if not entry.name.startswith("."):
                problems.append((path, f"not an image ({', '.join(IMG_EXTS)})"))
            continue
        m = NAME_RE.match(entry.name)
        if not m or int(m.group(2)) < 1:
            problems.append((path, "name does not match PID_cCAM..."))
            continue
        try:
            if entry.stat().st_size == 0:
                problems.append((path, "empty file (0 bytes)"))
                continue
        except OSError as exc:  # e.g. a dangling symlink
            problems.append((path, f"unreadable ({exc.strerror})"))
            continue
        items.append((path, int(m.group(1)), int(m.group(2)) - 1))
    return items, problems


def load_dataset(path: str | os.PathLike, *, log: Callable[[str], None] = print) -> ReIDData:
    """Read the three splits (names only, fast) under the Market-1501 protocol.

    All bad files are reported together in one UserError; nothing is skipped silently.
    """
    root, note = resolve_root(path)
    if note:
        log(note)
    splits, problems = {}, []
    for key, sub in SPLITS.items():
        items, bad = scan_split(root / sub)
        splits[key], problems = items, problems + bad
    if problems:
        listed = "\n  ".join(f"{p}: {why}" for p, why in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{root}: {len(problems)} bad file(s):\n  {listed}{more}\n"
                        f"run python prepare.py --check {root} for the full report")
    train = [x for x in splits["train"] if x[1] >= 0]
    query = [x for x in splits["query"] if x[1] >= 0]
    gallery = [x for x in splits["gallery"] if x[1] != -1]
    for key, items in (("train", train), ("query", query), ("gallery", gallery)):
        if not items:
            raise UserError(f"{root / SPLITS[key]}: no usable images (need files named PID_cCAM... with PID >= 0)")
    train_pids = sorted({p for _, p, _ in train})
    label = {p: i for i, p in enumerate(train_pids)}
    data = ReIDData(root=root, train=[(p, label[pid], c) for p, pid, c in train], query=query, gallery=gallery,
                    num_train_pids=len(train_pids),
                    num_cams=1 + max(c for _, _, c in train + query + gallery), train_pids=train_pids)
    log(data.summary())
    return data


def occlusion_fraction(rows: tuple[int, int] | None, height: int, parts: int) -> list[float]:
    """Fraction of each of ``parts`` equal horizontal stripes covered by rows [y0, y1)."""
    if not rows:
        return [0.0] * parts
    y0, y1 = rows
    out = []
    for i in range(parts):
        a, b = i * height / parts, (i + 1) * height / parts
        out.append(max(0.0, min(b, y1) - max(a, y0)) / (b - a))
    return out


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode fully to RGB (greyscale, CMYK, RGBA, palette and 16-bit converted).

    A truncated or corrupt file is a UserError naming it (PIL would otherwise pad it grey).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                bg = Image.new("RGB", img.size, (0, 0, 0))
                bg.paste(img, mask=img.split()[-1])
                return bg
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot decode image ({exc}); remove or replace it "
                        f"(python prepare.py --check lists every such file)") from None


# --------------------------------------------------------------------------- transforms
class TestTransform:
    """Resize and normalise; ``vis`` is all ones."""

    def __init__(self, height: int, width: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = (width, height)
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        if img.size != self.size:
            img = img.resize(self.size, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return x.sub_(self.mean).div_(self.std)

    def __call__(self, img: Image.Image):
        return self.to_tensor(img), torch.ones(self.size[1])


class TrainTransform(TestTransform):
    """Resize, zero-pad + random crop, flip, [colour jitter], normalise, occluder, erasing.

    Randomness comes from torch's global generator (seeded per DataLoader worker), so a
    seeded run replays exactly.
    """

    def __init__(self, height: int, width: int, *, pad: int = 10, flip: bool = True, color_jitter: bool = False,
                 erasing_prob: float = 0.5, occlude_prob: float = 0.0, occlude_max: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(height, width, mean, std)
        self.pad, self.flip, self.occlude_prob, self.occlude_max = pad, flip, occlude_prob, occlude_max
        self.jitter = None
        if color_jitter:
            from torchvision.transforms import ColorJitter
            self.jitter = ColorJitter(0.2, 0.15, 0.1, 0)
        self.erasing = RandomErasing(probability=erasing_prob)

    def __call__(self, img: Image.Image):
        if self.jitter is not None:
            img = self.jitter(img.resize(self.size, Image.BILINEAR))
        x = self.to_tensor(img)
        _, h, w = x.shape
        vis = torch.ones(h)
        if self.pad:
            # Crop window of the zero-padded image, done by slicing: rows that fall into
            # the padding are invisible. Zero after normalisation = the mean colour.
            dy, dx = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
            dy, dx = dy - self.pad, dx - self.pad
            out = torch.zeros_like(x)
            ys, yd = max(dy, 0), max(-dy, 0)
            xs, xd = max(dx, 0), max(-dx, 0)
            hh, ww = h - abs(dy), w - abs(dx)
            out[:, yd:yd + hh, xd:xd + ww] = x[:, ys:ys + hh, xs:xs + ww]
            x = out
            vis = torch.zeros(h)
            vis[yd:yd + hh] = ww / w
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(2)
        if self.occlude_prob > 0 and torch.rand(()) < self.occlude_prob:
            band = max(1, int(h * (0.15 + (self.occlude_max - 0.15) * float(torch.rand(())))))
            top = bool(torch.rand(()) < 0.5)
            rows = slice(0, band) if top else slice(h - band, h)
            colour = torch.randn(3, 1, 1)
            x[:, rows] = colour + 0.3 * torch.randn(3, band, w)
            vis[rows] = 0
        box = self.erasing.erase_(x)
        if box is not None:
            y0, x0, eh, ew = box
            vis[y0:y0 + eh] *= 1 - ew / w
        return x, vis


def build_transforms(height: int, width: int, *, train: bool, pad: int = 10, flip: bool = True,
                     color_jitter: bool = False, erasing_prob: float = 0.5, occlude_prob: float = 0.0,
                     occlude_max: float = 0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A callable PIL image -> (image (3,H,W) float32 normalised, vis (H,) float32)."""
    if not train:
        return TestTransform(height, width, mean, std)
    return TrainTransform(height, width, pad=pad, flip=flip, color_jitter=color_jitter, erasing_prob=erasing_prob,
                          occlude_prob=occlude_prob, occlude_max=occlude_max, mean=mean, std=std)


class ImageDataset(torch.utils.data.Dataset):
    """items [(path, pid, cam)] -> (img (3,H,W), vis (H,), pid, cam)."""

    def __init__(self, items, transform):
        self.items, self.transform = list(items), transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, pid, cam = self.items[i]
        img, vis = self.transform(load_image(path))
        return img, vis, pid, cam


# --------------------------------------------------------------------------- sampler
class PKSampler(torch.utils.data.Sampler):
    """Batches of P identities x K images, for a DataLoader's ``batch_sampler``.

    An epoch covers about every training image once (as an epoch of plain shuffling
    would): ids are drawn P at a time from successive random permutations until
    ``len(labels) // (P*K)`` batches are made. K images per id without replacement when it
    has K, else with. All randomness derives from (seed, epoch): the same epoch always
    yields the same batches, which is how training resumes exactly. Batches are dealt
    round-robin to ``world_size`` ranks, truncated so every rank gets the same number.
    """

    def __init__(self, labels, p: int, k: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.by_id: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            self.by_id.setdefault(int(label), []).append(i)
        self.ids = sorted(self.by_id)
        if p < 1 or k < 1:
            raise UserError(f"PK sampler needs P >= 1 and K >= 1, got P={p}, K={k}")
        if len(self.ids) < p:
            raise UserError(f"the training set has {len(self.ids)} identities, fewer than P={p} per batch; "
                            "lower --batchsize (P = batchsize / instances) or --instances")
        self.p, self.k, self.seed, self.rank, self.world = p, k, seed, rank, world_size
        total = max(len(labels) // (p * k), 1)
        self.per_rank = total // world_size
        if self.per_rank == 0:
            raise UserError(f"{len(labels)} training images make {total} batch(es) of {p * k}, fewer than "
                            f"{world_size} processes; lower --batchsize or use fewer processes")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        need = self.per_rank * self.world
        batches, queue = [], []
        while len(batches) < need:
            if len(queue) < self.p:
                # Next permutation, minus ids still queued, so a batch never repeats an id.
                queued = set(queue)
                queue += [self.ids[j] for j in torch.randperm(len(self.ids), generator=g).tolist()
                          if self.ids[j] not in queued]
            chosen, queue = queue[:self.p], queue[self.p:]
            batch = []
            for pid in chosen:
                pool = self.by_id[pid]
                if len(pool) >= self.k:
                    pick = torch.randperm(len(pool), generator=g)[:self.k]
                else:
                    pick = torch.randint(len(pool), (self.k,), generator=g)
                batch += [pool[int(j)] for j in pick]
            batches.append(batch)
        return batches

    def __iter__(self):
        return iter(self._all_batches()[self.rank::self.world])

    def __len__(self) -> int:
        return self.per_rank
