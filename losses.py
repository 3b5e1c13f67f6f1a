"""AWPCN training objective: per-part CE + fused CE + visibility BCE (+ optional triplet).

Pure tensor code. Shapes: N images, P parts, K identities, D embedding size, H image rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def stripe_visibility(vis: torch.Tensor, parts: int, feat_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Visible fraction of each stripe (N, P) from per-pixel visibility ``vis`` (N, H, W)
    (or per-row ``vis`` (N, H)).

    With ``feat_hw`` = (h, w), the size of the trunk's map, the pixels are first averaged
    into the h x w feature cells and the cells into P row bins by the same adaptive pooling
    the model uses for its stripes — so the target covers exactly the rows each stripe pools,
    also when h is not a multiple of P (8 rows into 6 stripes: overlapping bins). Without it,
    P equal bands of image rows.
    """
    vis = vis.float()
    if vis.dim() == 2:
        vis = vis.unsqueeze(-1)
    vis = vis.unsqueeze(1)                                                   # (N, 1, H, W)
    if feat_hw is not None:
        vis = F.adaptive_avg_pool2d(vis, tuple(feat_hw))
    return F.adaptive_avg_pool2d(vis, (parts, 1)).flatten(1)


def cell_visibility(vis: torch.Tensor, feat_hw: tuple[int, int]) -> torch.Tensor:
    """Per-pixel visibility (N, H, W) (or per-row (N, H)) -> visible fraction of each feature
    cell (N, h, w)."""
    vis = vis.float()
    if vis.dim() == 2:      # per row: the same for every column, not pooled as a (1, H) image
        vis = vis.unsqueeze(-1)
    return F.adaptive_avg_pool2d(vis.unsqueeze(1), tuple(feat_hw)).squeeze(1)


def region_target(vis: torch.Tensor, rows: torch.Tensor, parts: int, feat_hw: tuple[int, int]) -> torch.Tensor:
    """What each feature cell shows, (N, P+1, h, w), each cell's row summing to 1: the fraction
    of its pixels that are visible and lie in body part i (P equal bands of the *original*
    body's height), and, in the last channel, the fraction hidden (occluder, erasing, padding).

    vis (N, H, W) per-pixel visible fraction; rows (N, H) each image row's position in the
    original body, 0 = top of the head .. 1 = feet (a crop stretched to full size maps its
    rows onto a sub-range; rows outside the body, e.g. padding, are < 0 and must be invisible).
    """
    part = (rows.float().clamp(0, 1) * parts).long().clamp(max=parts - 1)          # (N, H)
    onehot = F.one_hot(part, parts).float().permute(0, 2, 1).unsqueeze(-1)        # (N, P, H, 1)
    v = vis.float().unsqueeze(1)                                                  # (N, 1, H, W)
    target = torch.cat([onehot * v, 1 - v], dim=1)                                # (N, P+1, H, W)
    return F.adaptive_avg_pool2d(target, tuple(feat_hw))


def region_row_error(probs: torch.Tensor, target: torch.Tensor, rows_cell: torch.Tensor) -> torch.Tensor:
    """Mean absolute error, in body heights, of the original-body row the region head places
    each visible cell at.

    probs (N, P+1, h, w) the head's distribution; target (N, P+1, h, w) :func:`region_target`;
    rows_cell (N, h) each cell row's true position in the original body. A cell counts when
    at least half of it is visible; its predicted row is the mean of the part centres
    ``(i + 0.5) / P`` under its distribution over the P parts. Returns a scalar (NaN if no
    cell counts).
    """
    parts = probs.shape[1] - 1
    p = probs[:, :parts]
    centres = (torch.arange(parts, dtype=p.dtype, device=p.device) + 0.5) / parts
    pred = (p * centres.view(1, -1, 1, 1)).sum(1) / p.sum(1).clamp_min(1e-6)      # (N, h, w)
    visible = target[:, parts] <= 0.5
    err = (pred - rows_cell.to(pred).unsqueeze(-1)).abs()
    return err[visible].mean()


def batch_hard_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on part embeddings.

    emb (N, P, D): each part is L2-normalised and the parts concatenated (scaled by
    1/sqrt(P) so distances lie in [0, 2] whatever P), i.e. the uniform-weight distance.
    labels (N,) int64. Returns a scalar.
    """
    parts = emb.shape[1]
    f = F.normalize(emb.float(), dim=-1).flatten(1) / parts ** 0.5
    dist = torch.cdist(f, f).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    hardest_pos = (dist * same).max(1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def invariance_loss(emb: torch.Tensor, teacher: torch.Tensor, stripe_vis: torch.Tensor) -> torch.Tensor:
    """Occlusion invariance: what is visible must look as it does without the occluder.

    emb (M,P,D): part embeddings of occluded (or erased) images; teacher (M,P,D): the same
    network's embeddings of the same images before occluders, no gradient; stripe_vis (M,P):
    visible fraction of each stripe. ``sum v (1 - cos(emb, teacher)) / sum v``: a stripe
    counts by how much of it is still visible, so the occluder's own stripes are left to the
    weights. The ``1 - cos`` matches the retrieval distance, which compares normalised parts.
    """
    v = stripe_vis.float()
    gap = 1 - F.cosine_similarity(emb.float(), teacher.float().detach(), dim=-1)   # (M, P)
    return (v * gap).sum() / v.sum().clamp_min(1e-6)


def awpcn_loss(out: dict, labels: torch.Tensor, vis: torch.Tensor | None = None, *,
               label_smoothing: float = 0.0, fused_weight: float = 1.0, vis_weight: float = 1.0,
               triplet_margin: float | None = None, temperature: float = 1.0,
               invariance: float = 0.0, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Total loss and its named terms (floats) for one batch.

    out: the model's training dict (``logits`` (N,P,K), ``fused`` (N,K), ``scores`` (N,P)
    or None, ``vis_logits`` (N,h,w) or None, ``region_logits`` (N,P+1,h,w) or None,
    ``feat_hw``, ``emb`` (N,P,D)); labels (N,) int64; vis: per-pixel visibility (N,H,W) (or
    per-row (N,H)), or None; rows (N,H): each image row's place in the original body (the
    region head's target, :func:`region_target`), or None.
    The region head's loss is the soft cross-entropy of its per-cell distribution against
    :func:`region_target` (weight ``vis_weight``), and its part CE counts each part by how much
    of it the image shows (a part the crop cut away has nothing to be recognised by).
    With ``invariance`` > 0 and ``out['teacher']`` = (index (M,) into the batch, clean-image
    embeddings (M,P,D)), :func:`invariance_loss` is added with that weight.
    The BCE is per stripe for the stripe heads and per feature cell for the spatial head.
    ``mean_i CE(logits_i) + fused_weight * CE(fused) + vis_weight * BCE [+ invariance * inv]
    [+ triplet]``; the BCE term only when ``vis`` is given, vis_weight > 0 and the model has
    a visibility head (``out['scores']`` or ``out['vis_logits']`` not None).
    """
    logits = out["logits"].float()
    n, p, k = logits.shape
    region = out.get("region_logits")
    target = None
    if region is not None and rows is not None and vis is not None:
        target = region_target(vis, rows, p, region.shape[2:])
    if target is not None:
        ce = F.cross_entropy(logits.reshape(n * p, k), labels.repeat_interleave(p),
                             label_smoothing=label_smoothing, reduction="none")
        shown = (target[:, :p].sum((2, 3)) * p / (target.shape[2] * target.shape[3])).clamp(max=1).flatten()
        part_ce = (ce * shown).sum() / shown.sum().clamp_min(1e-6)
    else:
        part_ce = F.cross_entropy(logits.reshape(n * p, k), labels.repeat_interleave(p),
                                  label_smoothing=label_smoothing)
    total = part_ce
    terms = {"part_ce": part_ce.detach()}
    if fused_weight > 0:
        fused_ce = F.cross_entropy(out["fused"].float(), labels, label_smoothing=label_smoothing)
        total = total + fused_weight * fused_ce
        terms["fused_ce"] = fused_ce.detach()
    vis_bce = None
    if vis_weight > 0 and target is not None:
        region_ce = -(target * F.log_softmax(region.float() / temperature, dim=1)).sum(1).mean()
        total = total + vis_weight * region_ce
        terms["region_ce"] = region_ce.detach()
    elif vis_weight > 0 and vis is not None and out.get("vis_logits") is not None:
        logits = out["vis_logits"].float()
        vis_bce = F.binary_cross_entropy_with_logits(logits / temperature,
                                                     cell_visibility(vis, logits.shape[1:]))
    elif vis_weight > 0 and vis is not None and out.get("scores") is not None:
        target = stripe_visibility(vis, p, out.get("feat_hw"))
        vis_bce = F.binary_cross_entropy_with_logits(out["scores"].float() / temperature, target)
    if vis_bce is not None:
        total = total + vis_weight * vis_bce
        terms["vis_bce"] = vis_bce.detach()
    if invariance > 0 and out.get("teacher") is not None and vis is not None:
        idx, teacher = out["teacher"]
        v = stripe_visibility(vis[idx], p, out.get("feat_hw"))
        inv = invariance_loss(out["emb"][idx], teacher, v) if len(idx) else total.new_zeros(())
        total = total + invariance * inv
        terms["invariance"] = inv.detach()
    if triplet_margin is not None:
        tri = batch_hard_triplet(out["emb"], labels, triplet_margin)
        total = total + tri
        terms["triplet"] = tri.detach()
    return total, terms
