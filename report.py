"""See where a test run fails: one self-contained HTML page built from its saved features.

    python report.py [--name RUN] [--runs_dir model] [--weighting adaptive|uniform]
                     [--ap official|standard] [--rerank] [--out FILE]

Reads model/RUN/features.pt (written by test.py; nothing is re-extracted) and
model/RUN/opts.yaml; writes model/RUN/report.html (atomically). The page has no scripts,
fonts or links: thumbnails are small JPEG data URIs, made only for the images shown; the
plots are inline SVG. Sections: the run; metrics with learned and with uniform part
weights (and re-ranked with --rerank) and their CMC curves; part weights; Rank-1/mAP per
query camera; occluded vs clean queries (where the dataset has occlusion.json); the worst
queries by AP with their top-10; a few typical successes. ``test.py --report`` builds it
right after evaluating.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import datasets
import evaluate
from inference import add_eval_arguments, run_options
from model import WEIGHTINGS, weight_unit
from utils import (FEATURES_FILE, UserError, add_run_arguments, atomic_write_text, cli, load_features,
                   run_data_dir, same_dataset)

REPORT_FILE = "report.html"
WORST = 30          # failures shown
TYPICAL = 5         # successes shown for contrast
UNEVEN = 20         # images with the most uneven part weights
TOPK = 10           # gallery items per ranked list
THUMB_HEIGHT = 96   # pixels; Market crops (128x64) become 96x48
JPEG_QUALITY = 80
HIST_BINS = 20
LABELS = {"adaptive": "learned weights", "uniform": "uniform weights"}
PROTOCOL = ("Market-1501: gallery images of pid -1 are junk (ignored), pid 0 are distractors (kept as "
            "negatives), gallery images with the query's pid and camera are ignored for that query; a "
            "query with no valid match is skipped and counted. Ties in distance go to the lower gallery index.")


# --------------------------------------------------------------------------- numbers
@dataclass
class Column:
    """One weighting's evaluation of the saved features: plain and (when asked) re-ranked."""

    weighting: str
    plain: evaluate.Result
    rerank: evaluate.Result | None = None

    @property
    def label(self) -> str:
        return LABELS[self.weighting]


def evaluate_columns(feats: dict, weightings: list[str], *, ap: str, rerank: bool,
                     known: dict | None = None) -> list[Column]:
    """Evaluate the features once per weighting in ``weightings``. ``known``: results already
    computed by the caller, keyed by (weighting, reranked), reused instead of recomputed."""
    known = known or {}
    q, g = feats["query"], feats["gallery"]
    cols = []
    for w in weightings:
        qw, gw = evaluate.weights_for(w, q["weights"], g["weights"])
        plain = known.get((w, False))
        if plain is None or plain.per_query is None:
            plain = evaluate.evaluate_features(q["emb"], qw, g["emb"], gw, q["pids"], g["pids"], q["cams"],
                                               g["cams"], ap=ap)
        rr = known.get((w, True)) if rerank else None
        if rerank and rr is None:
            rr = evaluate.evaluate(
                evaluate.rerank_features(q["emb"], qw, g["emb"], gw), q["pids"], g["pids"], q["cams"], g["cams"], ap=ap)
        cols.append(Column(w, plain, rr))
    return cols


def pick_queries(per_query: evaluate.PerQuery, worst: int = WORST, typical: int = TYPICAL) -> tuple[list, list]:
    """(worst, typical) query indices. Worst: the lowest AP first (ties: lower index).
    Typical successes: queries with a true match at rank 1 whose AP is closest to the median
    AP of such queries, shown in AP order. Skipped queries are never picked."""
    valid = (per_query.first >= 0).nonzero(as_tuple=True)[0]
    order = valid[torch.sort(per_query.ap[valid], stable=True).indices]
    bad = order[:worst].tolist()
    taken = set(bad)
    ok = [i for i in (per_query.first == 0).nonzero(as_tuple=True)[0].tolist() if i not in taken]
    if not ok:
        return bad, []
    aps = per_query.ap[ok]
    near = torch.sort((aps - aps.median()).abs(), stable=True).indices[:typical]
    chosen = sorted((ok[i] for i in near.tolist()), key=lambda i: (float(per_query.ap[i]), i))
    return bad, chosen


def weight_stats(weights: torch.Tensor) -> dict:
    """weights (N,P) -> mean (P,) and std (P,) of weight x P (1.0 = uniform), spread (N,) =
    max - min of weight x P per image (0 = all stripes trusted alike)."""
    wp = weights.float() * weights.shape[1]
    spread = wp.amax(1) - wp.amin(1) if wp.shape[0] else torch.zeros(0)
    return {"mean": wp.mean(0), "std": wp.std(0, unbiased=False), "spread": spread}


# --------------------------------------------------------------------------- html pieces
def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def weight_colour(v: float) -> str:
    """Weight x P -> a red (0) / yellow (1 = uniform) / green (2 and above) colour, like demo.py's strips."""
    stops = ((0.0, (215, 48, 39)), (1.0, (255, 255, 191)), (2.0, (26, 152, 80)))
    v = min(max(float(v), 0.0), 2.0) if math.isfinite(v) else 1.0
    (a, ca), (b, cb) = (stops[0], stops[1]) if v <= 1.0 else (stops[1], stops[2])
    t = (v - a) / (b - a)
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


class Thumbnails:
    """JPEG data URIs of the images shown, each made once; unreadable images are counted."""

    def __init__(self, height: int = THUMB_HEIGHT, quality: int = JPEG_QUALITY):
        self.height, self.quality = height, quality
        self.cache: dict[str, str | None] = {}
        self.missing: list[str] = []
        self.bytes = 0

    def __call__(self, path: str) -> str | None:
        if path not in self.cache:
            try:
                img = datasets.load_image(path)
            except UserError:
                self.missing.append(path)
                self.cache[path] = None
                return None
            w = max(1, round(img.width * self.height / img.height))
            buf = io.BytesIO()
            img.resize((w, self.height), Image.BILINEAR).save(buf, format="JPEG", quality=self.quality)
            self.bytes += buf.tell()
            self.cache[path] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return self.cache[path]

    @property
    def made(self) -> int:
        return sum(v is not None for v in self.cache.values())


def weight_strip(weights: torch.Tensor, unit: str = "stripe") -> str:
    """A column of P cells, top stripe (or body part, ``unit``) first, coloured and labelled by weight x P."""
    wp = (weights.float() * weights.numel()).tolist()
    cells = "".join(f'<i style="background:{weight_colour(v)}" title="{unit} {i + 1}: weight x P = {v:.3f}">'
                    f"{v:.1f}</i>" for i, v in enumerate(wp))
    return f'<span class="strip">{cells}</span>'


def tile(thumbs: Thumbnails, path: str, weights: torch.Tensor, kind: str, caption: str, unit: str = "stripe") -> str:
    """One image with its weight strip and caption; kind: query, hit, miss, first or plain."""
    uri = thumbs(path)
    alt = _e(os.path.basename(path))
    pic = (f'<img src="{uri}" alt="{alt}" height="{thumbs.height}">' if uri else
           f'<span class="noimg" title="{_e(path)}">image<br>missing</span>')
    return (f'<figure class="tile {kind}" title="{_e(path)}"><div class="pic">{pic}{weight_strip(weights, unit)}</div>'
            f"<figcaption>{caption}</figcaption></figure>")


def svg_lines(series: list[tuple[str, str, str, list[float]]], *, xlabel: str, ylabel: str,
              width: int = 640, height: int = 300) -> str:
    """Line plot: series of (label, colour, SVG dash pattern or "", y values in [0, 1] for x = 1..n)."""
    left, right, top, bottom = 48, 230, 12, 40
    pw, ph = width - left - right, height - top - bottom
    n = max(len(s[3]) for s in series)
    lo = min([min(s[3]) for s in series if s[3]] + [1.0])
    # The y axis starts at a round value just below the lowest point, ticks every 2, 5 or 10 %.
    ymin = max(0.0, math.floor(lo * 10) / 10 - 0.1) if lo > 0.2 else 0.0
    step = 0.1 if 1 - ymin > 0.5 else 0.05 if 1 - ymin > 0.2 else 0.02
    sx = lambda x: left + (x - 1) / max(n - 1, 1) * pw  # noqa: E731
    sy = lambda y: top + (1 - (y - ymin) / (1 - ymin)) * ph  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot" role="img">']
    for k in range(round((1 - ymin) / step) + 1):
        y = ymin + step * k
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{100 * y:.0f}</text>')
    for x in sorted({1, *range(5, n + 1, 5)}):
        out.append(f'<text x="{sx(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">{_e(xlabel)}</text>'
               f'<text transform="translate(12 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle">{_e(ylabel)}</text>'
               f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    for j, (label, colour, dash, ys) in enumerate(series):
        pts = " ".join(f"{sx(i + 1):.1f},{sy(y):.1f}" for i, y in enumerate(ys))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        ly = top + 14 + 18 * j
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 34}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
                   f'stroke-width="2"{dash_attr}/><text x="{left + pw + 38}" y="{ly}">{_e(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_histogram(series: list[tuple[str, str, torch.Tensor]], *, bins: int = HIST_BINS, xlabel: str,
                  width: int = 520, height: int = 240) -> str:
    """Overlaid histograms of the fraction of items per bin: series of (label, colour, values (N,))."""
    left, right, top, bottom = 48, 150, 12, 40
    pw, ph = width - left - right, height - top - bottom
    hi = max([float(v.max()) for _, _, v in series if v.numel()] + [1e-6])
    hi = math.ceil(hi * 10) / 10
    fracs = []
    for _, _, v in series:
        h = torch.histc(v.float(), bins=bins, min=0, max=hi) if v.numel() else torch.zeros(bins)
        fracs.append((h / max(v.numel(), 1)).tolist())
    top_frac = max(max(f) for f in fracs) or 1.0
    bw = pw / bins
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot" role="img">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for k in range(5):
        y = top_frac * k / 4
        yy = top + ph - y / top_frac * ph
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{100 * y:.0f}%</text>')
    for k in range(0, bins + 1, max(1, bins // 5)):
        out.append(f'<text x="{left + k * bw:.1f}" y="{top + ph + 16}" text-anchor="middle">{hi * k / bins:.2g}</text>')
    for j, ((label, colour, _), f) in enumerate(zip(series, fracs)):
        sub = bw / len(series)
        for k, v in enumerate(f):
            if v > 0:
                h = v / top_frac * ph
                out.append(f'<rect x="{left + k * bw + j * sub:.1f}" y="{top + ph - h:.1f}" width="{sub:.1f}" '
                           f'height="{h:.1f}" fill="{colour}"><title>{_e(label)}: {100 * v:.1f}%</title></rect>')
        ly = top + 14 + 18 * j
        out.append(f'<rect x="{left + pw + 10}" y="{ly - 10}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{left + pw + 28}" y="{ly}">{_e(label)}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">{_e(xlabel)}</text></svg>')
    return "".join(out)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2329;background:#fafbfc}
main{max-width:1240px;margin:0 auto;padding:8px 20px 40px}section{scroll-margin-top:40px}
h1{font-size:22px;margin:14px 0 4px}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
nav{position:sticky;top:0;background:#24292f;padding:6px 20px;z-index:2}nav a{color:#fff;margin-right:16px;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 10px}td,th{border:1px solid #d0d7de;padding:3px 9px;text-align:right}
th{background:#eef1f4}td.k,th.k{text-align:left}table.info td{text-align:left}
.note{color:#57606a;max-width:920px}.warn{color:#9a3412;font-weight:600}.badge{background:#9a3412;color:#fff;border-radius:3px;padding:0 6px}
.plot{background:#fff;border:1px solid #d0d7de;margin:4px 12px 4px 0;font-size:11px}.plot text{fill:#1d2329}
.plot .grid{stroke:#e5e7eb}.plot .frame{fill:none;stroke:#8c959f}.plots{display:flex;flex-wrap:wrap}
.row{display:flex;flex-wrap:nowrap;align-items:flex-start;gap:4px;margin:6px 0 12px;padding:6px;background:#fff;border:1px solid #d0d7de;overflow-x:auto}
.gallery{display:flex;flex-wrap:wrap;gap:6px}
.tile{margin:0;text-align:center;font-size:11px;line-height:1.25;min-width:66px}
.pic{display:flex;justify-content:center;align-items:stretch}
.pic img,.noimg{display:block;border:3px solid #8c959f;height:96px}
.noimg{width:48px;font-size:10px;color:#57606a;background:#eee}
.query .pic img{border-color:#1d2329}.hit .pic img{border-color:#1a9850}.miss .pic img{border-color:#d73027}
.first .pic img{border-color:#1a9850;border-style:dashed}
.strip{display:flex;flex-direction:column;width:16px;margin-left:2px;border:1px solid #8c959f}
.strip i{flex:1;font-style:normal;font-size:8px;line-height:1;display:flex;align-items:center;justify-content:center;color:#1d2329}
.sep{border-left:2px solid #d0d7de;margin:0 6px}.more{align-self:center;font-size:11px;color:#57606a;max-width:70px}
"""


def metrics_table(cols: list[Column]) -> str:
    """Rank-1/5/10, mAP, mINP per column (plain, then re-ranked), and learned - uniform."""
    heads, results = [], []
    for c in cols:
        heads.append(c.label)
        results.append(c.plain)
    for c in cols:
        if c.rerank is not None:
            heads.append(c.label + ", re-ranked")
            results.append(c.rerank)
    diff = len(cols) == 2
    rows = ['<table class="metrics" id="metrics-table"><tr><th class="k">metric (%)</th>'
            + "".join(f"<th>{_e(h)}</th>" for h in heads) + ("<th>learned − uniform</th>" if diff else "") + "</tr>"]
    for key, name in (("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"), ("mAP", "mAP"), ("mINP", "mINP")):
        cells = "".join(f'<td data-metric="{key}" data-column="{_e(h)}" data-value="{float(r[key])!r}">{_pct(r[key])}</td>'
                        for h, r in zip(heads, results))
        if diff:
            d = 100 * (float(cols[0].plain[key]) - float(cols[1].plain[key]))
            cells += f"<td>{d:+.2f}</td>"
        rows.append(f'<tr><td class="k">{name}</td>{cells}</tr>')
    rows.append('<tr><td class="k">queries (skipped)</td>' + "".join(
        f"<td>{r.num_valid_queries} ({r.num_skipped_queries})</td>" for r in results) + ("<td></td>" if diff else "")
        + "</tr></table>")
    return "".join(rows)


def subset_table(cols: list[Column], groups: list[tuple[str, torch.Tensor]], table_id: str,
                 keys=(("rank1", "Rank-1"), ("mAP", "mAP"))) -> str:
    """Metrics of query subsets (label, keep (Q,) bool), one group of columns per weighting."""
    head = ('<tr><th class="k" rowspan="2">queries</th><th rowspan="2">n</th>'
            + "".join(f'<th colspan="{len(keys)}">{_e(c.label)}</th>' for c in cols) + "</tr><tr>"
            + "".join(f"<th>{name}</th>" for _ in cols for _, name in keys) + "</tr>")
    rows = [f'<table id="{table_id}">{head}']
    for label, keep in groups:
        res = [c.plain.per_query.result(keep) for c in cols]
        cells = "".join(f'<td data-metric="{k}" data-value="{float(r[k])!r}">{_pct(r[k])}</td>'
                        for r in res for k, _ in keys)
        skipped = f" (+{res[0].num_skipped_queries} skipped)" if res[0].num_skipped_queries else ""
        rows.append(f'<tr><td class="k">{_e(label)}</td><td>{res[0].num_valid_queries}{skipped}</td>{cells}</tr>')
    return "".join(rows) + "</table>"


def view_note(partial: dict | None, path: str) -> str:
    """'partial: top 55 %' for a query a --partial benchmark cut, else ''."""
    view = datasets.partial_view(partial, path) if partial is not None else None
    if not view:
        return ""
    y0, x0, y1, x1 = view["box"]
    kept = (x1 - x0) if view["kind"] == "side" else (y1 - y0)
    return f'<br><span class="warn">partial: {_e(view["kind"])} {100 * kept:.0f} %</span>'


def query_rows(idx: list[int], feats: dict, weighting: str, per_query: evaluate.PerQuery, thumbs: Thumbnails,
               truth: dict | None, css_class: str, partial: dict | None = None, unit: str = "stripe") -> str:
    """One row per query: the query, its top-10 under ``weighting`` (green = same id, red =
    another), and its first true match when that is ranked beyond the top-10. ``partial``:
    a partial-view benchmark's ground truth, noted under its cut queries; ``unit``: what a
    weight strip's cell is (stripe, or body part for the region head)."""
    if not idx:
        return '<p class="note">none</p>'
    q, g = feats["query"], feats["gallery"]
    sel = torch.tensor(idx)
    qw, gw = evaluate.weights_for(weighting, q["weights"][sel], g["weights"])
    dist = evaluate.weighted_distance(q["emb"][sel], qw, g["emb"], gw)
    order, dd = evaluate.ranked_lists(dist, q["pids"][sel], q["cams"][sel], g["pids"], g["cams"], TOPK)
    # Ranks from these very distances, so the list and "first true match at rank N" agree.
    shown = evaluate.evaluate(dist, q["pids"][sel], g["pids"], q["cams"][sel], g["cams"], ap=per_query.ap_formula)
    first = shown.per_query.first
    out = []
    for r, i in enumerate(idx):
        qpid, qcam = int(q["pids"][i]), int(q["cams"][i])
        occ = ""
        if truth is not None and datasets.occluded_rows(truth, q["paths"][i]):
            occ = '<br><span class="warn">occluded</span>'
        cap = (f"query {i}<br>id {qpid} · cam {qcam + 1}<br>AP {_pct(float(per_query.ap[i]))}{occ}"
               f"{view_note(partial, q['paths'][i])}")
        tiles = [tile(thumbs, q["paths"][i], q["weights"][i], "query", cap, unit), '<span class="sep"></span>']
        for k, (gi, d) in enumerate(zip(order[r].tolist(), dd[r].tolist())):
            if gi < 0:
                break
            gpid = int(g["pids"][gi])
            kind = "hit" if gpid == qpid else "miss"
            tiles.append(tile(thumbs, g["paths"][gi], g["weights"][gi], kind,
                              f"#{k + 1} id {gpid}<br>d={d:.3f}", unit))
        f = int(first[r])
        if f >= TOPK:
            same = (g["pids"] == qpid) & (g["cams"] != qcam)
            gi = int(torch.where(same, dist[r].nan_to_num(nan=math.inf), math.inf).argmin())
            tiles.append(f'<span class="more">first true match at rank {f + 1}</span>')
            tiles.append(tile(thumbs, g["paths"][gi], g["weights"][gi], "first",
                              f"#{f + 1} id {qpid}<br>d={float(dist[r, gi]):.3f}", unit))
        out.append(f'<div class="row {css_class}" data-query="{i}" data-ap="{float(per_query.ap[i])!r}" '
                   f'data-first="{f + 1}">{"".join(tiles)}</div>')
    return "".join(out)


# --------------------------------------------------------------------------- the page
def _header(feats: dict, opts: dict, run_dir: Path, primary: str, pq: evaluate.PerQuery, ap: str,
            unit: str) -> list[tuple[str, str]]:
    """The run table at the top: (label, HTML) rows."""
    q, g = feats["query"], feats["gallery"]
    parts, test_root = int(q["weights"].shape[1]), feats.get("data_root", "?")
    trained_on = run_data_dir(opts)
    if not trained_on:
        sets_note = '<span class="warn">training set unknown (no opts.yaml data_root)</span>'
    elif same_dataset(trained_on, test_root):
        sets_note = "same dataset as training (its own query/gallery split)"
    else:
        sets_note = '<span class="badge">cross-dataset</span> the test set is not the training set'
    skipped = (pq.first < 0).nonzero(as_tuple=True)[0].tolist()
    skipped_txt = (f'<span class="warn">{len(skipped)}</span> (no valid gallery match): '
                   + _e(", ".join(os.path.basename(q["paths"][i]) for i in skipped[:10]))
                   + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")) if skipped else "0"
    model_txt = (f"{opts.get('backbone', '?')}, P={parts} {unit}s, input {opts.get('height', '?')}×{opts.get('width', '?')}, "
                 f"{int(q['emb'].shape[2])}-d part embeddings, head {opts.get('head', '?')}, trained with "
                 f"{feats.get('weighting', 'adaptive')} weights") if opts else f"P={parts} stripes (opts.yaml missing)"
    n_ids = lambda pids: len(set(pids[pids > 0].tolist()))  # noqa: E731  (0: distractors, -1: junk)
    return [
        ("run", f"{_e(feats['run'])} <span class=note>({_e(run_dir)})</span>"),
        ("checkpoint", f"{_e(feats.get('checkpoint', '?'))}.pt, epoch {_e(feats.get('epoch', '?'))}"
                       + (f" of {_e(opts['epochs'])}" if "epochs" in opts else "")),
        ("model", _e(model_txt)),
        ("training set", _e(trained_on or "?") + (f" ({_e(opts['num_classes'])} identities)" if "num_classes" in opts else "")),
        ("test set", f"{_e(test_root)} — {sets_note}"),
        ("protocol", _e(PROTOCOL)),
        ("AP formula", _e(evaluate.AP_FORMULAS[ap])),
        ("queries × gallery", f"{len(q['paths'])} queries ({n_ids(q['pids'])} ids) × {len(g['paths'])} gallery "
                              f"images ({n_ids(g['pids'])} ids, {int((g['pids'] == 0).sum())} distractors)"),
        ("skipped queries", skipped_txt),
        ("failure lists ranked with", _e(LABELS[primary]) + ", plain distance (not re-ranked)"),
    ]


def _metrics_section(cols: list[Column]) -> str:
    palette = {"adaptive": "#d62728", "uniform": "#1f77b4"}
    series = [(c.label, palette[c.weighting], "", c.plain.cmc.tolist()) for c in cols]
    series += [(c.label + ", re-ranked", palette[c.weighting], "6 4", c.rerank.cmc.tolist())
               for c in cols if c.rerank is not None]
    ablation = ("The same checkpoint and features ranked with the learned part weights and with equal weights "
                "(the PCB ablation): the difference is what the weights do at test time."
                if len(cols) == 2 else "A uniform-weight run: the learned-weight column does not apply.")
    return (f'<p class="note">{ablation}</p>' + metrics_table(cols)
            + '<div class="plots">' + svg_lines(series, xlabel="rank", ylabel="matching rate (%)") + "</div>")


def _weights_section(feats: dict, thumbs: Thumbnails, truth: dict | None, partial: dict | None, unit: str) -> str:
    """Mean weight per part, the spread histogram and the images with the most uneven weights."""
    q, g = feats["query"], feats["gallery"]
    nq, parts = len(q["paths"]), int(q["weights"].shape[1])
    qs, gs = weight_stats(q["weights"]), weight_stats(g["weights"])
    head = "".join(f"<th>{unit} {i + 1}{' (top)' if i == 0 else ' (bottom)' if i == parts - 1 else ''}</th>"
                   for i in range(parts))
    wrows = "".join(
        f'<tr><td class="k">{name} ({len(s["spread"])} images)</td>'
        + "".join(f'<td style="background:{weight_colour(m)}" data-value="{float(m)!r}">{m:.3f} ± {sd:.3f}</td>'
                  for m, sd in zip(s["mean"].tolist(), s["std"].tolist())) + "</tr>"
        for name, s in (("query", qs), ("gallery", gs)))
    all_w = torch.cat([q["weights"], g["weights"]])
    spread = torch.cat([qs["spread"], gs["spread"]])
    uneven = torch.sort(spread, descending=True, stable=True).indices[:UNEVEN].tolist()
    tiles = []
    for j in uneven:
        split, i = ("query", j) if j < nq else ("gallery", j - nq)
        s = feats[split]
        occ = ""
        if truth is not None:
            entry = datasets.occluded_rows(truth, s["paths"][i])
            hidden = [k + 1 for k, f in enumerate(datasets.stripe_hidden(entry, parts, truth.get("height", 0)))
                      if f >= 0.5]
            occ = ("<br>clean" if not entry else '<br><span class="warn">occluded'
                   + (f": stripe{'s' * (len(hidden) > 1)} {','.join(map(str, hidden))}" if hidden else "") + "</span>")
        tiles.append(tile(thumbs, s["paths"][i], all_w[j], "plain",
                          f"{split} {i}<br>id {int(s['pids'][i])} · cam {int(s['cams'][i]) + 1}"
                          f"<br>spread {float(spread[j]):.2f}{occ}"
                          f"{view_note(partial, s['paths'][i]) if split == 'query' else ''}", unit))
    return (
        f'<p class="note">Mean learned weight × P per {unit} (1.0 = uniform; ± the standard deviation over images). '
        "Colour: red = trusted less than uniform, yellow = uniform, green = trusted more.</p>"
        f'<table id="stripe-table"><tr><th class="k">images</th>{head}</tr>{wrows}</table>'
        '<div class="plots">' + svg_histogram([("query", "#d62728", qs["spread"]), ("gallery", "#1f77b4", gs["spread"])],
                                              xlabel=f"per-image spread: max − min of weight × P over {unit}s")
        + "</div>"
        f'<h3>The {len(uneven)} images with the most uneven weights</h3><p class="note">Where the head thinks '
        f"a {unit} is hidden or unreliable. Strip beside each image: weight × P of each {unit}, top to bottom.</p>"
        f'<div class="gallery" id="uneven">{"".join(tiles)}</div>')


def _occlusion_section(cols: list[Column], feats: dict, truth: dict | None) -> str:
    if truth is None:
        return f'<p class="note">No occlusion ground truth: {_e(feats.get("data_root", "?"))} has no occlusion.json.</p>'
    occ_q = torch.tensor([bool(datasets.occluded_rows(truth, p)) for p in feats["query"]["paths"]], dtype=torch.bool)
    keys = (("rank1", "Rank-1"), ("rank5", "Rank-5"), ("mAP", "mAP"), ("mINP", "mINP"))
    return ('<p class="note">Split by the generator\'s ground truth (occlusion.json): a query is occluded '
            "when an occluder hides some of its rows.</p>"
            + subset_table(cols, [("occluded", occ_q), ("clean", ~occ_q), ("all", torch.ones_like(occ_q))],
                           "occlusion-table", keys))


def _partial_section(cols: list[Column], feats: dict, partial: dict, unit: str) -> str:
    views = [datasets.partial_view(partial, p) for p in feats["query"]["paths"]]
    groups = [("partial", torch.tensor([bool(v) for v in views])), ("whole", torch.tensor([not v for v in views]))]
    groups += [(kind, torch.tensor([bool(v) and v["kind"] == kind for v in views])) for kind in datasets.PARTIAL_KINDS]
    return ('<p class="note">Split by the benchmark\'s ground truth (partial.json, prepare.py --partial): a '
            "partial query is cut to its top, bottom or a side band and resized to full size. Its weight "
            f"strip shows which {unit}s the model thinks it sees.</p>"
            + subset_table(cols, [(k, m) for k, m in groups if m.any()], "partial-table"))


def _page(title: str, info: list[tuple[str, str]], sections: list[tuple[str, str, str]]) -> str:
    page = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        # Nothing outside this file may load: the page must open the same offline and on any machine.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{CSS}</style></head><body>',
        '<nav><a href="#header">Run</a>' + "".join(f'<a href="#{sid}">{_e(name.split(" by ")[0])}</a>'
                                                   for sid, name, _ in sections) + "</nav><main>",
        f'<section id="header"><h1>{_e(title)}</h1><table class="info">'
        + "".join(f'<tr><th class="k">{k}</th><td>{v}</td></tr>' for k, v in info) + "</table></section>",
    ]
    page += [f'<section id="{sid}"><h2>{_e(name)}</h2>{body}</section>' for sid, name, body in sections]
    page.append("</main></body></html>\n")
    return "".join(page)


def build_report(run_dir: str | os.PathLike, *, weighting: str | None = None, ap: str = evaluate.DEFAULT_AP,
                 rerank: bool = False, out: str | os.PathLike | None = None,
                 known: dict | None = None) -> Path:
    """Write RUN/report.html (or ``out``) from RUN/features.pt and return its path.

    ``weighting``: the weights the failure lists rank with (default: the run's); an adaptive
    run is always evaluated with learned and with uniform weights side by side. ``known``:
    results the caller already has, {(weighting, reranked): evaluate.Result}, reused as is.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    feats = load_features(run_dir)
    if feats.get("run") != run_dir.name:
        raise UserError(f"{run_dir / FEATURES_FILE} holds features of run {feats.get('run')!r}, not "
                        f"{run_dir.name!r} (copied from another run?); rewrite it with python test.py "
                        f"--name {run_dir.name}")
    if ap not in evaluate.AP_FORMULAS:
        raise UserError(f"--ap {ap}: expected one of {', '.join(evaluate.AP_FORMULAS)}")
    opts = run_options(run_dir, feats.get("checkpoint") or "last")
    run_weighting = feats.get("weighting", "adaptive")
    primary = weighting or run_weighting
    weightings = list(WEIGHTINGS) if "adaptive" in (run_weighting, primary) else ["uniform"]
    cols = evaluate_columns(feats, weightings, ap=ap, rerank=rerank, known=known)
    pq = cols[weightings.index(primary)].plain.per_query
    test_root = feats.get("data_root", "?")
    truth = datasets.occlusion_truth(test_root) if test_root != "?" else None
    partial = datasets.partial_truth(test_root) if test_root != "?" else None
    # A region head's weights are body parts' visibility, not stripes'.
    unit = weight_unit(run_weighting, opts.get("head"))
    thumbs = Thumbnails()
    info = _header(feats, opts, run_dir, primary, pq, ap, unit)
    q = feats["query"]
    cams = sorted(set(q["cams"].tolist()))
    bad, good = pick_queries(pq)
    fail_html = ('<p class="note">Each row: the query (black border), its top-10 (green border = same identity, '
                 "red = another; distance under each) and, when the first true match is ranked beyond 10, that "
                 f"match (dashed). Strips: part weight × P of each {unit}.</p>"
                 + query_rows(bad, feats, primary, pq, thumbs, truth, "worst", partial, unit))
    good_html = ('<p class="note">Queries with a true match at rank 1 and an AP near the median of such queries.</p>'
                 + query_rows(good, feats, primary, pq, thumbs, truth, "typical", partial, unit))
    sections = [
        ("metrics", "Metrics", _metrics_section(cols)),
        ("weights", "Part weights", _weights_section(feats, thumbs, truth, partial, unit)),
        ("cameras", "Per query camera", subset_table(cols, [(f"camera {c + 1}", q["cams"] == c) for c in cams],
                                                     "camera-table")),
        ("occlusion", "Occluded vs clean queries", _occlusion_section(cols, feats, truth)),
        *([("partial", "Partial vs whole queries", _partial_section(cols, feats, partial, unit))] if partial else []),
        ("failures", f"The {len(bad)} worst queries by AP", fail_html),
        ("successes", f"{len(good)} typical successes", good_html),
    ]
    missing = (f'<span class="warn">{len(thumbs.missing)} images could not be read</span> (moved dataset?): '
               + _e(", ".join(thumbs.missing[:5]))) if thumbs.missing else "none"
    info += [("thumbnails", f"{thumbs.made} images embedded ({thumbs.bytes / 1024:.0f} KiB as JPEG); unreadable: {missing}"),
             ("built", f"{time.strftime('%Y-%m-%d %H:%M:%S')} from {_e(run_dir / FEATURES_FILE)} in "
                       f"{time.perf_counter() - t0:.1f} s")]
    path = Path(out) if out else run_dir / REPORT_FILE
    atomic_write_text(path, _page(f"AWPCN report — {feats['run']}", info, sections))
    return path


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write RUN/report.html from the features test.py saved.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(ap, which=None)
    add_eval_arguments(ap, weighting_help="weights the failure lists rank with (default: the run's); both are "
                                          "always evaluated")
    ap.add_argument("--out", default=None, help="output file (default: RUNS_DIR/NAME/report.html)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = build_report(Path(args.runs_dir) / args.name, weighting=args.weighting, ap=args.ap, rerank=args.rerank,
                        out=args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
