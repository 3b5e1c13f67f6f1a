"""RandomErasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020 / arXiv 2017).

With probability ``probability`` a rectangle of area fraction in [sl, sh] and aspect ratio
in [r1, 1/r1] is filled with the per-channel mean. It acts on a *normalised* (3,H,W) tensor,
where the dataset mean colour is 0 — so the default fill is 0 in normalised space, i.e. the
mean pixel of the paper. Randomness from torch's global generator.
"""
from __future__ import annotations

import math

import torch


class RandomErasing:
    def __init__(self, probability: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 mean=(0.0, 0.0, 0.0)):
        self.probability, self.sl, self.sh, self.r1 = probability, sl, sh, r1
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)

    def erase_(self, img: torch.Tensor):
        """Erase in place; returns the box (y, x, h, w) or None when nothing was erased."""
        if self.probability <= 0 or float(torch.rand(())) >= self.probability:
            return None
        _, height, width = img.shape
        area = height * width
        for _ in range(100):
            target = area * (self.sl + (self.sh - self.sl) * float(torch.rand(())))
            aspect = self.r1 + (1 / self.r1 - self.r1) * float(torch.rand(()))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                y = int(torch.randint(0, height - h + 1, ()))
                x = int(torch.randint(0, width - w + 1, ()))
                img[:, y:y + h, x:x + w] = self.mean.to(img.dtype)
                return y, x, h, w
        return None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        self.erase_(img)
        return img
