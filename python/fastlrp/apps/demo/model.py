"""The demo's classifier: a small CNN built from standard ``torch.nn`` layers only.

It takes the generator's images as they are ([N, 3, 32, 32], values in [0, 1], no mean/std
normalisation) and returns one logit per class. The layers are chosen to exercise what an
LRP engine has to handle in real networks -- convolutions followed by batch norm (to be
folded), ReLU, max pooling, a residual sum, global average pooling, flatten and a final
linear layer -- while staying small enough to train in about a minute on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import NUM_CLASSES

WEIGHTS_PATH = Path(__file__).with_name("weights.pt")


def conv_bn(in_channels: int, out_channels: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    # The conv has no bias of its own: batch norm right after it supplies one.
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    return conv, nn.BatchNorm2d(out_channels)


class DemoCNN(nn.Module):
    """conv-bn-relu x2, maxpool, conv-bn-relu, residual conv-bn block, maxpool,
    conv-bn-relu, global average pool, linear. About 26k parameters."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        w1, w2 = width, 2 * width
        self.conv1, self.bn1 = conv_bn(3, w1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(w1, w1)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3, self.bn3 = conv_bn(w1, w2)
        self.relu3 = nn.ReLU()
        # Residual block: relu(x + bn(conv(x))).
        self.conv4, self.bn4 = conv_bn(w2, w2)
        self.relu4 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv5, self.bn5 = conv_bn(w2, w2)
        self.relu5 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool1(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.relu4(x + self.bn4(self.conv4(x)))
        x = self.pool2(x)
        x = self.relu5(self.bn5(self.conv5(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def load_demo_model(path: str | Path | None = None) -> DemoCNN:
    """The demo CNN with the weights shipped in the package (or those at ``path``),
    on the CPU and in eval mode."""
    state = torch.load(path or WEIGHTS_PATH, map_location="cpu", weights_only=True)
    model = DemoCNN()
    model.load_state_dict(state)
    return model.eval()
