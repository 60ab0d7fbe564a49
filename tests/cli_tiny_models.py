"""Tiny model factories for the command-line tests, named as ``cli_tiny_models:<function>``.

Each builds its weights from a fixed seed without touching the global RNG, so separate
processes (torchrun ranks, a resumed run) get the same model.
"""

import torch
from torch import nn


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_cnn(num_classes=3):
    """RGB images of any size -> num_classes logits."""
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, num_classes)))


def tiny_gray_cnn(num_classes=2):
    """Grey (1-channel) images -> num_classes logits."""
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)))


def tiny_clip_cnn(num_classes=3):
    """RGB clips [N, 3, T, H, W] -> num_classes logits (a miniature r3d)."""
    return _seeded(lambda: nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, num_classes)))


def tiny_volume_cnn(num_classes=2):
    """One-channel volumes [N, 1, X, Y, Z] -> num_classes logits."""
    return _seeded(lambda: nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, num_classes)))


def not_a_model():
    return "not a module"


def tiny_r3d(num_classes=3):
    """RGB clips [N, 3, T, H, W] -> num_classes logits, built as r3d_18 is in miniature: a strided
    Conv3d stem with batch norm, a residual-free second block, global pooling and a linear head."""
    def build():
        model = nn.Sequential(
            nn.Conv3d(3, 4, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=False), nn.BatchNorm3d(4),
            nn.ReLU(), nn.Conv3d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, num_classes))
        with torch.no_grad():  # batch-norm statistics that are not the identity
            model[1].running_mean.uniform_(-0.1, 0.1)
            model[1].running_var.uniform_(0.5, 1.5)
        return model
    return _seeded(build)


def tiny_groupnorm_cnn(num_classes=3):
    """RGB images -> num_classes logits, with a GroupNorm (a layer without an LRP rule)."""
    return _seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, num_classes)))


def tiny_groupnorm_volume_cnn(num_classes=2):
    """One-channel volumes -> num_classes logits, with a GroupNorm (no LRP rule)."""
    return _seeded(lambda: nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        nn.Linear(4, num_classes)))


class _FeaturesNet(nn.Module):
    """torchvision's VGG layout in miniature: ``features`` (convolutions), pooling, ``classifier``."""

    def __init__(self, features, classifier):
        super().__init__()
        self.features, self.pool, self.classifier = features, nn.AdaptiveAvgPool2d(1), classifier

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def gn_net(num_classes=3):
    """RGB images -> num_classes logits; GroupNorms (no LRP rule) in ``features``, whose last
    convolution is ``features.8`` (the layer docs/cli.md gives --method gradcam)."""
    return _seeded(lambda: _FeaturesNet(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()), nn.Linear(8, num_classes)))
