"""Neuron groups: NMF of a layer's activations and the groups' share of the relevance."""

import pytest
import torch

import fastlrp
from fastlrp.analysis import channel_attribution, neuron_groups, nmf
from fastlrp.apps.demo import load_demo_model, make_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def explainer():
    return fastlrp.LRP(load_demo_model(), "epsilon_plus", zero_params="bias")


@pytest.fixture(scope="module")
def images():
    return make_dataset(16, seed=7)[0]


@pytest.fixture(scope="module")
def four_groups(explainer, images):
    return neuron_groups(explainer, images, "relu5", groups=4, target=1)


@pytest.fixture(scope="module")
def layer(explainer, images):
    return channel_attribution(explainer, images, "relu5", target=1)


def test_nmf_recovers_an_exactly_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    matrix = torch.rand(200, 3, generator=g, dtype=torch.float64) @ torch.rand(3, 20, generator=g, dtype=torch.float64)
    s, h = nmf(matrix, 3, iterations=500)
    assert (s >= 0).all() and (h >= 0).all()
    torch.testing.assert_close(h.amax(1), torch.ones(3, dtype=torch.float64))
    assert (matrix - s @ h).norm() / matrix.norm() < 1e-2


def test_groups_reconstruct_activations_near_the_svd_bound(four_groups):
    """Stated error: on the demo CNN's relu5 (32 channels, 16 images x 8 x 8 positions), 4 groups
    reconstruct the activations with relative Frobenius error <= 0.13 and within 10% of the rank-4
    truncated SVD, the smallest error any rank-4 factorization can reach (measured: 0.112 vs 0.109)."""
    groups = four_groups
    activation = groups.activation.movedim(1, -1).reshape(-1, 32)
    singular = torch.linalg.svdvals(activation)
    svd_error = (singular[4:].norm() / singular.norm()).item()
    assert groups.reconstruction_error <= 0.13
    assert svd_error <= groups.reconstruction_error <= 1.1 * svd_error
    measured = (groups.activation - groups.reconstruction).norm() / groups.activation.norm()
    assert abs(measured.item() - groups.reconstruction_error) < 1e-4
    assert groups.maps.shape == (16, 4, 8, 8) and groups.channel_factors.shape == (4, 32)
    assert (groups.maps >= 0).all() and (groups.channel_factors >= 0).all()


def test_more_groups_reconstruct_better(layer):
    activation = layer.activation.movedim(1, -1).reshape(-1, 32)
    errors = []
    for k in (1, 4, 16):
        s, h = nmf(activation, k)
        errors.append(((activation - s @ h).norm() / activation.norm()).item())
    assert errors[0] > errors[1] > errors[2]


def test_group_relevance_sums_to_the_layer_relevance(four_groups, layer):
    groups = four_groups
    torch.testing.assert_close(groups.per_group.sum(1), layer.total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(groups.relevance_maps.sum(1), layer.per_position, rtol=1e-4, atol=1e-4)
    # Not a trivial equal split: the groups' shares differ.
    assert (groups.per_group.std(1) > 0.01 * groups.per_group.abs().sum(1)).all()


def test_a_group_holding_all_channels_takes_all_the_relevance(explainer, images):
    groups = neuron_groups(explainer, images, "relu5", groups=1, target=0)
    layer = channel_attribution(explainer, images, "relu5", target=0)
    torch.testing.assert_close(groups.per_group[:, 0], layer.total, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, error, words", [
    (lambda e, x: neuron_groups(e, x, "relu5", groups=0), ValueError, "groups must be"),
    (lambda e, x: neuron_groups(e, x, "relu5", groups=33), ValueError, "groups must be"),
    (lambda e, x: neuron_groups(e, x, "conv5", groups=2), ValueError, "negative activations"),
    (lambda e, x: nmf(-torch.ones(4, 3), 2), ValueError, "non-negative"),
    (lambda e, x: nmf(torch.ones(4, 3), 4), ValueError, "rank"),
    (lambda e, x: nmf(torch.ones(4, 3), 2, init="svd"), ValueError, "init"),
])
def test_bad_arguments_name_the_argument(explainer, images, call, error, words):
    with pytest.raises(error, match=words):
        call(explainer, images[:2])


def test_plot_neuron_groups(four_groups, images):
    import matplotlib.pyplot as plt

    from fastlrp.analysis import plot_neuron_groups

    fig = plot_neuron_groups(four_groups, image=images[0])
    titled = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("group")]
    assert len(titled) == 4 and len([ax for ax in fig.axes if ax.images]) == 9
    plt.close(fig)
