"""Inference-only speed-ups for a trained AWPCN (or any torchvision-ResNet-based) model.

    from inference import fuse_for_inference
    fast = fuse_for_inference(model)          # eval-mode copy; `model` is left untouched
    emb, w = fast(img.contiguous(memory_format=torch.channels_last))

:func:`fuse_for_inference` folds every BatchNorm2d of the trunk into the convolution in
front of it (``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``,
using the BN's running statistics, i.e. exactly what eval mode computes) and replaces the BN
by ``nn.Identity``. The outputs are the eval-mode outputs up to float rounding (~1e-6
relative); each BN's separate pass over its activation map is gone. It also converts the
copy to channels_last, the faster memory format for convolutions on CPU (oneDNN) and on
recent GPUs. The copy must only be used for inference: the folded model has no BN to train
and no running statistics to update.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fuse_for_inference", "fuse_conv_bn_pairs"]


def _pairs_in(module: nn.Module):
    """(conv name, bn name) pairs of direct children where a BatchNorm2d follows a Conv2d.

    For an ``nn.Sequential``: consecutive children. For any other module (a torchvision
    Bottleneck / BasicBlock): the ``convK`` / ``bnK`` naming convention, which those blocks
    apply in exactly that order (conv -> its bn) in their forward.
    """
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        names = list(children)
        for a, b in zip(names, names[1:]):
            if isinstance(children[a], nn.Conv2d) and isinstance(children[b], nn.BatchNorm2d):
                yield a, b
        return
    for name, child in children.items():
        if isinstance(child, nn.Conv2d) and name.startswith("conv"):
            bn = "bn" + name[len("conv"):]
            if isinstance(children.get(bn), nn.BatchNorm2d):
                yield name, bn


def fuse_conv_bn_pairs(module: nn.Module) -> int:
    """Fold, in place and recursively, each BatchNorm2d into its preceding Conv2d.

    ``module`` must be in eval mode. Returns the number of pairs folded.
    """
    if any(m.training for m in module.modules()):
        raise ValueError("fuse_conv_bn_pairs needs an eval-mode module (BN running statistics are folded)")
    return _fuse(module)


def _fuse(module: nn.Module) -> int:
    count = 0
    for conv_name, bn_name in list(_pairs_in(module)):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # a BN using batch statistics at eval cannot be folded
        setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(module, bn_name, nn.Identity().eval())
        count += 1
    for child in module.children():
        count += _fuse(child)
    return count


@torch.no_grad()
def fuse_for_inference(model: nn.Module, *, channels_last: bool = True, inplace: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with conv+BN folded (and channels_last weights).

    Works on an :class:`model.AWPCN` (its ``trunk``) and on any module built from
    torchvision ResNet pieces. The per-part head (a BatchNorm1d after a batched matmul)
    is left as is: it is a negligible share of the time. ``inplace=True`` modifies and
    returns ``model`` itself (saves one copy of the weights; ``model`` can no longer train).
    """
    fused = model if inplace else copy.deepcopy(model)
    fused.eval()
    fuse_conv_bn_pairs(fused)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused
