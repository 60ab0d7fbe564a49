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


class BatchNormCNN(GapCNN):
    """GapCNN with a batch norm and a dropout: a model whose output changes in training mode and
    whose running statistics a forward pass in training mode would update."""

    def __init__(self, channels=3, width=4, n_classes=3):
        super().__init__(channels, width, n_classes)
        self.bn1 = nn.BatchNorm2d(width)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


def model_state(model):
    """Everything a method must leave alone: training flags, hook dicts (identity and content), the
    parameter and buffer dicts (which tensor sits under which name), requires_grad flags, values
    and gradients."""
    modules = {name: (m.training, {key: (id(value), dict(value)) for key, value in vars(m).items()
                                   if key.endswith("hooks") and isinstance(value, dict)},
                      {k: id(v) for k, v in m._parameters.items()}, {k: id(v) for k, v in m._buffers.items()})
               for name, m in model.named_modules()}
    params = {name: (p.requires_grad, p.grad, p.detach().clone()) for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return modules, params, buffers


def assert_same_state(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for name, (flag, grad, value) in before[1].items():
        flag2, grad2, value2 = after[1][name]
        assert flag == flag2 and grad is None and grad2 is None and torch.equal(value, value2), name
    assert before[2].keys() == after[2].keys()
    for name, value in before[2].items():
        assert torch.equal(value, after[2][name]), name
