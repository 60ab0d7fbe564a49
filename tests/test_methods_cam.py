"""CAM, Grad-CAM and Grad-CAM++ against hand computations."""

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp.methods import CAM, GradCAM, GradCAMPlusPlus
from methods_models import GapCNN


class _FlattenHead(nn.Module):
    """conv - relu, then a linear layer on the flattened map: d y_c / d A = W_c reshaped."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(3 * 5 * 4, 2)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_cam_mean_plus_bias_is_the_logit():
    model = GapCNN().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    cam = CAM(model, layer="relu2").explain(x, target)
    logits = model(x).gather(1, target[:, None])[:, 0].detach()
    assert cam.relevance.shape == (3, 8, 8)
    torch.testing.assert_close(cam.relevance.mean((1, 2)) + model.fc.bias[target].detach(), logits)


def test_gradcam_equals_a_hand_computation():
    model = _FlattenHead().double().eval()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    activation = model.features(x).detach()                          # A: [N, 3, 5, 4]
    grad = model.head.weight[1].detach().reshape(3, 5, 4)            # d y_1 / d A
    alpha = grad.mean((1, 2))
    expected = torch.einsum("k,nkij->nij", alpha, activation).clamp(min=0)
    torch.testing.assert_close(GradCAM(model, layer="features.1")(x, 1), expected)
    # Grad-CAM++ by its formula, with g = d y / d A
    g2, g3 = grad ** 2, grad ** 3
    coefficient = g2 / (2 * g2 + (activation * g3).sum((2, 3), keepdim=True))
    weights = (coefficient * grad.clamp(min=0)).sum((2, 3))           # [N, 3]
    expected_pp = torch.einsum("nk,nkij->nij", weights, activation).clamp(min=0)
    torch.testing.assert_close(GradCAMPlusPlus(model, layer="features.1")(x, 1), expected_pp)


def test_gradcam_on_a_gap_model_is_the_clamped_cam_over_the_positions():
    model = GapCNN().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    cam = CAM(model, layer=model.relu2)(x, 1)
    gradcam = fastlrp.attribute(model, x, 1, method="gradcam", layer="relu2")
    torch.testing.assert_close(gradcam, cam.clamp(min=0) / 36)


def test_upsampling_to_the_input_and_default_layer():
    model = GapCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    small = GradCAM(model)(x)                     # default: the last convolution
    assert GradCAM(model).layer == "conv2" and small.shape == (2, 8, 8)
    pooled = nn.Sequential(model.conv1, model.relu1, nn.MaxPool2d(2), model.conv2, model.relu2, model.pool,
                           model.flatten, model.fc).eval()
    assert GradCAM(pooled, layer="4")(x).shape == (2, 4, 4)
    assert GradCAM(pooled, layer="4", upsample=True)(x).shape == (2, 8, 8)


def test_cam_errors_name_the_argument():
    model = GapCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="layer='conv9'"):
        GradCAM(model, layer="conv9")
    with pytest.raises(ValueError, match="layer='fc'.*spatial"):
        GradCAM(model, layer="fc")(x)
    with pytest.raises(ValueError, match="classifier='conv1' must be an nn.Linear"):
        CAM(model, classifier="conv1")
    no_pooling = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    with pytest.raises(ValueError, match="layer='0' has 4 channels.*global average pooling"):
        CAM(no_pooling, layer="0")(x)
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Conv3d module; pass layer="):
        GradCAM(nn.Linear(3, 2))
