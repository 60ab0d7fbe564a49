"""Which Triton GEMM config may run: the autotuner's pruning and the untuned choice (CUDA-graph capture,
FASTLRP_TRITON_TUNE=0), on fake compile results shaped like the static checks' sm_90/sm_80 findings
(docs/gpu.md). No GPU and no compile: ``affine_lrp._device_resources`` is replaced."""

import pytest
import torch

triton = pytest.importorskip("triton")

from fastlrp.kernels import affine_lrp  # noqa: E402

SHAPES = affine_lrp.CONFIG_SHAPES
W4_64, W8_64, SAFE = (64, 64, 32, 4, 4), (64, 64, 32, 8, 3), affine_lrp.SAFE_SHAPE
LIMIT = 232448  # sm_90's shared memory per block


def _configs():
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in SHAPES]


def _shape(config):
    k = config.kwargs
    return (k["BM"], k["BN"], k["BK"], config.num_warps, config.num_stages)


def _resources(spilling=(), over_shared=(), failing=()):
    """(spill bytes, shared bytes) per config: clean unless its shape is listed."""
    def resources(config):
        shape = _shape(config)
        if shape in failing:
            return None
        return (184 if shape in spilling else 0, LIMIT + 1 if shape in over_shared else 40000)
    return resources


def _choice(resources):
    configs = _configs()
    chosen = affine_lrp.choosable(configs, resources, LIMIT, affine_lrp.config_tier)
    untuned = affine_lrp.untuned_config(configs, resources, LIMIT, affine_lrp.config_tier)
    return [_shape(c) for c in chosen], _shape(untuned)


def test_the_list_keeps_the_safe_tile_last_and_a_preference_order():
    assert SHAPES[0] == W4_64 and SHAPES[-1] == SAFE and affine_lrp.SAFE_CONFIG == len(SHAPES) - 1
    assert [affine_lrp.shape_tier(s) for s in SHAPES] == [0, 0, 0, 0, 1, 2]
    assert affine_lrp._MAX_BK == max(s[2] for s in SHAPES)  # the packed weights' K padding covers every BK


def test_where_4_warp_tiles_are_clean_neither_the_8_warp_nor_the_safe_tile_is_tried():
    # ZPlus/Gamma after a ReLU, Linear: every tile clean on sm_90 bf16; the 128-wide ones spill for Gamma
    chosen, untuned = _choice(_resources())
    assert chosen == [s for s in SHAPES if affine_lrp.shape_tier(s) == 0] and untuned == W4_64
    big = [(128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3)]
    chosen, untuned = _choice(_resources(spilling=big))
    assert chosen == [W4_64] and untuned == W4_64


def test_four_products_on_a_signed_input_take_the_8_warp_tile_then_the_safe_tile():
    # sm_90 bf16, NCHW: every 4-warp tile spills (64x64x32: 184 B), 64x64x32 on 8 warps does not
    four_warp = [s for s in SHAPES if affine_lrp.shape_tier(s) == 0]
    chosen, untuned = _choice(_resources(spilling=four_warp))
    assert chosen == [W8_64] and untuned == W8_64
    # sm_80 bf16/fp32-TF32: the 8-warp tile spills too, the safe tile is the last resort
    chosen, untuned = _choice(_resources(spilling=four_warp + [W8_64]))
    assert chosen == [SAFE] and untuned == SAFE


def test_shared_memory_over_the_limit_and_failed_compiles_are_skipped():
    chosen, untuned = _choice(_resources(over_shared=[W4_64], failing=[(128, 64, 32, 4, 3)]))
    assert W4_64 not in chosen and (128, 64, 32, 4, 3) not in chosen and untuned == (64, 128, 32, 4, 3)
    chosen, untuned = _choice(_resources(failing=list(SHAPES)))  # nothing compiles (no driver): the safe tile
    assert untuned == SAFE


class _FakeAutotuner:
    """The parts of triton.runtime.Autotuner that affine_lrp._launch reads."""

    def __init__(self, configs):
        self.configs, self.cache, self.keys, self.arg_names = configs, {}, ["N"], ["x", "N"]
        self.launched = []
        outer = self

        class _JIT:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: outer.launched.append(kwargs)
        self.fn = _JIT()


def test_untuned_launches_run_the_first_choosable_config_and_compile_each_once(monkeypatch):
    four_warp = [s for s in SHAPES if affine_lrp.shape_tier(s) == 0]
    fake = _resources(spilling=four_warp)
    compiled = []

    def device_resources(jit, named_args, kwargs, config):
        assert kwargs == {"FLAG": True} and list(named_args) == ["x", "N"]
        compiled.append(_shape(config))
        return fake(config)
    monkeypatch.setattr(affine_lrp, "_device_resources", device_resources)
    monkeypatch.setattr(affine_lrp, "_shared_limit", lambda: LIMIT)
    monkeypatch.setattr(affine_lrp, "_current_device", lambda: 0)
    monkeypatch.setattr(affine_lrp, "_UNTUNED", {})
    monkeypatch.setenv("FASTLRP_TRITON_TUNE", "0")
    tuner, x = _FakeAutotuner(_configs()), torch.empty(3)
    affine_lrp._launch(tuner, (1,), (x, 7), {"FLAG": True}, None)
    affine_lrp._launch(tuner, (1,), (x, 7), {"FLAG": True}, None)
    w8 = next(c for c in tuner.configs if _shape(c) == W8_64)
    assert tuner.launched == [{"FLAG": True, **w8.all_kwargs()}] * 2
    assert sorted(compiled) == sorted(SHAPES)  # each config compiled once for this key, none launched
    affine_lrp._launch(tuner, (1,), (x, 9), {"FLAG": True}, None)  # another key: chosen anew
    assert len(compiled) == 2 * len(SHAPES)
    # under a capture, a key the autotuner has not tuned takes the choice made before the capture ...
    monkeypatch.delenv("FASTLRP_TRITON_TUNE")
    monkeypatch.setattr(affine_lrp, "_capturing", lambda: True)
    affine_lrp._launch(tuner, (1,), (x, 7), {"FLAG": True}, None)
    assert tuner.launched[-1] == {"FLAG": True, **w8.all_kwargs()}
    # ... and a key first met inside the capture loads nothing (a module load may invalidate the
    # capture): the safe tile runs, and nothing is remembered for later launches outside it
    before = len(compiled)
    affine_lrp._launch(tuner, (1,), (x, 11), {"FLAG": True}, None)
    safe = next(c for c in tuner.configs if _shape(c) == SAFE)
    assert tuner.launched[-1] == {"FLAG": True, **safe.all_kwargs()} and len(compiled) == before
    monkeypatch.setattr(affine_lrp, "_capturing", lambda: False)
    monkeypatch.setenv("FASTLRP_TRITON_TUNE", "0")
    affine_lrp._launch(tuner, (1,), (x, 11), {"FLAG": True}, None)
    assert tuner.launched[-1] == {"FLAG": True, **w8.all_kwargs()}


def test_the_autotuners_pruning_applies_the_same_rule(monkeypatch):
    four_warp = [s for s in SHAPES if affine_lrp.shape_tier(s) == 0]
    fake = _resources(spilling=four_warp[1:])
    monkeypatch.setattr(affine_lrp, "interpreting", lambda: False)
    monkeypatch.setattr(affine_lrp, "_device_resources", lambda jit, named, kwargs, config: fake(config))
    monkeypatch.setattr(affine_lrp, "_shared_limit", lambda: LIMIT)
    prune = affine_lrp._resource_pruner("_lrp_forward_kernel")
    kept = prune(_configs(), {"x": 1, "N": 7}, NEED_Y=True, grid=(1,), warmup=False)
    assert [_shape(c) for c in kept] == [W4_64]  # neither the 8-warp nor the safe tile is benchmarked
