"""Channel attribution and semantic dictionaries on the shipped demo CNN."""

import pytest
import torch

import fastlrp
from fastlrp.analysis import channel_attribution, channel_prototypes, semantic_dictionary
from fastlrp._common.layers import capturing_outputs
from fastlrp.apps.demo import load_demo_model, make_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def images():
    return make_dataset(8, seed=7)[0]


@pytest.fixture(scope="module")
def explainer(model):
    # zero_params="bias": biases absorb no relevance, so the layer's relevance equals the logit.
    return fastlrp.LRP(model, "epsilon_plus", zero_params="bias")


def test_channel_and_position_attributions_sum_to_the_layer_relevance(explainer, images):
    result = channel_attribution(explainer, images, "relu5", target=1)
    reference = explainer.explain(images, 1, layers=["relu5"])
    torch.testing.assert_close(result.relevance, reference.layers["relu5"])
    layer_total = reference.layers["relu5"].flatten(1).sum(1)
    torch.testing.assert_close(result.per_channel.sum(1), layer_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.per_position.flatten(1).sum(1), layer_total, rtol=1e-5, atol=1e-5)
    assert result.per_channel.shape == (8, 32) and result.per_position.shape == (8, 8, 8)
    # With bias-free rules relevance is conserved from the logit down to this layer.
    torch.testing.assert_close(layer_total, result.output[:, 1], rtol=1e-4, atol=1e-4)


def test_lrp_activation_is_the_layers_output(model, explainer, images):
    result = channel_attribution(explainer, images, "relu3", target=0)
    with torch.no_grad(), capturing_outputs(model, ["relu3"]) as acts:
        model(images)
    torch.testing.assert_close(result.activation, acts["relu3"], rtol=1e-4, atol=1e-5)


def test_gradient_x_activation_is_exact_where_the_rest_is_linear(model, images):
    """After relu5 the network is average pooling and a linear layer, so gradient x activation of
    relu5 sums to the logit minus the bias, and zeroing a channel lowers the logit by exactly that
    channel's attribution."""
    result = channel_attribution(model, images, "relu5", target=1, method="gradient_x_activation")
    torch.testing.assert_close(result.total, result.output[:, 1] - model.fc.bias[1].detach(), rtol=1e-5, atol=1e-5)
    values, channels = result.top_channels(3, sample=0)
    assert values[0] >= values[1] >= values[2] and values[0] == result.per_channel[0].max()
    top = int(channels[0])

    def ablate(module, inputs, output):
        output = output.clone()
        output[:, top] = 0
        return output

    handle = model.relu5.register_forward_hook(ablate)
    try:
        with torch.no_grad():
            ablated = model(images[:1])[0, 1]
    finally:
        handle.remove()
    torch.testing.assert_close(result.output[0, 1] - ablated, values[0], rtol=1e-4, atol=1e-5)


def test_top_channels_per_sample_and_by_magnitude(explainer, images):
    result = channel_attribution(explainer, images, "relu5", target=1)
    values, indices = result.top_channels(4)
    assert values.shape == indices.shape == (8, 4)
    torch.testing.assert_close(values, result.per_channel.gather(1, indices))
    assert (values[:, :-1] >= values[:, 1:]).all()
    magnitudes, _ = result.top_channels(4, absolute=True)
    assert (magnitudes.abs()[:, :-1] >= magnitudes.abs()[:, 1:]).all()
    with pytest.raises(ValueError, match="k must be"):
        result.top_channels(33)
    with pytest.raises(ValueError, match="sample"):
        result.top_channels(2, sample=8)


def test_semantic_dictionary_ranks_channels_at_each_position(explainer, images):
    result = channel_attribution(explainer, images, "relu3", target=1)
    dictionary = semantic_dictionary(result, k=3)
    assert dictionary.indices.shape == (8, 16, 16, 3)
    activation = result.activation.movedim(1, -1)
    torch.testing.assert_close(dictionary.values, activation.gather(-1, dictionary.indices))
    assert (dictionary.values[..., 0] == activation.amax(-1)).all()
    by_relevance = semantic_dictionary(result, k=1, by="relevance")
    assert (by_relevance.values[..., 0] == result.relevance.movedim(1, -1).amax(-1)).all()


def test_channel_prototypes_excite_their_own_channel(model):
    prototypes = channel_prototypes(model, "relu3", [7, 2], steps=20)
    with torch.no_grad(), capturing_outputs(model, ["relu3"]) as acts:
        model(prototypes.images)
    means = acts["relu3"].mean((2, 3))
    assert means[0, 7] > means[1, 7] and means[1, 2] > means[0, 2]


@pytest.mark.parametrize("call, error, words", [
    (lambda m, x: channel_attribution(m, x, "relu5", method="saliency"), ValueError, "method"),
    (lambda m, x: channel_attribution(m, x, "no_such", target=1), ValueError, "layer='no_such'"),
    (lambda m, x: channel_attribution(m, x, "no_such", method="activation"), ValueError, "layer='no_such'"),
    (lambda m, x: channel_attribution("model", x, "relu5"), TypeError, "model must be"),
    (lambda m, x: channel_attribution(m, x.long(), "relu5"), TypeError, "x must be"),
    (lambda m, x: channel_attribution(m, x, "relu5", method="activation", epsilon=0.1), ValueError, "rule options"),
    (lambda m, x: channel_attribution(fastlrp.LRP(m), x, "relu5", epsilon=0.1), ValueError, "existing LRP explainer"),
    (lambda m, x: semantic_dictionary(torch.rand(2, 4), k=1), ValueError, "positions"),
    (lambda m, x: semantic_dictionary(torch.rand(2, 4, 3, 3), k=5), ValueError, "k must be"),
])
def test_bad_arguments_name_the_argument(model, images, call, error, words):
    with pytest.raises(error, match=words):
        call(model, images[:2])


def test_model_untouched_by_gradient_attribution(images):
    model = load_demo_model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    channel_attribution(model, images, "relu5", target=1, method="gradient_x_activation")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_plot_channel_bars_shows_the_top_channels(explainer, images):
    import matplotlib.pyplot as plt

    from fastlrp.analysis import plot_channel_bars

    result = channel_attribution(explainer, images, "relu5", target=1)
    fig = plot_channel_bars(result, sample=2, top=6)
    bars = fig.axes[0].patches
    widths = sorted((abs(b.get_width()) for b in bars), reverse=True)
    expected = result.per_channel[2].abs().sort(descending=True).values[:6]
    torch.testing.assert_close(torch.tensor(widths, dtype=expected.dtype), expected)
    assert "relu5" in fig.axes[0].get_title()
    plt.close(fig)
