"""Reading a Market-1501-layout dataset, the PK identity sampler, and the transforms.

On-disk contract: a folder with ``bounding_box_train/``, ``query/``, ``bounding_box_test/``
holding images named ``PID_cCAM...`` (``NAME_RE``). Market-1501, DukeMTMC-reID and
CUHK03-NP already are this. Protocol: pid -1 is junk (dropped), pid 0 a distractor (kept in
the gallery; in train and query both are dropped and counted), train pids relabelled 0..N-1,
cameras 0-based.

Transforms return ``(image, vis)`` where ``vis (H, W)`` is the visible fraction of each pixel
after augmentation (padding, occluders and random erasing hide pixels): the adaptive-weight
head is supervised with it; with ``body_rows`` also ``rows (H,)``, where each image row lies
in the original body (0 = top, 1 = bottom; < 0 in padding), the region head's target.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFile

import occluders
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


def _is_layout(path: Path, need=tuple(SPLITS)) -> bool:
    return all((path / SPLITS[k]).is_dir() for k in need)


def resolve_root(path: str | os.PathLike, need=tuple(SPLITS)) -> tuple[Path, str | None]:
    """The dataset folder itself, or the one known dataset folder inside ``path``.

    ``need``: the splits (keys of ``SPLITS``) whose folders must exist; testing needs only
    ``("query", "gallery")``, so a test-only set (no ``bounding_box_train/``) resolves too.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such folder; expected a dataset folder with "
                        f"{', '.join(SPLITS.values())} (or its parent)")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder; expected a dataset folder")
    if _is_layout(path, need):
        return path, None
    for name in KNOWN_FOLDERS:
        if _is_layout(path / name, need):
            return path / name, f"using {path / name}"
    have = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:12]
    missing = [SPLITS[k] for k in need if not (path / SPLITS[k]).is_dir()]
    if missing == [SPLITS["train"]] and _is_layout(path, ("query", "gallery")):
        raise UserError(f"{path}: missing bounding_box_train/: a test-only dataset (query/ and bounding_box_test/ "
                        "only); train on another dataset and evaluate on this one with test.py --data_dir")
    raise UserError(f"{path}: not a dataset in Market-1501 layout: missing {', '.join(missing)}/ "
                    f"(found: {', '.join(have) or 'nothing'}); point --data_dir at the folder holding "
                    f"{', '.join(SPLITS[k] for k in need)}, or prepare it with prepare.py")


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
    splits: tuple = tuple(SPLITS)    # the splits read; train is empty when only testing

    def summary(self) -> str:
        rows = [("train", [(p, self.train_pids[l], c) for p, l, c in self.train]),
                ("query", self.query), ("gallery", self.gallery)]
        rows = [r for r in rows if r[0] in self.splits]
        lines = [f"dataset {self.root}", "  ----------------------------------------",
                 "  subset   | # ids | # images | # cameras", "  ----------------------------------------"]
        for name, items in rows:
            lines.append(f"  {name:<8} | {len({p for _, p, _ in items}):5d} | {len(items):8d} | "
                         f"{len({c for _, _, c in items}):9d}")
        lines.append("  ----------------------------------------")
        return "\n".join(lines)


def scan_split(folder: Path, skipped: list | None = None) -> tuple[list, list]:
    """(items [(path, pid, cam)] sorted by name, problems [(path, why)]); no decoding.

    Files that are not images by extension (``Thumbs.db`` and ``readme.txt`` in the official
    archives, ``.DS_Store``, hidden files) are not problems: they are appended to ``skipped``
    for the caller to count. A file with an image extension that is empty or misnamed is.
    """
    items, problems = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = os.path.join(folder, entry.name)
        if entry.is_dir(follow_symlinks=False):
            continue
        if entry.name.startswith(".") or not entry.name.lower().endswith(IMG_EXTS):
            if skipped is not None:
                skipped.append(path)
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


def load_dataset(path: str | os.PathLike, *, need=tuple(SPLITS),
                 log: Callable[[str], None] = print) -> ReIDData:
    """Read the splits in ``need`` (names only, fast) under the Market-1501 protocol.

    Training needs all three; testing passes ``need=("query", "gallery")`` and then neither
    reads nor requires ``bounding_box_train/`` (test-only sets have none). All bad files
    are reported together in one UserError; nothing is skipped silently.
    """
    if not need or set(need) - set(SPLITS):
        raise ValueError(f"need={need!r}: expected a non-empty subset of {tuple(SPLITS)}")
    root, note = resolve_root(path, need)
    if note:
        log(note)
    splits, problems, skipped = {key: [] for key in SPLITS}, [], []
    for key in need:
        items, bad = scan_split(root / SPLITS[key], skipped)
        splits[key], problems = items, problems + bad
    if skipped:
        log(skipped_note(root, skipped))
    if problems:
        listed = "\n  ".join(f"{p}: {why}" for p, why in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{root}: {len(problems)} bad file(s):\n  {listed}{more}\n"
                        f"run python prepare.py --check {root} for the full report")
    # pid 0 (distractor) and -1 (junk) are gallery-only labels: a pid-0 query would count the
    # other distractors as its true matches, and a pid-0 training "identity" is no identity.
    train = [x for x in splits["train"] if x[1] > 0]
    query = [x for x in splits["query"] if x[1] > 0]
    gallery = [x for x in splits["gallery"] if x[1] != -1]
    for key, kept in (("train", train), ("query", query)):
        if len(kept) < len(splits[key]):
            n0 = sum(pid == 0 for _, pid, _ in splits[key])
            log(f"dropped {len(splits[key]) - len(kept)} {key} image(s) of {root / SPLITS[key]} "
                f"({n0} with pid 0 = distractor, {len(splits[key]) - len(kept) - n0} with pid -1 = junk): "
                "distractors and junk belong to the gallery only")
    for key, items in (("train", train), ("query", query), ("gallery", gallery)):
        if not items and key in need:
            raise UserError(f"{root / SPLITS[key]}: no usable images (need files named PID_cCAM... "
                            f"with PID >= {0 if key == 'gallery' else 1})")
    train_pids = sorted({p for _, p, _ in train})
    label = {p: i for i, p in enumerate(train_pids)}
    data = ReIDData(root=root, train=[(p, label[pid], c) for p, pid, c in train], query=query, gallery=gallery,
                    num_train_pids=len(train_pids),
                    num_cams=1 + max(c for _, _, c in train + query + gallery), train_pids=train_pids,
                    splits=tuple(k for k in SPLITS if k in need))
    log(data.summary())
    return data


def carve_validation(data: ReIDData, fraction: float, seed: int = 0) -> tuple[ReIDData, ReIDData]:
    """Split the training identities: (train on the rest, validation set).

    ``fraction`` of the training ids (at least 2, chosen by ``seed`` alone, so every run and
    variant sees the same split) become a validation query/gallery in the Market protocol:
    per id and camera one query image, everything else gallery; ids seen by one camera only
    go wholly to the gallery, as does a query left without a gallery image of its id from
    another camera (as queries they could never match). The test split is not
    touched. Both returned sets carry the remaining training ids relabelled 0..N-1.
    """
    if not 0 < fraction < 1:
        raise UserError(f"--val_ids {fraction}: expected a fraction of the training ids in (0, 1), e.g. 0.15")
    n_val = max(2, round(fraction * data.num_train_pids))
    if data.num_train_pids - n_val < 2:
        raise UserError(f"--val_ids {fraction}: {data.num_train_pids} training ids leave fewer than 2 to train on")
    rng = np.random.default_rng(seed)
    val_labels = set(rng.choice(data.num_train_pids, n_val, replace=False).tolist())
    keep = [pid for label, pid in enumerate(data.train_pids) if label not in val_labels]
    relabel = {data.train_pids.index(pid): i for i, pid in enumerate(keep)}
    train = [(p, relabel[label], c) for p, label, c in data.train if label not in val_labels]
    query, gallery = [], []
    by_id: dict[int, list] = {}
    for p, label, c in data.train:
        if label in val_labels:
            by_id.setdefault(data.train_pids[label], []).append((p, data.train_pids[label], c))
    for pid in sorted(by_id):
        items = by_id[pid]
        cams = sorted({c for _, _, c in items})
        if len(cams) < 2:
            gallery += items
            continue
        picked, rest = [], []
        for cam in cams:
            mine = [x for x in items if x[2] == cam]
            pick = int(rng.integers(len(mine)))
            picked.append(mine[pick])
            rest += mine[:pick] + mine[pick + 1:]
        # A query whose id keeps no gallery image from another camera could never match: it
        # joins the gallery instead (and may give the next camera's query its match).
        for q in picked:
            (query if any(c != q[2] for _, _, c in rest) else rest).append(q)
        gallery += rest
    common = dict(root=data.root, train=train, num_train_pids=len(keep), num_cams=data.num_cams, train_pids=keep)
    return ReIDData(**common, query=data.query, gallery=data.gallery), ReIDData(**common, query=query, gallery=gallery)


def skipped_note(root: Path, skipped: list) -> str:
    """'skipped 1 non-image file: bounding_box_test/Thumbs.db' (a few named, the rest counted)."""
    names = [os.path.relpath(p, root) for p in skipped]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"skipped {len(names)} non-image file{'s' if len(names) != 1 else ''}: {shown}"


OCCLUSION_FILE = "occlusion.json"


def occlusion_truth(data_root: str | os.PathLike) -> dict | None:
    """The synthetic generator's ground truth, ``DATA_ROOT/occlusion.json`` (``height``,
    ``images``: "split folder/file name" -> hidden rows [y0, y1) or None), with ``root``
    added; None for a dataset without one (real data)."""
    gt_file = Path(data_root) / OCCLUSION_FILE
    if not gt_file.is_file():
        return None
    try:
        truth = json.loads(gt_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{gt_file}: unreadable ({exc}); regenerate the dataset with prepare.py --synthetic "
                        "or delete the file") from None
    return {**truth, "root": Path(data_root).resolve()}


PARTIAL_FILE = "partial.json"


def partial_truth(data_root: str | os.PathLike) -> dict | None:
    """A partial-view benchmark's ground truth (``prepare.py --partial``), ``DATA_ROOT/partial.json``
    (``images``: "split folder/file name" -> {"kind", "box": [y0, x0, y1, x1]} or None), with
    ``root`` added; None for a dataset without one."""
    gt_file = Path(data_root) / PARTIAL_FILE
    if not gt_file.is_file():
        return None
    try:
        truth = json.loads(gt_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{gt_file}: unreadable ({exc}); rebuild the benchmark with prepare.py --partial") from None
    return {**truth, "root": Path(data_root).resolve()}


def partial_view(truth: dict, path: str | os.PathLike) -> dict | None:
    """The partial view ({"kind", "box"}) of image ``path`` in :func:`partial_truth` ``truth``,
    None for a whole image."""
    key = "/".join(Path(path).parts[-2:])
    if key not in truth["images"]:
        raise UserError(f"{truth['root'] / PARTIAL_FILE}: has no entry for {key}; the benchmark was changed "
                        "after it was built: rebuild it with prepare.py --partial")
    return truth["images"][key]


def parts_shown(box, parts: int) -> list[float]:
    """Fraction of each of ``parts`` equal bands of the original body's height that a partial
    view ``box`` [y0, x0, y1, x1] keeps (rows only: a side band keeps every part); None = all."""
    if not box:
        return [1.0] * parts
    y0, _, y1, _ = box
    return [max(0.0, min(y1, (i + 1) / parts) - max(y0, i / parts)) * parts for i in range(parts)]


def occluded_rows(truth: dict, path: str | os.PathLike) -> list | None:
    """Rows [y0, y1) hidden in image ``path`` by :func:`occlusion_truth` ``truth``, None if
    clean. Keyed by split folder and file name, so a moved dataset still matches."""
    key = "/".join(Path(path).parts[-2:])
    if key not in truth["images"]:
        raise UserError(f"{truth['root'] / OCCLUSION_FILE}: has no entry for {key}; the dataset was changed "
                        "after it was generated: regenerate it with prepare.py --synthetic")
    return truth["images"][key]


def stripe_hidden(entry, parts: int, height: int, feat_rows: int | None = None) -> list[float]:
    """Hidden fraction of each of ``parts`` stripes of an image, from its ground-truth entry
    (:func:`occluded_rows`: rows [y0, y1) of an image ``height`` tall, or ``{"hidden_rows":
    per-row hidden fraction}``; None = clean). With ``feat_rows`` (the trunk map's height) the
    rows are pooled into the stripes exactly as the model pools them; else equal bands."""
    if not entry:
        return [0.0] * parts
    if isinstance(entry, dict):
        rows = torch.tensor(entry["hidden_rows"], dtype=torch.float32)
    else:
        rows = torch.zeros(height)
        rows[int(entry[0]):int(entry[1])] = 1
    pooled = rows.view(1, 1, -1)
    if feat_rows:
        pooled = torch.nn.functional.adaptive_avg_pool1d(pooled, feat_rows)
    return torch.nn.functional.adaptive_avg_pool1d(pooled, parts).flatten().tolist()


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode fully to RGB (greyscale, CMYK, RGBA, palette and 16-bit converted).

    A truncated or corrupt file is a UserError naming it (PIL would otherwise pad it grey).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot decode image ({exc}); remove or replace it "
                        f"(python prepare.py --check lists every such file)") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image as :func:`load_image` makes it (also for in-memory images, inference.Extractor):
    16/32-bit greyscale scaled to 8 bits, transparency composited on black, other modes converted."""
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


# --------------------------------------------------------------------------- transforms
OCCLUDERS = ("patch", "band", "both")
# Partial views the training crop makes (probability of each kind): the part of a person a
# detector box keeps when a desk, a car or the frame edge cuts it.
PARTIAL_KINDS = {"top": 0.4, "bottom": 0.4, "side": 0.2}


def partial_box(kind: str, keep: float, side: str = "left") -> tuple[float, float, float, float]:
    """The kept part (y0, x0, y1, x1) of an image, as fractions of its height and width:
    ``top`` keeps the upper ``keep`` of the rows, ``bottom`` the lower, ``side`` a band of
    ``keep`` of the columns at the ``side`` ('left' or 'right')."""
    if kind == "top":
        return 0.0, 0.0, keep, 1.0
    if kind == "bottom":
        return 1.0 - keep, 0.0, 1.0, 1.0
    return (0.0, 0.0, 1.0, keep) if side == "left" else (0.0, 1.0 - keep, 1.0, 1.0)


def box_rows(y0: float, y1: float, height: int) -> torch.Tensor:
    """(height,) position in the original body of each row of a crop of rows [y0, y1)
    (fractions of the body's height) resized to ``height`` rows: row centres, linearly."""
    return y0 + (y1 - y0) * (torch.arange(height, dtype=torch.float32) + 0.5) / height


class TestTransform:
    """Resize and normalise; ``vis`` is all ones."""

    def __init__(self, height: int, width: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = (width, height)
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255

    def to_tensor(self, img: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
        """PIL image -> (3, H, W) normalised, resized to ``size`` (W, H), by default the model's."""
        size = size or self.size
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return x.sub_(self.mean).div_(self.std)

    def __call__(self, img: Image.Image, pid: int | None = None):
        return self.to_tensor(img), torch.ones(self.size[1], self.size[0])


class TrainTransform(TestTransform):
    """Resize, zero-pad + random crop, flip, [colour jitter], normalise, occluder, erasing.

    ``vis (H, W)`` is the visible fraction of every pixel after augmentation: 0 in the
    padding and under erasing boxes and band occluders, ``1 - alpha`` under a real-image
    patch occluder (soft edges included), so each stripe's visibility is exact.

    Occluders (probability ``occlude_prob``): ``patch`` = a soft-edged irregular piece of
    another identity's training image (``occluder_bank``: [(path, pid)]) pasted at the
    bottom, top or a side (``occluders.soft_alpha``); ``band`` = a flat noise band over the
    top or bottom rows; ``both`` = either, half the time each.

    Randomness comes from torch's global generator (seeded per DataLoader worker), so a
    seeded run replays exactly.

    Partial views (probability ``partial_prob``): before anything else the image is cut to
    a top, bottom or side part (:data:`PARTIAL_KINDS`) keeping ``partial_min``..1 of its
    height or width, and resized to the input size, as a detector box cut by a desk is.

    ``body_rows``: also return ``rows (H,)``, where each row of the result lies in the
    original body (``(x, vis, rows)``; -1 in the padding).
    ``keep_clean``: also return the same crop and flip before any occluder or erasing
    (``(x, vis[, rows], clean)``), the target of the occlusion-invariance loss.
    """

    def __init__(self, height: int, width: int, *, pad: int = 10, flip: bool = True, color_jitter: bool = False,
                 erasing_prob: float = 0.5, occlude_prob: float = 0.0, occlude_max: float = 0.5,
                 occluder: str = "band", occluder_bank=None, keep_clean: bool = False,
                 partial_prob: float = 0.0, partial_min: float = 0.5, body_rows: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(height, width, mean, std)
        self.keep_clean, self.body_rows = keep_clean, body_rows
        if not 0 <= partial_prob <= 1:
            raise UserError(f"--partial_prob {partial_prob}: expected a probability in [0, 1]")
        if not 0 < partial_min <= 1:
            raise UserError(f"--partial_min {partial_min}: expected a fraction in (0, 1]")
        self.partial_prob, self.partial_min = partial_prob, partial_min
        if occluder not in OCCLUDERS:
            raise UserError(f"--occluder {occluder}: expected one of {', '.join(OCCLUDERS)}")
        if occluder != "band" and occlude_prob > 0 and not occluder_bank:
            raise UserError(f"--occluder {occluder} needs training images to cut occluders from")
        self.pad, self.flip, self.occlude_prob, self.occlude_max = pad, flip, occlude_prob, occlude_max
        self.occluder, self.bank = occluder, list(occluder_bank or [])
        self.bank_pids = {pid for _, pid in self.bank}
        self.jitter = None
        if color_jitter:
            from torchvision.transforms import ColorJitter
            self.jitter = ColorJitter(0.2, 0.15, 0.1, 0)
        self.erasing = RandomErasing(probability=erasing_prob)

    def _band(self, x: torch.Tensor, vis: torch.Tensor) -> None:
        h, w = vis.shape
        band = max(1, int(h * (0.15 + (self.occlude_max - 0.15) * float(torch.rand(())))))
        top = bool(torch.rand(()) < 0.5)
        rows = slice(0, band) if top else slice(h - band, h)
        colour = torch.randn(3, 1, 1)
        x[:, rows] = colour + 0.3 * torch.randn(3, band, w)
        vis[rows] = 0

    def _patch(self, x: torch.Tensor, vis: torch.Tensor, pid: int | None) -> None:
        h, w = vis.shape
        others = len(self.bank_pids) > 1 or pid not in self.bank_pids
        while True:  # another identity's image whenever the bank has one; one's own is redrawn
            src_path, src_pid = self.bank[int(torch.randint(len(self.bank), ()))]
            if src_pid != pid or not others:
                break
        alpha = occluders.soft_alpha(h, w, max_depth=self.occlude_max)
        rows, cols = (alpha > 0).any(1).nonzero().flatten(), (alpha > 0).any(0).nonzero().flatten()
        if len(rows) == 0:
            return
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        src = load_image(src_path).resize(self.size, Image.BILINEAR)
        sy0, sx0, sy1, sx1 = occluders.source_box(h, w, torch.rand(4).tolist())
        patch = self.to_tensor(src.crop((sx0, sy0, sx1, sy1)), (x1 - x0, y1 - y0))
        a = alpha[y0:y1, x0:x1]
        x[:, y0:y1, x0:x1] = x[:, y0:y1, x0:x1] * (1 - a) + patch * a
        vis[y0:y1, x0:x1] *= 1 - a

    def _partial(self, img: Image.Image) -> tuple[Image.Image, tuple[float, float]]:
        """A random partial view of ``img`` and the rows [y0, y1) of the original it keeps."""
        r, acc = float(torch.rand(())), 0.0
        for kind, prob in PARTIAL_KINDS.items():
            acc += prob
            if r < acc:
                break
        keep = self.partial_min + (1 - self.partial_min) * float(torch.rand(()))
        side = "left" if torch.rand(()) < 0.5 else "right"
        y0, x0, y1, x1 = partial_box(kind, keep, side)
        w, h = img.size
        box = (round(x0 * w), round(y0 * h), max(round(x1 * w), round(x0 * w) + 1), max(round(y1 * h), round(y0 * h) + 1))
        return img.crop(box), (box[1] / h, box[3] / h)

    def __call__(self, img: Image.Image, pid: int | None = None):
        span = (0.0, 1.0)
        if self.partial_prob > 0 and torch.rand(()) < self.partial_prob:
            img, span = self._partial(img)
        if self.jitter is not None:
            img = self.jitter(img.resize(self.size, Image.BILINEAR))
        x = self.to_tensor(img)
        _, h, w = x.shape
        vis = torch.ones(h, w)
        rows = box_rows(span[0], span[1], h)
        if self.pad:
            # Crop window of the zero-padded image, done by slicing: pixels that fall into
            # the padding are invisible. Zero after normalisation = the mean colour.
            dy, dx = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
            dy, dx = dy - self.pad, dx - self.pad
            out = torch.zeros_like(x)
            ys, yd = max(dy, 0), max(-dy, 0)
            xs, xd = max(dx, 0), max(-dx, 0)
            hh, ww = h - abs(dy), w - abs(dx)
            out[:, yd:yd + hh, xd:xd + ww] = x[:, ys:ys + hh, xs:xs + ww]
            x = out
            vis = torch.zeros(h, w)
            vis[yd:yd + hh, xd:xd + ww] = 1
            shifted = torch.full((h,), -1.0)
            shifted[yd:yd + hh] = rows[ys:ys + hh]
            rows = shifted
        if self.flip and torch.rand(()) < 0.5:
            x, vis = x.flip(2), vis.flip(1)
        clean = x.clone() if self.keep_clean else None
        if self.occlude_prob > 0 and torch.rand(()) < self.occlude_prob:
            kind = self.occluder if self.occluder != "both" else ("patch" if torch.rand(()) < 0.5 else "band")
            if kind == "band":
                self._band(x, vis)
            else:
                self._patch(x, vis, pid)
        box = self.erasing.erase_(x)
        if box is not None:
            y0, x0, eh, ew = box
            vis[y0:y0 + eh, x0:x0 + ew] = 0
        return (x, vis, *([rows] if self.body_rows else []), *([] if clean is None else [clean]))


def build_transforms(height: int, width: int, *, train: bool, pad: int = 10, flip: bool = True,
                     color_jitter: bool = False, erasing_prob: float = 0.5, occlude_prob: float = 0.0,
                     occlude_max: float = 0.5, occluder: str = "band", occluder_bank=None,
                     keep_clean: bool = False, partial_prob: float = 0.0, partial_min: float = 0.5,
                     body_rows: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A callable (PIL image, pid=None) -> (image (3,H,W) float32 normalised, vis (H,W) float32
    [, rows (H,) with ``body_rows``] [, the image before occluders and erasing (3,H,W) with
    ``keep_clean``])."""
    if not train:
        return TestTransform(height, width, mean, std)
    return TrainTransform(height, width, pad=pad, flip=flip, color_jitter=color_jitter, erasing_prob=erasing_prob,
                          occlude_prob=occlude_prob, occlude_max=occlude_max, occluder=occluder,
                          occluder_bank=occluder_bank, keep_clean=keep_clean, partial_prob=partial_prob,
                          partial_min=partial_min, body_rows=body_rows, mean=mean, std=std)


class ImageDataset(torch.utils.data.Dataset):
    """items [(path, pid, cam)] -> (img (3,H,W), vis (H,W), pid, cam[, rows (H,)][, clean (3,H,W)]):
    what the transform returns besides image and visibility, in its order."""

    def __init__(self, items, transform):
        self.items, self.transform = list(items), transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, pid, cam = self.items[i]
        img, vis, *extra = self.transform(load_image(path), pid)
        return (img, vis, pid, cam, *extra)


# --------------------------------------------------------------------------- sampler
class PKSampler(torch.utils.data.Sampler):
    """Batches of P identities x K images, for a DataLoader's ``batch_sampler``.

    An epoch sees every training image once, give or take K per identity (the semantics of
    torchreid's RandomIdentitySampler): each id's images are shuffled and dealt in chunks of
    K, a short last chunk padded by resampling that id's images; each batch takes the next
    chunk of P distinct ids, drawn with probability proportional to the chunks they have
    left, so an id with 72 images is drawn 18 times as often as one with 4, and ids run out
    together instead of the small ones first. ``len`` = total chunks // P batches; should
    fewer than P ids still hold chunks, the exhausted ids are dealt afresh.

    All randomness derives from (seed, epoch): the same epoch always yields the same
    batches, which is how training resumes exactly. Batches are dealt round-robin to
    ``world_size`` ranks, truncated so every rank gets the same number.
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
        chunks = sum(-(-len(self.by_id[i]) // k) for i in self.ids)
        total = max(chunks // p, 1)
        self.per_rank = total // world_size
        if self.per_rank == 0:
            raise UserError(f"{len(labels)} training images make {total} batch(es) of {p * k}, fewer than "
                            f"{world_size} processes; lower --batchsize or use fewer processes")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _deal(self, pid: int, g: torch.Generator) -> list[list[int]]:
        """One pass over ``pid``'s images in random order, as chunks of K."""
        pool = self.by_id[pid]
        order = [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()]
        short = -len(order) % self.k
        if short:
            order += [pool[j] for j in torch.randint(len(pool), (short,), generator=g).tolist()]
        return [order[i:i + self.k] for i in range(0, len(order), self.k)]

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        chunks = [self._deal(pid, g) for pid in self.ids]
        left = torch.tensor([len(c) for c in chunks], dtype=torch.float64)
        batches = []
        for _ in range(self.per_rank * self.world):
            first = []
            if int((left > 0).sum()) < self.p:
                # The ids still holding chunks go first; the re-dealt ones only fill the batch,
                # else a re-dealt id could take the place of one whose images were never seen.
                first = (left > 0).nonzero().flatten().tolist()
                for j in (left == 0).nonzero().flatten().tolist():
                    chunks[j] = self._deal(self.ids[j], g)
                    left[j] = len(chunks[j])
            rest = left.clone()
            rest[first] = 0
            chosen = first + torch.multinomial(rest, self.p - len(first), replacement=False, generator=g).tolist()
            batch = []
            for j in chosen:
                batch += chunks[j].pop()
                left[j] -= 1
            batches.append(batch)
        return batches

    def __iter__(self):
        return iter(self._all_batches()[self.rank::self.world])

    def __len__(self) -> int:
        return self.per_rank
