"""DenseNet-BC for CIFAR (Huang et al. 2017) in the CSG reference code's layout.

L=40 with bottlenecks gives 6 layers per dense block; reduction 0.5; the stem is a
3x3 conv to 2k channels; the last transition is BN-ReLU-avgpool without a conv.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth_rate: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int | None):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False) if out_planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(x))
        if self.conv is None:  # the last transition: global average pool
            return F.adaptive_avg_pool2d(out, 1)
        return F.avg_pool2d(self.conv(out), 2)


class DenseNetBC(nn.Module):
    def __init__(self, depth: int = 40, growth_rate: int = 12, reduction: float = 0.5,
                 num_classes: int = 10):
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        super().__init__()
        nblocks = (depth - 4) // 6
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        for d in (1, 2, 3):
            layers = []
            for _ in range(nblocks):
                layers.append(Bottleneck(planes, growth_rate))
                planes += growth_rate
            setattr(self, f"dense{d}", nn.Sequential(*layers))
            out_planes = int(math.floor(planes * reduction)) if d < 3 else None
            setattr(self, f"trans{d}", Transition(planes, out_planes))
            planes = out_planes or planes
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        return self.linear(torch.flatten(out, 1))
