"""A plain PCB (Sun et al., ECCV 2018), built the way the classic public baselines build it.

Only for in-run speed comparisons in ``bench/`` (same machine, same moment, same torch):
it is *our own* re-implementation of the structure, not code from any other repository.

Structure:
  torchvision ResNet-50 (``weights=None``), last stride 1 (384x128 -> 24x8 map)
  -> adaptive average pooling to (6, 1) -> Dropout(0.5) on the pooled stripes
  -> six *separate* per-part blocks applied in a Python loop, each
     ``Linear(2048, 256) -> BatchNorm1d(256) -> ReLU -> Dropout(0.5) -> Linear(256, K)``.

Training loss: the sum of the six cross-entropies (:func:`pcb_loss`).

Test features (``eval()`` mode), chosen by ``test_feature``:
  * ``"pooled"`` (default): the six 2048-d pooled stripes, (N, 2048, 6) — what the classic
    baselines extract for PCB (the per-part blocks are not run at test time);
  * ``"bottleneck"``: the six 256-d outputs of the blocks' BN layers, (N, 256, 6).
Either way the ResNet trunk is >99% of the cost, so the choice barely moves the timing.

Importing this module does no work; build with ``PCBReference(num_classes)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class PartBlock(nn.Module):
    """One part's bottleneck + classifier: 2048 -> 256 (BN, ReLU, Dropout) -> K."""

    def __init__(self, in_dim: int, num_classes: int, bottleneck: int = 256, droprate: float = 0.5):
        super().__init__()
        self.reduce = nn.Sequential(nn.Linear(in_dim, bottleneck), nn.BatchNorm1d(bottleneck),
                                    nn.ReLU(inplace=True), nn.Dropout(droprate))
        self.classifier = nn.Linear(bottleneck, num_classes)
        nn.init.kaiming_normal_(self.reduce[0].weight, a=0, mode="fan_out")
        nn.init.zeros_(self.reduce[0].bias)
        nn.init.normal_(self.reduce[1].weight, 1.0, 0.02)
        nn.init.zeros_(self.reduce[1].bias)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.reduce(x))


class PCBReference(nn.Module):
    """PCB with ``parts`` stripes. Training: list of ``parts`` logits (N, K). Eval: features."""

    def __init__(self, num_classes: int, parts: int = 6, bottleneck: int = 256,
                 test_feature: str = "pooled"):
        super().__init__()
        if test_feature not in ("pooled", "bottleneck"):
            raise ValueError(f"test_feature {test_feature!r}: expected 'pooled' or 'bottleneck'")
        self.parts, self.test_feature = parts, test_feature
        net = torchvision.models.resnet50(weights=None)
        # Last stride 1: layer4's first block strides in conv2 and in its shortcut.
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
        net.avgpool = nn.AdaptiveAvgPool2d((parts, 1))
        net.fc = nn.Identity()
        self.model = net
        self.dropout = nn.Dropout(0.5)
        for i in range(parts):
            setattr(self, f"part{i}", PartBlock(2048, num_classes, bottleneck))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """image (N,3,H,W) -> feature map (N, 2048, H/16, W/16)."""
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def head(self, fmap: torch.Tensor):
        """feature map -> training: list of ``parts`` logits (N, K); eval: features."""
        pooled = self.model.avgpool(fmap)                     # (N, 2048, parts, 1)
        if not self.training and self.test_feature == "pooled":
            return pooled.squeeze(3)                          # (N, 2048, parts)
        pooled = self.dropout(pooled) if self.training else pooled
        outs = []
        for i in range(self.parts):                           # the classic per-part Python loop
            part = torch.squeeze(pooled[:, :, i], 2)          # (N, 2048)
            block = getattr(self, f"part{i}")
            outs.append(block(part) if self.training else block.reduce[1](block.reduce[0](part)))
        if self.training:
            return outs                                       # parts x (N, K)
        return torch.stack(outs, dim=2)                       # (N, 256, parts)

    def forward(self, x: torch.Tensor):
        return self.head(self.trunk(x))


def pcb_loss(outs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """PCB's training loss: the sum over parts of each part's cross-entropy."""
    loss = F.cross_entropy(outs[0], labels)
    for logits in outs[1:]:
        loss = loss + F.cross_entropy(logits, labels)
    return loss
