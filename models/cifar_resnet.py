"""CIFAR ResNets (He et al. 2016, option A shortcuts) in the CSG reference code's layout.

Shortcuts have no parameters: a stride-2 subsample of the input concatenated with zeros
for the new channels. Names (``conv_1_3x3``, ``stage_N``, ``conv_a``/``bn_a``...) follow
the reference implementation so its checkpoints load key for key.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and append zero channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_planes - in_planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return torch.cat([x, x.new_zeros((x.shape[0], self.extra, x.shape[2], x.shape[3]))], 1)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv_a = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(planes)
        self.conv_b = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(planes)
        self.downsample = (ZeroPadShortcut(in_planes, planes, stride)
                           if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(residual + out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, int, int] = (16, 32, 64),
                 num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv_1_3x3 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for s, planes in enumerate(widths, start=1):
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, 2 if (b == 0 and s > 1) else 1))
                in_planes = planes
            setattr(self, f"stage_{s}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))
