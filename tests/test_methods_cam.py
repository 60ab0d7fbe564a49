"""CAM, Grad-CAM and Grad-CAM++ against hand computations."""

import copy

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
    # Grad-CAM++ by eq. 19, with g = d y / d A: the activation alone is summed over positions
    g2, g3 = grad ** 2, grad ** 3
    coefficient = g2 / (2 * g2 + g3 * activation.sum((2, 3), keepdim=True))
    weights = (coefficient * grad.clamp(min=0)).sum((2, 3))           # [N, 3]
    expected_pp = torch.einsum("nk,nkij->nij", weights, activation).clamp(min=0)
    torch.testing.assert_close(GradCAMPlusPlus(model, layer="features.1")(x, 1), expected_pp)


class _Block(nn.Module):
    """A residual block: relu(x + conv(relu(conv(x)))), with a strided 1x1 shortcut when needed."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        return self.relu(self.shortcut(x) + self.conv2(self.relu(self.conv1(x))))


class _SmallResNet(nn.Module):
    """stem - layer1..layer4 (residual blocks, strides 1, 2, 2, 1) - global average pool - fc."""

    def __init__(self, n_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.layer1, self.layer2 = _Block(6, 6, 1), _Block(6, 8, 2)
        self.layer3, self.layer4 = _Block(8, 8, 2), _Block(8, 10, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(10, n_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


def _gradcam_pp_by_hand(model, x, target):
    """Grad-CAM++ at layer3, written out: eq. 19 of Chattopadhay et al. (2018) with
    S_k = sum over positions of A_k, then w_k = sum_ij a_kij ReLU(g_kij), M = ReLU(sum_k w_k A_k)."""
    with torch.enable_grad():
        activation = model.layer3(model.layer2(model.layer1(model.stem(x)))).detach().requires_grad_(True)
        logits = model.fc(model.pool(model.layer4(activation)).flatten(1))
        (g,) = torch.autograd.grad(logits[:, target].sum(), activation)
    activation = activation.detach()
    n, k, h, w = activation.shape
    weights = torch.zeros(n, k, dtype=x.dtype)
    for i in range(n):
        for c in range(k):
            total = activation[i, c].sum()
            for a in range(h):
                for b in range(w):
                    gab = g[i, c, a, b]
                    if gab == 0:
                        continue
                    alpha = gab ** 2 / (2 * gab ** 2 + gab ** 3 * total)
                    weights[i, c] += alpha * max(gab, 0)
    return torch.einsum("nk,nkij->nij", weights, activation).clamp(min=0), activation, g


def test_gradcam_plus_plus_at_an_inner_layer_is_equation_19():
    torch.manual_seed(3)
    model = _SmallResNet().double().eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)  # gradients of order one at layer3
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected, activation, g = _gradcam_pp_by_hand(model, x, 2)
    result = GradCAMPlusPlus(model, layer="layer3")(x, 2)
    assert result.shape == (2, 4, 4)
    torch.testing.assert_close(result, expected)
    # off the last layer the gradient varies over positions: the old denominator
    # sum_ab A_ab g_ab^3 is a different map, and the test tells them apart
    assert not torch.allclose(g, g.mean((2, 3), keepdim=True))
    g2, g3 = g ** 2, g ** 3
    old = torch.where(g != 0, g2 / (2 * g2 + (activation * g3).sum((2, 3), keepdim=True)), 0)
    old_map = torch.einsum("nk,nkij->nij", (old * g.clamp(min=0)).sum((2, 3)), activation).clamp(min=0)
    assert not torch.allclose(old_map, expected, rtol=1e-2, atol=1e-6)


def test_gradcam_plus_plus_agrees_with_pytorch_grad_cam():
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAMPlusPlus as PeerGradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(5)
    model = _SmallResNet().eval()
    with torch.no_grad():
        # pytorch-grad-cam adds 1e-6 to the denominator; with gradients of order one and more that
        # changes nothing visible (with the unscaled head, where g^2 is often ~1e-6, it moves the
        # map by ~1e-3), and g * S_k >> 2 is where eq. 19 and the old denominator differ most
        model.fc.weight.mul_(500)
    x = torch.randn(3, 3, 16, 16)
    targets = [1, 3, 0]
    ours = GradCAMPlusPlus(model, layer="layer3", upsample=True)(x, torch.tensor(targets))
    peer_model = copy.deepcopy(model)  # the peer puts hooks on (and calls .eval() on) the model it gets
    with PeerGradCAMPlusPlus(model=peer_model, target_layers=[peer_model.layer3]) as peer:
        theirs = torch.from_numpy(peer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))
    # the peer scales each map to [0, 1] (min-max) after upsampling to the input's size
    flat = ours.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    scaled = ((flat - low) / (high - low + 1e-7)).reshape_as(ours)
    assert theirs.shape == scaled.shape
    torch.testing.assert_close(scaled, theirs.to(scaled.dtype), atol=1e-4, rtol=0)


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
