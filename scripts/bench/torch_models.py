"""The benchmark's PyTorch peers: ResNet50, EfficientNet-B0 and VGG19 laid out as Keras
Applications builds them (so that every framework in the benchmark does the same arithmetic):
ResNet50 v1 with biased convolutions and the stride on each block's first 1x1 convolution,
EfficientNet's TF 'SAME' padding (asymmetric for stride 2), VGG19 with its fc1/fc2 top. Each
has a new head of `num_classes` logits, as `keras.applications.X(classes=N)` builds it. Written
for channels-last eager execution; no weights are loaded. `backbone(model)` lists the modules
the frozen-backbone step freezes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Keras efficientnet.py DEFAULT_BLOCKS_ARGS: kernel, repeats, in, out, expand ratio, stride.
B0_BLOCKS = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2),
             (3, 3, 40, 80, 6, 2), (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2),
             (3, 1, 192, 320, 6, 1))


def _bn(c: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=eps, momentum=0.01)  # Keras momentum 0.99


class Bottleneck(nn.Module):
    def __init__(self, cin: int, filters: int, stride: int, shortcut: bool):
        super().__init__()
        eps = 1.001e-5
        self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * filters, 1, stride),
                                      _bn(4 * filters, eps)) if shortcut else None
        self.body = nn.Sequential(
            nn.Conv2d(cin, filters, 1, stride), _bn(filters, eps), nn.ReLU(inplace=True),
            nn.Conv2d(filters, filters, 3, 1, 1), _bn(filters, eps), nn.ReLU(inplace=True),
            nn.Conv2d(filters, 4 * filters, 1), _bn(4 * filters, eps))

    def forward(self, x):
        s = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(self.body(x) + s)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3), _bn(64, 1.001e-5),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for filters, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, filters, stride if i == 0 else 1, i == 0))
                cin = 4 * filters
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.features(self.stem(x))
        return self.head(x.mean((2, 3)))


class SamePad(nn.Module):
    """TF 'SAME' padding of a stride-2 convolution (Keras's correct_pad): one more pixel at the
    bottom/right than at the top/left on even inputs."""

    def __init__(self, kernel: int):
        super().__init__()
        self.pad = (kernel // 2 - 1, kernel // 2, kernel // 2 - 1, kernel // 2)

    def forward(self, x):
        return F.pad(x, self.pad)


class MBConv(nn.Module):
    def __init__(self, k: int, cin: int, cout: int, expand: int, stride: int, drop: float):
        super().__init__()
        eps, mid = 1e-3, cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), _bn(mid, eps), nn.SiLU(inplace=True)]
        pad = [SamePad(k)] if stride == 2 else []
        layers += pad + [nn.Conv2d(mid, mid, k, stride, 0 if stride == 2 else k // 2,
                                   groups=mid, bias=False), _bn(mid, eps), nn.SiLU(inplace=True)]
        self.pre = nn.Sequential(*layers)
        se = max(1, int(cin * 0.25))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, se, 1), nn.SiLU(),
                                nn.Conv2d(se, mid, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), _bn(cout, eps))
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x):
        y = self.pre(x)
        y = self.project(y * self.se(y))
        if not self.residual:
            return y
        if self.training and self.drop > 0:  # stochastic depth, as Keras's Dropout(noise_shape)
            keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device) >= self.drop
            y = y * keep / (1 - self.drop)
        return y + x


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes: int = 10, drop_connect: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)
        self.stem = nn.Sequential(SamePad(3), nn.Conv2d(3, 32, 3, 2, bias=False), _bn(32, 1e-3),
                                  nn.SiLU(inplace=True))
        total = sum(b[1] for b in B0_BLOCKS)
        blocks, b = [], 0
        for k, n, cin, cout, expand, stride in B0_BLOCKS:
            for i in range(n):
                blocks.append(MBConv(k, cin if i == 0 else cout, cout, expand,
                                     stride if i == 0 else 1, drop_connect * b / total))
                b += 1
        self.features = nn.Sequential(*blocks, nn.Conv2d(320, 1280, 1, bias=False),
                                      _bn(1280, 1e-3), nn.SiLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.features(self.stem((x - self.mean) / self.std))
        return self.head(self.dropout(x.mean((2, 3))))


class VGG19(nn.Module):
    def __init__(self, num_classes: int = 10, size: int = 224):
        super().__init__()
        layers, cin = [], 3
        for width, n in ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)):
            for _ in range(n):
                layers += [nn.Conv2d(cin, width, 3, 1, 1), nn.ReLU(inplace=True)]
                cin = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.top = nn.Sequential(nn.Flatten(), nn.Linear(512 * (size // 32) ** 2, 4096),
                                 nn.ReLU(inplace=True), nn.Linear(4096, 4096),
                                 nn.ReLU(inplace=True))
        self.head = nn.Linear(4096, num_classes)

    def forward(self, x):
        return self.head(self.top(self.features(x)))


MODELS = {"resnet50": ResNet50, "efficientnet_b0": EfficientNetB0, "vgg19": VGG19}


def create(name: str, num_classes: int = 10, size: int = 224) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"no PyTorch peer for {name!r}; peers exist for {sorted(MODELS)}")
    return VGG19(num_classes, size) if name == "vgg19" else MODELS[name](num_classes)


def backbone(model: nn.Module) -> list[nn.Module]:
    """Every module except the head (and EfficientNet's dropout before it)."""
    return [m for n, m in model.named_children() if n not in ("head", "dropout")]
