"""Per-call state is per call: one explainer from several threads, builds next to explanations on a
train-mode model, weight caches that see ``.data`` edits, and a model no build or call ever touches."""

import threading

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp import ops

BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not ops.native_supports(torch.device("cpu"), torch.float64), reason="fastlrp._C is not built"))]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.branch(h))


def flags(model):
    return ({n: m.training for n, m in model.named_modules()},
            {n: (p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.named_modules()})


def run_threads(target, count):
    errors = []

    def guarded(i):
        try:
            target(i)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_explainer_from_four_threads_with_layer_taps(backend):
    model = Net().double().eval()
    explainer = fastlrp.LRP(model, "epsilon_gamma_box", low=-3.0, high=3.0, backend=backend)
    inputs = [torch.randn(2, 3, 8, 8, dtype=torch.float64) for _ in range(4)]
    taps = ["stem.0", "branch.0", "head.2"]
    alone = [explainer.explain(x, i % 4, layers=taps) for i, x in enumerate(inputs)]
    together = [[] for _ in inputs]

    def work(i):
        for _ in range(5):
            together[i].append(explainer.explain(inputs[i], i % 4, layers=taps))
    run_threads(work, 4)
    for i, runs in enumerate(together):
        for result in runs:
            torch.testing.assert_close(result.relevance, alone[i].relevance, rtol=1e-12, atol=1e-14)
            assert set(result.layers) == set(taps)
            for name in taps:
                torch.testing.assert_close(result.layers[name], alone[i].layers[name], rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(result.activations[name], alone[i].activations[name], rtol=0, atol=0)
            assert result.backends == alone[i].backends


def test_builds_and_explanations_side_by_side_leave_a_train_mode_model_alone():
    model = Net().double().train()
    model.stem[0].register_forward_hook(lambda *args: None)
    before = flags(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explainer = fastlrp.LRP(model)
    with pytest.warns(UserWarning, match="training mode"):
        expected = explainer(x, 1)
    stop, seen = threading.Event(), []

    def watch():
        while not stop.is_set():
            seen.append(flags(model))

    def work(i):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(4):
                if i % 2:
                    fastlrp.LRP(model, "epsilon_plus")
                else:
                    torch.testing.assert_close(explainer(x, 1), expected, rtol=1e-12, atol=1e-14)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_threads(work, 4)
    finally:
        stop.set()
        watcher.join()
    assert seen and all(s == before for s in seen)
    assert flags(model) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_edits_between_calls_are_seen(backend):
    model = Net().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explainer = fastlrp.LRP(model, "epsilon_gamma_box", low=-3.0, high=3.0, backend=backend)
    first = explainer(x, 1)
    model.stem[0].weight.data.mul_(2)            # no version-counter bump
    model.stem[1].running_var.data.add_(0.5)     # a folded batch norm's statistics
    model.branch[0].weight.data.copy_(model.branch[0].weight.data.flip(0))  # same values, other places
    second = explainer(x, 1)
    fresh = fastlrp.LRP(model, "epsilon_gamma_box", low=-3.0, high=3.0, backend=backend)(x, 1)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, fresh, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("numel", [7, 1021 * 3 + 5, 1021 * 1024 + 17])  # small, tiled, above the tiled probe
def test_fingerprint_forms_agree_and_see_swaps(monkeypatch, dtype, numel):
    from fastlrp.engine import call

    t = torch.randn(numel, dtype=torch.float64).to(dtype)
    tiled = call.fingerprint(t)
    monkeypatch.setattr(call, "_TILED_LENGTH", 0)  # the matrix form for every size
    matrix = call.fingerprint(t)
    monkeypatch.undo()
    # the same weighted sum, summed in another order
    assert tiled.dtype == matrix.dtype == torch.float64
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    assert abs(tiled - matrix) <= tolerance * t.double().abs().sum()
    # two elements trade places (distance not a multiple of the period): the fingerprint moves
    swapped = t.clone()
    i, j = 1, numel - 2
    swapped[i], swapped[j] = t[j], t[i]
    if t[i] != t[j]:
        assert call.fingerprint(swapped) != tiled
    assert call.fingerprint(t.clone()) == tiled  # and is the same for the same values


def test_replaced_parameters_are_seen():
    model = Net().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    explainer = fastlrp.LRP(model)
    explainer(x, 0)
    model.head[2].weight = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    torch.testing.assert_close(explainer(x, 0), fastlrp.LRP(model)(x, 0), rtol=1e-12, atol=1e-14)


def test_a_layer_outside_an_explanation_says_how_to_call_it():
    explainer = fastlrp.LRP(Net().eval())
    with pytest.raises(RuntimeError, match="outside an explanation"):
        explainer.graph_module(torch.randn(1, 3, 8, 8))
