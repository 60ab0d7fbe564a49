"""Unit tests of fastlrp.metrics on hand-made inputs and tiny models."""

import copy

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp import metrics
from fastlrp.metrics import perturbation


class Linear2d(nn.Module):
    """A linear classifier on [N, 1, H, W] images, with weights chosen by the test."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[-1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x):
        return self.fc(x.flatten(1))


# --- AOPC ------------------------------------------------------------------------------

def test_aopc_of_hand_made_curve():
    # AOPC = mean_k (f0 - fk) = (0 + 1 + 3 + 4) / 4
    assert metrics.aopc([4.0, 3.0, 1.0, 0.0]) == pytest.approx(2.0)
    curves = torch.tensor([[4.0, 3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert metrics.aopc(curves, "none").tolist() == pytest.approx([2.0, 0.0])
    assert metrics.aopc(curves) == pytest.approx(1.0)
    assert metrics.abpc(torch.tensor([[4.0, 4.0, 4.0, 4.0]]), curves[:1]) == pytest.approx(2.0)


def test_aopc_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        metrics.aopc([1.0, 0.0], reduction="sum")
    with pytest.raises(ValueError, match="curve"):
        metrics.aopc(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="curve"):
        metrics.aopc("abc")


# --- ordering and perturbations --------------------------------------------------------

def test_patch_ranks_follow_patch_sums():
    relevance = torch.zeros(1, 1, 4, 4)
    relevance[0, 0, 2:, 2:] = 5.0    # bottom-right patch: most relevant
    relevance[0, 0, :2, 2:] = -1.0   # top-right: least relevant
    relevance[0, 0, 0, 0] = 1.0      # top-left: second
    ranks, count = metrics.patch_ranks(relevance, 2, "most_relevant_first")
    assert count == 4
    assert ranks[0, 3, 3] == 0 and ranks[0, 0, 0] == 1 and ranks[0, 0, 3] == 3
    assert ranks[0, 3, 0] == 2
    ranks, _ = metrics.patch_ranks(relevance, 2, "least_relevant_first")
    assert ranks[0, 0, 3] == 0 and ranks[0, 3, 3] == 3
    # pixels of one patch share one rank; a 5x5 image with patch 2 has a 3x3 grid
    ranks, count = metrics.patch_ranks(torch.randn(2, 3, 5, 5), 2, "random")
    assert count == 9 and ranks[:, :2, :2].flatten(1).unique(dim=1).shape[1] == 1
    assert sorted(ranks[0].unique().tolist()) == list(range(9))


def test_pixel_flipping_on_a_linear_model_is_exact():
    # f(x) = sum_i w_i x_i with mean fill (image mean 0 here): flipping pixel i removes w_i x_i.
    torch.manual_seed(0)
    weight = torch.randn(1, 16, dtype=torch.float64)
    model = Linear2d(weight)
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    x = x - x.mean()
    contributions = (weight.view(1, 1, 4, 4) * x)
    curve = metrics.pixel_flipping(model, x, contributions, 0, steps=16)
    expected = contributions.sum() - torch.cat([torch.zeros(1, dtype=torch.float64),
                                                contributions.flatten().sort(descending=True).values.cumsum(0)])
    assert torch.allclose(curve.scores[0], expected)
    assert curve.fractions.tolist() == pytest.approx([k / 16 for k in range(17)])
    # relevance-ordered flipping is the fastest possible drop here, faster than random
    random = metrics.pixel_flipping(model, x, contributions, 0, order="random", steps=16)
    assert curve.aopc() >= random.aopc()


def test_max_fraction_and_steps_control_the_counts():
    model = Linear2d(torch.ones(2, 64))
    x = torch.rand(3, 1, 8, 8)
    curve = metrics.pixel_flipping(model, x, torch.rand(3, 8, 8), None, steps=4, max_fraction=0.5, patch_size=2)
    assert curve.scores.shape == (3, 5)
    assert curve.fractions.tolist() == pytest.approx([0, 0.125, 0.25, 0.375, 0.5])
    assert curve.patch_size == 2 and curve.order == "most_relevant_first"


@pytest.mark.parametrize("name", ["mean", "blur", "noise", "inpaint"])
def test_fills_touch_only_the_mask(name):
    fill = perturbation.PERTURBATIONS[name]()
    x = torch.rand(2, 3, 9, 9)
    mask = torch.zeros(2, 1, 9, 9, dtype=torch.bool)
    mask[:, :, 2:5, 3:7] = True
    out = fill(x, mask, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert not torch.equal(out[mask.expand_as(x)], x[mask.expand_as(x)])


def test_inpaint_reproduces_a_smooth_ramp():
    # a linear ramp is harmonic: diffusion from the border recovers it inside the hole
    ramp = torch.linspace(0, 1, 12).expand(1, 1, 12, 12).clone()
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    mask[..., 4:8, 4:8] = True
    out = metrics.InpaintFill(iterations=400)(ramp, mask)
    assert torch.allclose(out, ramp, atol=1e-3)


def test_blur_keeps_constant_images():
    x = torch.full((1, 2, 7, 7), 0.3)
    assert torch.allclose(metrics.gaussian_blur(x, 1.5), x)


def test_pixel_flipping_errors_name_the_argument():
    model = Linear2d(torch.ones(2, 16))
    x, rel = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    cases = [
        (dict(order="best_first"), ValueError, "order"),
        (dict(patch_size=0), ValueError, "patch_size"),
        (dict(patch_size=1.5), TypeError, "patch_size"),
        (dict(patch_size=9), ValueError, "patch_size"),
        (dict(steps=0), ValueError, "steps"),
        (dict(max_fraction=1.5), ValueError, "max_fraction"),
        (dict(perturbation="zeros"), ValueError, "perturbation"),
        (dict(perturbation=3), TypeError, "perturbation"),
        (dict(score="margin"), ValueError, "score"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ]
    for options, error, name in cases:
        with pytest.raises(error, match=name):
            metrics.pixel_flipping(model, x, rel, 0, **options)
    with pytest.raises(ValueError, match="relevance"):
        metrics.pixel_flipping(model, x, torch.rand(2, 1, 4, 5), 0)
    with pytest.raises(TypeError, match="model"):
        metrics.pixel_flipping(lambda t: t, x, rel, 0)
    with pytest.raises(ValueError, match="target"):
        metrics.pixel_flipping(model, x, rel, 5)
    with pytest.raises(ValueError, match="target"):
        metrics.pixel_flipping(model, x, rel, torch.tensor([0, 1, 1]))


def test_pixel_flipping_restores_training_flags():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    metrics.pixel_flipping(model, torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4), steps=2)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]


# --- localization ------------------------------------------------------------------------

def test_relevance_mass_and_rank_accuracy_by_hand():
    relevance = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]],
                              [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [False, False]])
    # sample 0: positive mass 4, inside 3; top-1 pixel (3.0) inside. sample 1: no positive relevance.
    assert metrics.relevance_mass_accuracy(relevance, mask).tolist() == pytest.approx([0.75, 0.0])
    assert metrics.relevance_rank_accuracy(relevance, mask).tolist() == pytest.approx([1.0, 0.0])
    masks = torch.tensor([[[False, True], [True, False]], [[True, True], [False, False]]])
    assert metrics.relevance_rank_accuracy(relevance[:1].expand(2, -1, -1) * torch.tensor([1.0, -1.0])[:, None, None],
                                           masks).tolist() == pytest.approx([0.5, 0.0])
    # channels are summed first
    assert metrics.relevance_mass_accuracy(relevance[:, None].expand(-1, 3, -1, -1), mask)[0] == pytest.approx(0.75)


def test_localization_errors_name_the_argument():
    with pytest.raises(ValueError, match="masks"):
        metrics.relevance_mass_accuracy(torch.rand(2, 4, 4), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        metrics.relevance_rank_accuracy(torch.rand(2, 4, 4), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="relevance"):
        metrics.relevance_mass_accuracy([[1.0]], torch.ones(1, 1, dtype=torch.bool))


# --- conservation, continuity ------------------------------------------------------------

def test_conservation_of_lrp_without_biases():
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3, bias=False)).double().eval()
    x = torch.rand(4, 1, 3, 4, dtype=torch.float64)
    explainer = fastlrp.LRP(model, composite="epsilon_plus")
    report = metrics.conservation(model, x, relevance=explainer(x, None))
    assert isinstance(report, metrics.Conservation)
    assert report.relative_error.max() < 1e-3  # only the stabilizers' 1e-6 absorb relevance
    assert torch.allclose(report.output, model(x).max(1).values.detach())
    # input x gradient on a linear model is complete w.r.t. a zero baseline, not otherwise
    linear = Linear2d(torch.randn(3, 12, dtype=torch.float64))
    relevance = linear.fc.weight[2].view(1, 1, 3, 4) * x
    assert metrics.conservation(linear, x, relevance=relevance, target=2).absolute_error.max() < 1e-12
    shifted = metrics.conservation(linear, x, relevance=relevance, target=2,
                                   baseline=torch.ones(1, 3, 4, dtype=torch.float64))
    assert shifted.absolute_error.min() > 1e-6


def test_continuity_of_a_linear_explanation():
    # R(x) = w * x, so ||R(x) - R(x + d)||_1 / ||d||_2 = ||w * d||_1 / ||d||_2 <= ||w||_2 sqrt(n)
    weight = torch.randn(16, dtype=torch.float64)
    explainer = lambda x, t: weight.view(1, 1, 4, 4) * x  # noqa: E731
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    raw = metrics.continuity(explainer, x, torch.zeros(3, dtype=torch.long), normalize=False, num_samples=5)
    assert raw.shape == (3,)
    assert (raw <= weight.norm() * 4 + 1e-9).all() and (raw > 0).all()
    # a steep explainer scores far worse on the scale-free (normalized) measure
    steep = lambda x, t: torch.sin(40 * x)  # noqa: E731
    assert metrics.continuity(steep, x, 0).min() > 5 * metrics.continuity(explainer, x, 0).max()
    with pytest.raises(ValueError, match="noise_std"):
        metrics.continuity(explainer, x, 0, noise_std=0)
    with pytest.raises(TypeError, match="explainer"):
        metrics.continuity(None, x, 0)


# --- model randomization -----------------------------------------------------------------

def test_model_randomization_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    result = metrics.model_randomization(model, lambda m: fastlrp.LRP(m), x, mode="cascading")
    assert [step.layers for step in result.steps] == [["3"], ["3", "0"]]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    rows = result.rows()
    assert [r["layer"] for r in rows] == ["3", "0"] and all(-1 <= r["spearman"] <= 1 for r in rows)
    # with every layer randomized the heatmaps lose their ranking of the original pixels
    assert abs(rows[-1]["spearman"]) < 0.9
    independent = metrics.model_randomization(model, lambda m: fastlrp.LRP(m), x, mode="independent", layers=["0"])
    assert [step.layers for step in independent.steps] == [["0"]]


def test_model_randomization_errors_name_the_argument():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(ValueError, match="mode"):
        metrics.model_randomization(model, lambda m: fastlrp.LRP(m), x, mode="all")
    with pytest.raises(ValueError, match="layers"):
        metrics.model_randomization(model, lambda m: fastlrp.LRP(m), x, layers=["fc9"])
    with pytest.raises(TypeError, match="explainer_factory"):
        metrics.model_randomization(model, None, x)


def test_reinitialize_is_seeded_and_keeps_the_global_rng():
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    state = torch.random.get_rng_state()
    metrics.reinitialize(a, 7)
    metrics.reinitialize(b, 7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.weight, b.weight)


# --- comparison runner --------------------------------------------------------------------

def test_compare_table_rows_and_plot():
    import matplotlib
    matplotlib.use("Agg")
    weight = torch.randn(2, 36, dtype=torch.float64)
    model = Linear2d(weight)
    x = torch.randn(10, 1, 6, 6, dtype=torch.float64)
    explainers = {
        "w*x": lambda x, t: weight[t].view(-1, 1, 6, 6) * x,
        "random": lambda x, t: torch.randn_like(x),
    }
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:2, :2] = True
    result = metrics.compare(model, explainers, ["aopc_morf", "aopc_lerf", "relevance_mass", "conservation_error"],
                             x, target=torch.zeros(10, dtype=torch.long), masks=mask, batch_size=4)
    rows = {row["explainer"]: row for row in result.rows()}
    assert set(rows) == {"w*x", "random"}
    assert rows["w*x"]["conservation_error"] < 1e-9 < rows["random"]["conservation_error"]
    assert rows["w*x"]["aopc_morf"] > rows["random"]["aopc_morf"] > rows["w*x"]["aopc_lerf"]
    assert result.values["w*x"]["aopc_morf"].shape == (10,)
    assert result.curves["random"]["aopc_morf"].scores.shape[0] == 10  # batches of 4, 4, 2 joined
    table = result.table()
    assert "aopc_morf (+)" in table and "w*x" in table and len(table.splitlines()) == 5
    ax = result.plot("aopc_lerf")
    assert len(ax.get_lines()) == 2


def test_compare_errors_name_the_argument():
    model = Linear2d(torch.ones(2, 4))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(TypeError, match="explainers"):
        metrics.compare(model, [lambda x, t: x], ["aopc_morf"], x)
    with pytest.raises(ValueError, match="metrics"):
        metrics.compare(model, {"a": lambda x, t: x}, ["accuracy"], x)
    with pytest.raises(ValueError, match="masks"):
        metrics.compare(model, {"a": lambda x, t: x}, ["relevance_mass"], x)
    with pytest.raises(ValueError, match=r"explainers\['a'\]"):
        metrics.compare(model, {"a": lambda x, t: x[:, 0]}, ["aopc_morf"], x)


def test_selectivity_is_the_most_relevant_first_curve():
    weight = torch.randn(2, 16, dtype=torch.float64)
    model = Linear2d(weight)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    explainer = lambda x, t: weight[t].view(-1, 1, 4, 4) * x  # noqa: E731
    curve = metrics.selectivity(model, explainer, x, steps=4)
    target = model(x).argmax(1)
    direct = metrics.pixel_flipping(model, x, explainer(x, target), target, steps=4)
    assert torch.equal(curve.scores, direct.scores) and curve.order == "most_relevant_first"
    with pytest.raises(TypeError, match="explainer"):
        metrics.selectivity(model, "lrp", x)
    with pytest.raises(TypeError, match="target"):
        metrics.continuity(explainer, x, None)


@pytest.mark.gpu
def test_pixel_flipping_runs_on_the_models_device():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).double()
    x, relevance = torch.rand(5, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    on_cpu = metrics.pixel_flipping(model, x, relevance, 1, patch_size=2, steps=4, perturbation="inpaint")
    on_gpu = metrics.pixel_flipping(copy.deepcopy(model).cuda(), x, relevance, 1, patch_size=2, steps=4,
                                    perturbation="inpaint")
    assert on_gpu.scores.device.type == "cpu"
    assert torch.allclose(on_cpu.scores, on_gpu.scores, atol=1e-9)


def test_metrics_do_not_touch_batch_norm_statistics_of_a_training_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(2, 2)).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(4, 1, 6, 6)
    metrics.pixel_flipping(model, x, torch.rand(4, 6, 6), steps=3)
    metrics.conservation(model, x, relevance=torch.rand(4, 1, 6, 6))
    metrics.compare(model, {"r": lambda x, t: torch.rand_like(x)}, ["aopc_morf"], x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training
