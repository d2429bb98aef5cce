"""The benchmark's PyTorch peers: ResNet50, EfficientNet-B0, InceptionV3 and VGG19 laid out as
Keras Applications builds them (so that every framework in the benchmark does the same
arithmetic): ResNet50 v1 with biased convolutions and the stride on each block's first 1x1
convolution, EfficientNet's TF 'SAME' padding (asymmetric for stride 2), InceptionV3's
unbiased convolutions with BatchNorm without a learned scale (PyTorch's scale is kept at 1 and
frozen) and its 'SAME' average pools that count only the pixels inside the image, VGG19 with
its fc1/fc2 top. Each has a new head of `num_classes` logits, as
`keras.applications.X(classes=N)` builds it; the trainable parameters are as many as Keras's
(tests/test_benchmark.py). Written for channels-last eager execution; no weights are loaded.
`backbone(model)` lists the modules the frozen-backbone step freezes.
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


def conv_bn(cin: int, cout: int, kh: int, kw: int, stride: int = 1,
            same: bool = True) -> nn.Sequential:
    """Keras inception_v3's conv2d_bn: an unbiased convolution ('same' or 'valid' padding),
    BatchNorm with no learned scale (eps 1e-3), ReLU."""
    bn = _bn(cout, 1e-3)
    bn.weight.requires_grad_(False)  # Keras: BatchNormalization(scale=False)
    pad = (kh // 2, kw // 2) if same else 0
    return nn.Sequential(nn.Conv2d(cin, cout, (kh, kw), stride, pad, bias=False), bn,
                         nn.ReLU(inplace=True))


def _avg_pool_same() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)  # TF 'SAME': only the image's pixels


class Concat(nn.Module):
    """The branches' outputs side by side along the channels (Keras's `concatenate`)."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


def _inception_a(cin: int, pool: int) -> Concat:  # mixed0-2, 35x35
    return Concat(conv_bn(cin, 64, 1, 1),
                  nn.Sequential(conv_bn(cin, 48, 1, 1), conv_bn(48, 64, 5, 5)),
                  nn.Sequential(conv_bn(cin, 64, 1, 1), conv_bn(64, 96, 3, 3),
                                conv_bn(96, 96, 3, 3)),
                  nn.Sequential(_avg_pool_same(), conv_bn(cin, pool, 1, 1)))


def _inception_c(c7: int) -> Concat:  # mixed4-7, 17x17x768
    return Concat(conv_bn(768, 192, 1, 1),
                  nn.Sequential(conv_bn(768, c7, 1, 1), conv_bn(c7, c7, 1, 7),
                                conv_bn(c7, 192, 7, 1)),
                  nn.Sequential(conv_bn(768, c7, 1, 1), conv_bn(c7, c7, 7, 1),
                                conv_bn(c7, c7, 1, 7), conv_bn(c7, c7, 7, 1),
                                conv_bn(c7, 192, 1, 7)),
                  nn.Sequential(_avg_pool_same(), conv_bn(768, 192, 1, 1)))


class _Split(nn.Module):
    """conv_bn then two convolutions (1x3 and 3x1) of its output, side by side (mixed9-10)."""

    def __init__(self, *first: nn.Module):
        super().__init__()
        self.first = nn.Sequential(*first)
        self.pair = Concat(conv_bn(384, 384, 1, 3), conv_bn(384, 384, 3, 1))

    def forward(self, x):
        return self.pair(self.first(x))


def _inception_e(cin: int) -> Concat:  # mixed9-10, 8x8x2048
    return Concat(conv_bn(cin, 320, 1, 1),
                  _Split(conv_bn(cin, 384, 1, 1)),
                  _Split(conv_bn(cin, 448, 1, 1), conv_bn(448, 384, 3, 3)),
                  nn.Sequential(_avg_pool_same(), conv_bn(cin, 192, 1, 1)))


class InceptionV3(nn.Module):
    """keras.applications.InceptionV3 (whose [-1, 1] input scaling is preprocessing outside
    the model, as in tljax's and Keras's)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            conv_bn(3, 32, 3, 3, 2, same=False), conv_bn(32, 32, 3, 3, same=False),
            conv_bn(32, 64, 3, 3), nn.MaxPool2d(3, 2),
            conv_bn(64, 80, 1, 1, same=False), conv_bn(80, 192, 3, 3, same=False),
            nn.MaxPool2d(3, 2))
        self.features = nn.Sequential(
            _inception_a(192, 32), _inception_a(256, 64), _inception_a(288, 64),
            Concat(conv_bn(288, 384, 3, 3, 2, same=False),  # mixed3, to 17x17
                   nn.Sequential(conv_bn(288, 64, 1, 1), conv_bn(64, 96, 3, 3),
                                 conv_bn(96, 96, 3, 3, 2, same=False)),
                   nn.MaxPool2d(3, 2)),
            _inception_c(128), _inception_c(160), _inception_c(160), _inception_c(192),
            Concat(nn.Sequential(conv_bn(768, 192, 1, 1),  # mixed8, to 8x8
                                 conv_bn(192, 320, 3, 3, 2, same=False)),
                   nn.Sequential(conv_bn(768, 192, 1, 1), conv_bn(192, 192, 1, 7),
                                 conv_bn(192, 192, 7, 1), conv_bn(192, 192, 3, 3, 2, same=False)),
                   nn.MaxPool2d(3, 2)),
            _inception_e(1280), _inception_e(2048))
        self.head = nn.Linear(2048, num_classes)

    def forward(self, x):
        return self.head(self.features(self.stem(x)).mean((2, 3)))


MODELS = {"resnet50": ResNet50, "efficientnet_b0": EfficientNetB0, "inception_v3": InceptionV3,
          "vgg19": VGG19}
# The smallest input each accepts, as Keras Applications' (InceptionV3's valid convolutions and
# pools leave nothing below 75x75).
MIN_SIZE = {"resnet50": 32, "efficientnet_b0": 32, "inception_v3": 75, "vgg19": 32}


def create(name: str, num_classes: int = 10, size: int = 224) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"no PyTorch peer for {name!r}; peers exist for {sorted(MODELS)}")
    return VGG19(num_classes, size) if name == "vgg19" else MODELS[name](num_classes)


def backbone(model: nn.Module) -> list[nn.Module]:
    """Every module except the head (and EfficientNet's dropout before it)."""
    return [m for n, m in model.named_children() if n not in ("head", "dropout")]
