"""Occlusion against windowed contributions of a linear model; meaningful perturbation finds
planted evidence."""

import itertools

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp.methods import MeaningfulPerturbation, Occlusion
from methods_models import LinearImageModel, linear_model


def _windowed_contributions(contributions, window, stride):
    """By hand: every window's drop is the sum of its contributions; a position averages the
    drops of the windows that cover it (the last window sits flush with the edge)."""
    _, _, height, width = contributions.shape
    per_pixel = contributions.sum(1)  # windows span the channels
    starts = []
    for size, w, s in zip((height, width), window, stride):
        axis = list(range(0, size - w + 1, s))
        if axis[-1] != size - w:
            axis.append(size - w)
        starts.append(axis)
    total = torch.zeros_like(per_pixel)
    count = torch.zeros_like(per_pixel)
    for top, left in itertools.product(*starts):
        region = (slice(None), slice(top, top + window[0]), slice(left, left + window[1]))
        drop = per_pixel[region].sum((1, 2))
        total[region] += drop[:, None, None]
        count[region] += 1
    return (total / count).unsqueeze(1).expand_as(contributions)


@pytest.mark.parametrize("window,stride", [((1, 1), (1, 1)), ((2, 3), (2, 3)), ((3, 2), (2, 1)), ((4, 4), (3, 3))])
def test_occlusion_of_a_linear_model_equals_windowed_contributions(window, stride):
    model = LinearImageModel(channels=2, height=6, width=5).eval()
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    baseline = 0.3
    w = model.fc.weight[2].detach().reshape(2, 6, 5)
    expected = _windowed_contributions(w * (x - baseline), window, stride)
    result = Occlusion(model, window=window, stride=stride, baseline=baseline, batch_size=4).explain(x, 2)
    torch.testing.assert_close(result.relevance, expected)
    assert result.relevance.shape == x.shape


def test_occlusion_on_features_with_a_tensor_baseline():
    model = linear_model(n_features=5)
    x = torch.randn(3, 5, dtype=torch.float64)
    baseline = torch.randn(5, dtype=torch.float64)
    result = fastlrp.attribute(model, x, 1, method="occlusion", baseline=baseline)  # window 1 for features
    torch.testing.assert_close(result, model.weight[1].detach() * (x - baseline))
    # windows of 2 with stride 1: interior features average two windows
    pairs = Occlusion(model, window=2, stride=1).explain(x, 1).window_scores
    contributions = model.weight[1].detach() * x
    torch.testing.assert_close(pairs, contributions[:, :-1] + contributions[:, 1:])


def test_occlusion_progress_bar(capsys):
    pytest.importorskip("tqdm")
    model = LinearImageModel(channels=1, height=4, width=4).eval()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    Occlusion(model, window=1, batch_size=2, progress=True)(x, 0)
    assert "occlusion" in capsys.readouterr().err


class _PlantedEvidence(nn.Module):
    """Class 0's logit is the mean of a 4x4 region of the image; class 1 is constant."""

    def __init__(self, size=16, region=(slice(4, 8), slice(8, 12))):
        super().__init__()
        weight = torch.zeros(2, 1, size, size)
        weight[0, 0][region] = 1.0 / 16
        self.fc = nn.Linear(size * size, 2)
        with torch.no_grad():
            self.fc.weight.copy_(weight.flatten(1))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_meaningful_perturbation_finds_the_planted_region():
    torch.manual_seed(0)
    model = _PlantedEvidence().eval()
    x = torch.rand(2, 1, 16, 16) * 0.2
    x[:, :, 4:8, 8:12] = 3.0  # strong evidence for class 0 in the region
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 8:12] = True
    method = MeaningfulPerturbation(model, perturbation="constant", constant=0.0, steps=80, lr=0.1,
                                    mask_scale=2, jitter=0, l1_coeff=0.5, tv_coeff=0.2, score="logit", seed=1)
    result = method.explain(x, 0)
    evidence = result.relevance[:, 0]
    assert result.mask.shape == (2, 1, 16, 16)
    assert result.score_curve.shape == (80, 2)
    assert (result.score_curve[-1] < 0.5 * result.score_curve[0]).all()    # the score was deleted
    assert (evidence[:, inside].mean(1) > 0.8).all()
    assert (evidence[:, ~inside].mean(1) < 0.25).all()
    # the upsampled, TV-smoothed mask blurs the region's edges, but far from it nothing is deleted
    far = torch.ones(16, 16, dtype=torch.bool)
    far[0:12, 4:16] = False  # the region grown by 4 positions
    assert (evidence[:, far] < 0.05).all()


def test_meaningful_perturbation_preservation_blur_and_jitter_run():
    model = _PlantedEvidence().eval()
    x = torch.rand(1, 1, 16, 16)
    x[:, :, 4:8, 8:12] = 3.0
    result = MeaningfulPerturbation(model, mode="preservation", perturbation="blur", blur_sigma=3.0,
                                    steps=20, jitter=2, l1_coeff=0.05, seed=0).explain(x, 0)
    assert result.relevance.shape == x.shape and result.score_curve.shape == (20, 1)
    assert ((result.mask >= 0) & (result.mask <= 1)).all()
    assert torch.equal(result.relevance, result.mask)   # preservation: the kept part is the evidence


def test_meaningful_perturbation_on_features():
    model = linear_model(n_features=6, n_classes=2, bias=False).float()
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 2] = 1.0     # only feature 2 carries the class-0 logit
    x = torch.ones(1, 6) * 4
    result = MeaningfulPerturbation(model, perturbation="constant", steps=100, l1_coeff=0.2, tv_coeff=0.0,
                                    score="logit").explain(x, 0)
    assert result.relevance.argmax().item() == 2 and result.mask.shape == (1, 6)
    with pytest.raises(ValueError, match="perturbation='blur'"):
        MeaningfulPerturbation(model)(x, 0)


class _PlantedSquare(nn.Module):
    """A 1000-class model on [N, 3, 224, 224] whose class-0 logit is 3 * the correlation of the
    image (channel mean) with a checkerboard of 16-pixel checks over the square rows 96-159,
    columns 64-127 (coarse enough that the 4-pixel jitter does not invert it, fine enough that
    the default blur erases it);
    the other 999 logits are 0. With the checkerboard planted in the square, p_0 is about 0.02:
    the low-probability case where a raw-probability objective never moves the mask."""

    SQUARE = (slice(96, 160), slice(64, 128))

    def __init__(self):
        super().__init__()
        checker = _checkerboard()
        pattern = torch.zeros(224, 224)
        pattern[self.SQUARE] = checker[self.SQUARE] / (64 * 64)
        self.register_buffer("pattern", pattern)

    def forward(self, x):
        evidence = 3.0 * (x.mean(1) * self.pattern).sum((1, 2))
        return torch.cat([evidence[:, None], evidence.new_zeros(x.shape[0], 999)], 1)


def _checkerboard():
    rows, cols = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    return ((rows // 16 + cols // 16) % 2) * 2.0 - 1.0


def _planted_square_image(n=1, seed=0):
    """Uniform noise in [0, 1] with the checkerboard planted in the square."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 224, 224, generator=gen)
    x[:, :, 96:160, 64:128] = _checkerboard()[96:160, 64:128]
    return x


def test_meaningful_perturbation_deletes_a_planted_square_at_224():
    model = _PlantedSquare().eval()
    x = _planted_square_image()
    p0 = model(x).softmax(1)[0, 0].item()
    assert p0 < 0.05                                      # a low class probability
    # the defaults (blur, probability, 28 x 28 mask, Adam at 0.1) but fewer steps
    result = MeaningfulPerturbation(model, steps=30, seed=0, progress=False).explain(x, 0)
    evidence = result.relevance[0, 0]
    assert result.mask.shape == (1, 1, 224, 224) and result.score_curve.shape == (30, 1)
    assert result.score_curve[-5:, 0].mean() < 0.25 * p0   # the class was deleted
    square = torch.zeros(224, 224, dtype=torch.bool)
    square[_PlantedSquare.SQUARE] = True
    deleted = evidence > 0.5
    overlap = (deleted & square).sum() / (deleted | square).sum()
    assert overlap > 0.6, f"intersection over union {overlap:.2f}"
    # the low-resolution, smoothed mask softens the square's edges; away from it nothing is deleted
    assert evidence[square].mean() > 0.6 and evidence[~square].mean() < 0.05
    far = torch.ones(224, 224, dtype=torch.bool)
    far[80:176, 48:144] = False                           # the square grown by 16 pixels
    assert evidence[far].max() < 0.05


def test_meaningful_perturbation_warns_about_an_all_zero_map():
    model = _PlantedSquare().eval()
    x = torch.full((2, 3, 224, 224), 0.5)    # flat: blurring changes nothing, nothing can be deleted
    with pytest.warns(UserWarning, match=r"sample\(s\) \[0, 1\] is all zero"):
        result = MeaningfulPerturbation(model, steps=3, jitter=0, progress=False).explain(x, 0)
    assert torch.count_nonzero(result.relevance) == 0


def test_meaningful_perturbation_progress_bar(capsys):
    pytest.importorskip("tqdm")
    model = _PlantedEvidence().eval()
    x = torch.rand(1, 1, 16, 16)
    x[:, :, 4:8, 8:12] = 3.0
    MeaningfulPerturbation(model, steps=3, blur_sigma=2.0, mask_scale=2, progress=True)(x, 0)
    assert "meaningful perturbation" in capsys.readouterr().err
