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
