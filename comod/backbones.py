"""ResNet backbones from torchvision's blocks, cut into named stages.

Stages (``stem``, ``layer1`` .. ``layer4``) are the modulation sites: the
output of a site's stage is multiplied channel-wise by the mechanism's gains.
Options beyond torchvision's constructors, for the architecture study:
- a width multiplier on every stage's channels;
- a small-image stem (3x3 stride-1 conv, no max-pool) for 28-64 px inputs;
- a *plain* variant: the same blocks with the skip connection removed.
ImageNet weights come only from a local file (a torchvision state dict).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from comod.names import BACKBONE_SITES

SITES = BACKBONE_SITES
"""Names of the stages, in forward order; each one is a valid modulation site."""

ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class PlainBasicBlock(BasicBlock):
    """torchvision's BasicBlock without the residual connection."""

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class PlainBottleneck(Bottleneck):
    """torchvision's Bottleneck without the residual connection."""

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)))


class _WidthResNet(ResNet):
    """torchvision's ResNet with scaled stage widths; reuses its ``_make_layer``."""

    def __init__(self, block, layers, width: float, small_stem: bool, in_channels: int):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


class Backbone(nn.Module):
    """A ResNet as an ordered dict of stages ending in global average pooling.

    ``channels[site]`` is the number of channels a site's gains act on and
    ``out_features`` the pooled feature size fed to the decoder.
    """

    def __init__(self, arch: str = "resnet18", residual: bool = True, stem: str = "imagenet",
                 width: float = 1.0, in_channels: int = 3):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(ARCHS)}")
        block, layers = ARCHS[arch]
        if not residual:
            block = PlainBasicBlock if block is BasicBlock else PlainBottleneck
        net = _WidthResNet(block, layers, width, stem == "small", in_channels)
        if not residual:
            for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
                for blk in stage:
                    blk.downsample = None  # unused without the skip; would hold gradient-less weights
        self.arch, self.residual, self.stem_kind, self.width = arch, residual, stem, width
        self.stages = nn.ModuleDict({
            "stem": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            "layer1": net.layer1, "layer2": net.layer2, "layer3": net.layer3, "layer4": net.layer4,
        })
        self.channels = {"stem": net.layer1[0].conv1.in_channels}
        for name in SITES[1:]:
            last = self.stages[name][-1]
            self.channels[name] = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
        self.out_features = self.channels["layer4"]

    def forward_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.stages[name](x)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, residual={self.residual}, stem={self.stem_kind}, width={self.width}"

    def load_imagenet(self, path: str | Path) -> None:
        """Load a torchvision ImageNet state dict (``fc.*`` dropped) from a local file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: no file at {path}; give the path of a torchvision "
                                    f"state dict (e.g. resnet18-f37072fd.pth), or null to start from scratch")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        mapping = {"conv1.": "stages.stem.0.", "bn1.": "stages.stem.1."}
        for name in SITES[1:]:
            mapping[f"{name}."] = f"stages.{name}."
        own = self.state_dict()
        renamed, problems = {}, []
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            prefix = next((p for p in mapping if key.startswith(p)), None)
            target = mapping[prefix] + key[len(prefix):] if prefix else key
            if target not in own:
                if self.residual or "downsample" not in key:
                    problems.append(f"unexpected key {key}")
                continue
            if own[target].shape != value.shape:
                problems.append(f"{key}: file has {tuple(value.shape)}, model has {tuple(own[target].shape)}")
                continue
            renamed[target] = value
        missing = [k for k in own if k not in renamed and not k.endswith("num_batches_tracked")]
        if missing:
            problems.append(f"{len(missing)} model tensors not in the file (e.g. {missing[0]})")
        if problems:
            raise ValueError(f"model.weights: {path} does not match {self.arch} with stem={self.stem_kind}: "
                             + "; ".join(problems[:5]) + "; use weights of the same architecture "
                             "(model.stem: imagenet, model.width: 1.0)")
        self.load_state_dict(renamed, strict=False)
