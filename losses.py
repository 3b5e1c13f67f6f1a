"""AWPCN training objective: per-part CE + fused CE + visibility BCE (+ optional triplet).

Pure tensor code. Shapes: N images, P parts, K identities, D embedding size, H image rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def stripe_visibility(vis_rows: torch.Tensor, parts: int) -> torch.Tensor:
    """vis_rows (N, H) visible fraction of each image row -> (N, P) per stripe.

    Stripes are the same equal-height bands of the image that the model pools
    (adaptive pooling of the feature map maps back to these rows).
    """
    return F.adaptive_avg_pool1d(vis_rows.unsqueeze(1).float(), parts).squeeze(1)


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


def awpcn_loss(out: dict, labels: torch.Tensor, vis_rows: torch.Tensor | None = None, *,
               label_smoothing: float = 0.0, fused_weight: float = 1.0, vis_weight: float = 1.0,
               triplet_margin: float | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Total loss and its named terms (floats) for one batch.

    out: the model's training dict (``logits`` (N,P,K), ``fused`` (N,K), ``scores`` (N,P)
    or None, ``emb`` (N,P,D)); labels (N,) int64; vis_rows (N,H) or None.
    ``mean_i CE(logits_i) + fused_weight * CE(fused) + vis_weight * BCE(sigmoid(scores/T), v)
    [+ triplet]``; the BCE term only when the head is the visibility head (``vis_rows``
    given and ``out['scores']`` not None and the caller asks for it with vis_weight > 0).
    """
    logits = out["logits"].float()
    n, p, k = logits.shape
    part_ce = F.cross_entropy(logits.reshape(n * p, k), labels.repeat_interleave(p),
                              label_smoothing=label_smoothing)
    total = part_ce
    terms = {"part_ce": part_ce.detach()}
    if fused_weight > 0:
        fused_ce = F.cross_entropy(out["fused"].float(), labels, label_smoothing=label_smoothing)
        total = total + fused_weight * fused_ce
        terms["fused_ce"] = fused_ce.detach()
    if vis_weight > 0 and vis_rows is not None and out.get("scores") is not None:
        target = stripe_visibility(vis_rows, p)
        vis_bce = F.binary_cross_entropy_with_logits(out["scores"].float() / temperature, target)
        total = total + vis_weight * vis_bce
        terms["vis_bce"] = vis_bce.detach()
    if triplet_margin is not None:
        tri = batch_hard_triplet(out["emb"], labels, triplet_margin)
        total = total + tri
        terms["triplet"] = tri.detach()
    return total, terms
