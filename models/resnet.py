"""ResNets with the CIFAR stem (3x3 stride-1 first conv, no max-pool) or the ImageNet stem (7x7 stride-2 conv and
a 3x3 stride-2 max-pool, for larger images such as STL-10's 96x96).

The blocks are torchvision's BasicBlock and Bottleneck (v1.5: the stride on the 3x3 conv), written out here because
importing torchvision adds 1.2 s to ``import torch`` (4.1 s against 2.9 s on a 2-core CPU), paid by every torchrun
worker, evaluation and export. Module names match torchvision's ResNet (conv1, bn1, layer1..layer4), so with width
64 the parameters are torchvision's minus ``fc`` (and, with the CIFAR stem, with a 3x3 instead of a 7x7 first conv):
tests/test_models.py loads torchvision's weights into these and compares the outputs.
"""
from __future__ import annotations

from typing import Optional, Type, Union

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and the identity (or ``downsample``): [B, inplanes, H, W] -> [B, planes, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample, self.stride = downsample, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (with the stride), 1x1 up to 4x: [B, inplanes, H, W] -> [B, 4 planes, H/stride, W/stride]."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, planes * self.expansion), nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.stride = downsample, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


Block = Type[Union[BasicBlock, Bottleneck]]
LAYOUTS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3))}


class CifarResNet(nn.Module):
    """Backbone only: images [B, 3, H, W] -> pooled features [B, feature_dim]."""

    def __init__(self, block: Block, layers: tuple[int, ...], width: int = 64, stem: str = "cifar") -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = width
        stages = [self._make_layer(block, width * 2 ** i, n, stride=1 if i == 0 else 2) for i, n in enumerate(layers)]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = width * 8 * block.expansion
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def cifar_resnet(arch: str, width: int = 64, stem: str = "cifar") -> CifarResNet:
    """ResNet-18/34/50 with the CIFAR (or ImageNet) stem and base width ``width`` (64 = standard)."""
    block, layers = LAYOUTS[arch]
    return CifarResNet(block, layers, width, stem)
