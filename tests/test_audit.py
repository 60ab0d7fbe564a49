"""fastlrp.audit: per-layer conservation, each loss attributed to its cause.

On bias-free float64 networks with rescaled weights (``bias_free_copy``) LRP-0 conserves at every
layer; epsilon_plus loses relevance on mobile architectures, and the audit must account for all of
it: per layer, the causes derived from the rule's form add up to the loss measured by the layer's
reference rule; over the network, the layers' losses add up to what the explanation itself lost."""

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp import layers
from fastlrp.audit import audit, bias_free_copy
from fastlrp.composites import Composite, base_layer_map

torchvision = pytest.importorskip("torchvision")
tv = torchvision.models

ZOO = {
    "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10),
    "shufflenet_v2": lambda: tv.shufflenet_v2_x0_5(num_classes=10),
    "efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=10),
    "mnasnet": lambda: tv.mnasnet0_5(num_classes=10),
    "regnet_x_400mf": lambda: tv.regnet_x_400mf(num_classes=10),
}
# LRP-0: Epsilon with a stabilizer far below any float64 activation here, Norm for sums and pooling
LRP0 = Composite(base_layer_map(1e-30) + [(layers.Convolution, fastlrp.Epsilon(1e-30)),
                                          (nn.Linear, fastlrp.Epsilon(1e-30))])
_models = {}


def bias_free(name):
    """The zoo's network without biases, weights rescaled, and an input (one sample, 32x32)."""
    if name not in _models:
        torch.manual_seed(0)
        calibration = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        model = bias_free_copy(ZOO[name]().double(), calibration)
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        _models[name] = model, x, model(x).argmax(1)
    return _models[name]


def check_accounted(result, tol=1e-9):
    """Every layer's causes add up to its loss, and the layers' losses to the explanation's."""
    scale = abs(result.start)
    assert scale > 0
    for row in result.layers:
        assert abs(row.other) < tol * scale, (row.layer, row.causes(), row.loss)
        assert row.bias == 0.0, row.layer  # bias-free network
    assert abs(result.between_layers) < tol * scale
    total = result.totals()
    explained = sum(total[c] for c in ("rule", "vanished", "bias", "stabilizer", "other"))
    assert abs(explained - result.total_loss) < tol * scale


@pytest.mark.parametrize("name", list(ZOO))
def test_lrp0_conserves_at_every_layer(name):
    model, x, target = bias_free(name)
    result = audit(fastlrp.LRP(model, LRP0), x, target)
    assert len(result.layers) > 20
    for row in result.layers:
        assert abs(row.loss) < 1e-8 * abs(result.start), (row.layer, row.loss, result.start)
        assert row.vanished_neurons == 0
    assert abs(result.input - result.start) < 1e-8 * abs(result.start)
    check_accounted(result)


@pytest.mark.parametrize("name", ["shufflenet_v2", "efficientnet_b0", "mobilenet_v3_small"])
def test_audit_accounts_for_every_loss_of_epsilon_plus(name):
    """ZPlus loses relevance where a group's z+ vanishes: the audit finds it, neuron by neuron."""
    model, x, target = bias_free(name)
    explainer = fastlrp.LRP(model, "epsilon_plus")
    result = audit(explainer, x, target)
    # the audited explanation is the explainer's own (native backend)
    torch.testing.assert_close(result.relevance, explainer(x, target), rtol=1e-12, atol=1e-15)
    lost = result.total_loss / result.start
    assert lost > 0.05  # the loss the issue reports, on these nets at this size
    check_accounted(result)
    totals = result.totals()
    assert totals["vanished"] / result.total_loss > 0.99 and totals["vanished_neurons"] > 0
    assert abs(totals["stabilizer"]) < 1e-3 * abs(result.start)


def test_causes_of_a_single_layer_by_hand():
    """One Linear layer under ZPlus (z = W+ x+ + W- x- + b+), worked out by hand."""
    layer = nn.Linear(2, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.5, 0.0]))
    explainer = fastlrp.LRP(nn.Sequential(layer).eval(), Composite([(nn.Linear, fastlrp.ZPlus())]))
    ones = lambda out: torch.ones_like(out)  # R = 1 at both outputs
    eps = 1e-6

    # x = (-1, -2): neuron 0 has no contribution (a = 0) but z = b+ = 0.5: its share goes to the bias;
    # neuron 1 has a = W- x- = 2, no bias: it loses only what the stabilizer takes
    (row,) = audit(explainer, torch.tensor([[-1.0, -2.0]], dtype=torch.float64), ones).layers
    assert row.relevance_out == pytest.approx(2.0)
    assert row.relevance_in == pytest.approx(2 / (2 + eps), rel=1e-12)
    assert row.bias == pytest.approx(0.5 / (0.5 + eps), rel=1e-12)
    assert row.stabilizer == pytest.approx(eps / (0.5 + eps) + eps / (2 + eps), rel=1e-9)
    assert row.vanished == 0.0 and row.vanished_neurons == 0 and row.rule_loss == 0.0

    # x = (-1, 2): neuron 1 has W+ x+ = 0 and W- x- = 0 and no bias: z = 0, its share vanishes
    result = audit(explainer, torch.tensor([[-1.0, 2.0]], dtype=torch.float64), ones)
    (row,) = result.layers
    assert row.vanished == 1.0 and row.vanished_neurons == 1 and row.neurons == 2
    assert row.bias == pytest.approx(0.5 / (2.5 + eps), rel=1e-12)
    assert abs(row.other) < 1e-12 and abs(result.between_layers) < 1e-12
    assert result.total_loss == pytest.approx(1 + (0.5 + eps) / (2.5 + eps), rel=1e-12)


def test_gamma_masks_and_free_alpha_beta_show_as_the_rules_own_loss():
    """Coefficients that do not add up to one (AlphaBeta(1.5, 0.25) as a free rule) create or lose
    relevance by the rule itself; Gamma drops the relevance of outputs that are exactly 0."""
    from fastlrp import linear_form as lf

    class Unbalanced(fastlrp.rules.LinearRule):
        def form(self):
            return lf.LinearForm([lf.Part("x+", lf.POSITIVE), lf.Part("x-", lf.NEGATIVE),
                                  lf.Part("x+", lf.NEGATIVE, group=1), lf.Part("x-", lf.POSITIVE, group=1)],
                                 [lf.Group(1.5), lf.Group(-0.25)], 1e-6)

    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for rule in (Unbalanced(), fastlrp.Gamma(0.25)):
        explainer = fastlrp.LRP(nn.Sequential(conv).eval(), Composite([(nn.Conv2d, rule)]))
        result = audit(explainer, x, lambda out: out.clamp(min=0))
        (row,) = result.layers
        assert abs(row.other) < 1e-10 * abs(row.relevance_out) and abs(result.between_layers) < 1e-9
        if isinstance(rule, Unbalanced):  # share = (1.5 - 0.25) R
            assert row.rule_loss == pytest.approx(-0.25 * row.relevance_out, rel=1e-12)
        else:  # R = out+ is 0 where out <= 0, so no R is dropped by the masks
            assert row.rule_loss == 0.0


def test_audit_rejects_what_is_not_an_explainer():
    with pytest.raises(TypeError, match="fastlrp.LRP explainer"):
        audit(nn.Linear(2, 2), torch.zeros(1, 2))
