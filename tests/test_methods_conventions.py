"""The conventions shared by methods, metrics and analysis (docs/methods.md, "Conventions"): the
user's model is never touched, not even transiently or from another thread; one name for the
relevance; one target resolver; one set of validators; one optional-import helper."""

import threading
import warnings

import pytest
import torch

import fastlrp
from fastlrp import analysis, extras, metrics
from fastlrp._common import optional, targets, validate
from fastlrp.methods import IntegratedGradients, PlainGradient
from methods_models import BatchNormCNN, GapCNN, assert_same_state, model_state
from test_methods_api import FAST_OPTIONS

TRAINING = "ignore:.*training mode:UserWarning"


def _train_mode_model():
    model = BatchNormCNN().train()
    model.conv2.weight.requires_grad_(False)  # a mix of flags that must survive
    model.relu1.register_forward_hook(lambda m, i, o: None)  # and a user's own hook
    return model


@pytest.mark.filterwarnings(TRAINING)
@pytest.mark.parametrize("method", sorted(FAST_OPTIONS))
def test_every_method_leaves_a_training_model_untouched(method):
    if method in ("lime", "kernel_shap"):
        pytest.importorskip("skimage")
    model = _train_mode_model()
    before = model_state(model)
    fastlrp.attribute(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 2]), method=method,
                      **FAST_OPTIONS[method])
    assert_same_state(before, model_state(model))


@pytest.mark.filterwarnings(TRAINING)
def test_metrics_and_analysis_leave_a_training_model_untouched():
    model = _train_mode_model()
    before = model_state(model)
    x = torch.rand(3, 3, 8, 8)
    explainer = PlainGradient(model)
    relevance = explainer(x, 1)
    metrics.pixel_flipping(model, x, relevance, 1, steps=2)
    metrics.selectivity(model, explainer, x, steps=2)
    metrics.conservation(model, x, relevance=relevance, target=1)
    metrics.continuity(explainer, x, 1, num_samples=2)
    metrics.compare(model, {"gradient": explainer}, ["aopc_morf", "conservation_error"], x)
    metrics.model_randomization(model, PlainGradient, x, layers=["fc"])
    analysis.channel_attribution(model, x, "relu2", 1, method="gradient_x_activation")
    analysis.maximize_activation(model, analysis.Channel("relu2", 1), shape=(2, 3, 8, 8), steps=2,
                                 diversity=0.5)
    analysis.influence(model, torch.nn.functional.cross_entropy, x, torch.tensor([0, 1, 2]), x[:1],
                       torch.tensor([1]), parameters=["fc.weight"], damping=1.0)
    assert_same_state(before, model_state(model))


@pytest.mark.filterwarnings(TRAINING)
def test_threads_explaining_a_training_model_never_see_it_switched():
    """Two threads explain a training-mode model while a third watches its flags: none may flip,
    even for an instant (the old guard set eval mode and froze parameters for the call)."""
    model = GapCNN().train()
    x = torch.randn(2, 3, 8, 8)
    stop, failures, runs = threading.Event(), [], []

    def explain(method, options):
        try:
            for _ in range(25):
                fastlrp.attribute(model, x, 1, method=method, **options)
                runs.append(method)
        except Exception as err:  # noqa: BLE001 (reported below)
            failures.append(repr(err))

    def watch():
        while not stop.is_set():
            if not (model.training and all(m.training for m in model.modules())
                    and all(p.requires_grad for p in model.parameters())):
                failures.append("the model's flags changed during a call")
                return

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=explain, args=("gradient", {})),
               threading.Thread(target=explain, args=("gradcam", {"layer": "relu2"}))]
    watcher.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    watcher.join()
    assert not failures, failures
    assert len(runs) == 50
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


# --- one name for the relevance ---------------------------------------------------------

def test_relevance_is_the_field_and_attribution_a_deprecated_alias():
    model = GapCNN().eval()
    result = IntegratedGradients(model, steps=2).explain(torch.randn(1, 3, 8, 8), 0)
    assert "relevance" in {f.name for f in result.__dataclass_fields__.values()}
    with pytest.warns(DeprecationWarning, match=r"\.relevance"):
        old = result.attribution
    assert old is result.relevance
    with pytest.raises(AttributeError):
        result.attribution = old  # read-only


def test_channel_attribution_relevance_and_its_deprecated_names():
    model = GapCNN().eval()
    result = analysis.channel_attribution(model, torch.randn(2, 3, 8, 8), "relu2", 1,
                                          method="gradient_x_activation")
    with pytest.warns(DeprecationWarning, match=r"\.relevance"):
        assert result.attribution is result.relevance
    new = analysis.semantic_dictionary(result, k=1, by="relevance")
    with pytest.warns(DeprecationWarning, match="by='relevance'"):
        old = analysis.semantic_dictionary(result, k=1, by="attribution")
    assert torch.equal(new.indices, old.indices)


# --- one target resolver ----------------------------------------------------------------

@pytest.mark.parametrize("target", [None, 2, torch.tensor([0, 2, 1]), torch.tensor([[0.0, 1.0, 0.5]]),
                                    lambda out: out * 0 + 1])
@pytest.mark.parametrize("start", ["logit", "one"])
def test_starting_relevance_matches_the_engine(target, start):
    output = torch.randn(3, 3)
    ours = targets.starting_relevance(output, target, start)
    torch.testing.assert_close(ours, fastlrp.starting_relevance(output, target, start))


def test_class_indices():
    output = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    assert targets.class_indices(output, None).tolist() == [1, 0]
    assert targets.class_indices(output, 1).tolist() == [1, 1]
    assert targets.class_indices(output, torch.tensor([[0]])).tolist() == [0, 0]
    with pytest.raises(TypeError, match="target"):
        targets.class_indices(output, True)
    with pytest.raises(TypeError, match="target"):
        targets.class_indices(output, torch.ones(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        targets.class_indices(output, 2)


# --- validators and optional imports ----------------------------------------------------

def test_validators_name_the_argument_and_keep_both_error_types():
    with pytest.raises(TypeError, match="steps") as error:
        validate.positive_int("steps", 2.5)
    assert isinstance(error.value, ValueError)  # the methods raised ValueError, the metrics TypeError
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        validate.positive_int("steps", 0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        validate.number("lr", 0.0, strict=True)
    with pytest.raises(ValueError, match=r"max_fraction must lie in \(0, 1\]"):
        validate.fraction("max_fraction", 1.5)
    with pytest.raises(ValueError, match="x must be batched"):
        validate.check_input(GapCNN(), torch.randn(3))


def test_one_optional_import_helper(monkeypatch):
    assert extras.require is optional.require and extras.MissingExtraError is optional.MissingExtraError
    assert issubclass(extras.MissingExtraError, ImportError)
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    with pytest.raises(extras.MissingExtraError, match=r'scikit-learn.*pip install "fastlrp\[analysis\]"'):
        optional.require("sklearn.manifold", "analysis", "t-SNE")
    with pytest.raises(extras.MissingExtraError, match=r'package \'nope_not_here\'.*"fastlrp\[video\]"'):
        extras.require("nope_not_here", "video")


# --- exports and module sizes ------------------------------------------------------------

def test_activation_max_names_stay_importable():
    from fastlrp.analysis import activation_max
    for name in ("maximize_activation", "deep_dream", "ClassLogit", "ClassProbability", "Channel", "Neuron",
                 "Direction", "LayerEnergy", "Objective", "Prototypes", "RandomAffine", "GaussianDensity",
                 "GaussianMixtureDensity", "total_variation", "high_frequency_energy", "gram_similarity"):
        assert getattr(activation_max, name) is getattr(analysis, name, getattr(activation_max, name))


def test_no_public_name_is_bound_twice_in_one_namespace():
    """One name per object (docs/methods.md, "Names"): methods and rules have distinct names, and no
    alias sits next to its original."""
    for module in (fastlrp, fastlrp.methods, metrics, analysis):
        seen = {}
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) or callable(value):
                assert id(value) not in seen, f"{module.__name__}.{name} is {seen.get(id(value))}"
                seen[id(value)] = name
    assert fastlrp.GuidedBackprop is fastlrp.rules.GuidedBackprop
    assert fastlrp.GuidedBackpropagation is fastlrp.methods.GuidedBackpropagation
    assert fastlrp.DeconvNet is not fastlrp.Deconvolution


def test_modules_of_methods_metrics_and_analysis_stay_short():
    from pathlib import Path
    root = Path(fastlrp.__file__).parent
    for package in ("methods", "metrics", "analysis", "_common"):
        for path in (root / package).glob("*.py"):
            assert len(path.read_text().splitlines()) < 400, path


def test_no_deprecation_warning_on_the_new_names():
    model = GapCNN().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        result = fastlrp.methods.get("gradient", model).explain(torch.randn(1, 3, 8, 8), 0)
        metrics.conservation(model, torch.randn(1, 3, 8, 8), relevance=result.relevance).relative_error
