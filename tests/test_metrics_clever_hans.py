"""fastlrp.metrics on the demo's Clever-Hans data and its shipped CNN."""

import copy

import pytest
import torch

import fastlrp
from fastlrp import metrics
from fastlrp.apps.demo import load_demo_model, make_dataset
from fastlrp.apps.demo.data import watermark_mask


@pytest.fixture(scope="module")
def setting():
    model = load_demo_model()
    images, labels, marked = make_dataset(48, seed=31)
    explainer = fastlrp.LRP(model, composite="epsilon_plus")
    return model, images, labels, marked, explainer, explainer(images, labels).detach()


def test_lrp_flips_the_prediction_faster_than_random(setting):
    model, images, labels, _, _, relevance = setting
    options = dict(patch_size=4, steps=8, max_fraction=0.5, perturbation="blur")
    lrp = metrics.pixel_flipping(model, images, relevance, labels, **options)
    random = metrics.pixel_flipping(model, images, relevance, labels, order="random", **options)
    least = metrics.pixel_flipping(model, images, relevance, labels, order="least_relevant_first", **options)
    assert lrp.scores.shape == (48, 9)
    # the unperturbed point is the model's own logit
    assert torch.allclose(lrp.scores[:, 0].float(), model(images).detach().gather(1, labels[:, None])[:, 0], atol=1e-4)
    assert lrp.aopc() - random.aopc() > 0.5
    assert random.aopc() - least.aopc() > 0.3
    assert metrics.abpc(least, lrp) > 1.0
    # with two classes a probability below 1/2 means the prediction has flipped
    flipped_lrp = metrics.pixel_flipping(model, images, relevance, labels, score="probability", **options)
    flipped_random = metrics.pixel_flipping(model, images, relevance, labels, score="probability", order="random",
                                            **options)
    assert (flipped_lrp.scores[:, 4] < 0.5).float().mean() > (flipped_random.scores[:, 4] < 0.5).float().mean() + 0.2


def test_relevance_mass_on_the_watermark(setting):
    _, _, labels, marked, _, relevance = setting
    mask = watermark_mask(32)
    mass = metrics.relevance_mass_accuracy(relevance, mask)
    rank = metrics.relevance_rank_accuracy(relevance, mask)
    # 16 of 1024 pixels (1.6% of the image) hold a large share of the evidence where it is present
    assert mass[marked].mean() > 0.2
    assert mass[~marked].mean() < 0.05
    assert rank[marked].mean() > 0.3 > rank[~marked].mean()


def test_comparison_runner_on_the_demo(setting):
    import matplotlib
    matplotlib.use("Agg")
    model, images, labels, marked, explainer, _ = setting
    model_copy = copy.deepcopy(model)

    def gradient(x, target):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(model_copy(x).gather(1, target[:, None]).sum(), x)[0]

    result = metrics.compare(
        model,
        {"lrp": explainer, "gradient": gradient, "uniform": lambda x, t: torch.rand_like(x)},
        [metrics.pixel_flipping_metric(patch_size=4, steps=8, max_fraction=0.5), "relevance_mass"],
        images[marked],
        target=labels[marked], masks=watermark_mask(32), batch_size=16,
    )
    rows = {row["explainer"]: row for row in result.rows()}
    assert rows["lrp"]["aopc_morf"] > rows["uniform"]["aopc_morf"]
    assert rows["lrp"]["relevance_mass"] > 5 * rows["uniform"]["relevance_mass"]
    assert "lrp" in result.table()
    assert len(result.plot().get_lines()) == 3
