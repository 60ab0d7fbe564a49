"""Tiny models with closed-form explanations, shared by tests/test_methods_*.py."""

import torch
from torch import nn


def linear_model(n_features=6, n_classes=3, bias=True, dtype=torch.float64):
    model = nn.Linear(n_features, n_classes, bias=bias).to(dtype)
    with torch.no_grad():
        model.weight.normal_()
        if bias:
            model.bias.normal_()
    return model.eval()


def relu_mlp(n_features=5, hidden=7, n_classes=3, bias=False, dtype=torch.float64):
    """A piecewise-linear network; without biases it is positively homogeneous."""
    return nn.Sequential(nn.Linear(n_features, hidden, bias=bias), nn.ReLU(),
                         nn.Linear(hidden, n_classes, bias=bias)).to(dtype).eval()


class LinearImageModel(nn.Module):
    """f_c(x) = sum(W_c * x) + b_c over images [N, C, H, W]."""

    def __init__(self, channels=2, height=6, width=5, n_classes=3):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * height * width, n_classes).double()

    def forward(self, x):
        return self.fc(self.flatten(x))


class GapCNN(nn.Module):
    """conv - relu - conv - relu - global average pool - linear: a CAM-ready classifier."""

    def __init__(self, channels=3, width=4, n_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))
