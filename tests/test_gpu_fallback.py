"""The GPU paths' host-side decisions, checked without a GPU: 32-bit index guards, the native CUDA
kernels' capability probe and fallback, TF32 following torch's flags, autotuning kept out of CUDA-graph
captures, and the autotune key and config pruning of the Triton kernels."""

import warnings

import pytest
import torch

from fastlrp import _native, ops
from fastlrp.ops import triton_ops

BIG = 2 ** 31


# ---------------------------------------------------------------- 32-bit indices

def test_int32_guard_counts_elements_and_offsets():
    assert triton_ops.int32_addressable(torch.empty(BIG - 1, device="meta"))
    assert not triton_ops.int32_addressable(torch.empty(BIG, device="meta"))
    # few elements, but the last one lies past 2^31 (a strided view of a large buffer)
    sparse = torch.empty(1, device="meta").as_strided((2, 3), (BIG, 1))
    assert not triton_ops.int32_addressable(sparse)
    # a broadcast bound: every element at offset 0, but the kernels' flat index still counts them all
    assert not triton_ops.int32_addressable(torch.empty(1, device="meta").expand(BIG))
    assert triton_ops.int32_addressable(torch.empty(1, device="meta").expand(1000), None, torch.empty(0))
    # a video batch: 128 clips x 64 channels x 32 frames x 112 x 112 is 3.3e9 elements
    assert not triton_ops.int32_addressable(torch.empty(128, 64, 32, 112, 112, device="meta"))


@pytest.fixture
def small_index_limit(monkeypatch):
    """Pretend 2^31 is 100 elements, and make any Triton launch an error."""
    monkeypatch.setattr(triton_ops, "INDEX_LIMIT", 100)
    if triton_ops._KERNELS is not None:
        for module in triton_ops._KERNELS:
            for name in ("launch_forward", "launch_relevance", "launch_pool", "launch_sum"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, _no_launch)


def _no_launch(*args, **kwargs):
    raise AssertionError("a Triton kernel was launched for a tensor over the 32-bit index limit")


def test_ops_over_the_index_limit_take_the_torch_formulas(small_index_limit):
    from fastlrp.ops.triton_fallback import forward_torch, relevance_torch
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(5)
    coefficients = [0.0, 1.0, 0.0, 0.0, 1.0] + [0.0] * 5  # ZPlus: PP + NN
    y, z = triton_ops.affine_forward(x, w, b, b, [], coefficients, [0.0] * 8, 1, stride=(1, 1), padding=(1, 1),
                                     dilation=(1, 1))
    y_ref, z_ref = forward_torch(x, w, b, b, None, None, coefficients, [0.0] * 8, 1, (1, 1), (1, 1), (1, 1), 1)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(z, z_ref)
    R = torch.randn_like(y)
    got = triton_ops.affine_relevance(x, w, R, z, y, [], coefficients, [0.0] * 8, [1.0], [0], 1e-6, (1, 1), (1, 1),
                                      (1, 1))
    expected = relevance_torch(x, w, R, z, y, None, None, coefficients, [0.0] * 8, [1.0], [0], 1e-6, (1, 1), (1, 1),
                               (1, 1), 1)
    torch.testing.assert_close(got, expected)
    a, c = torch.randn(3, 50), torch.randn(3, 50)
    outs = triton_ops.sum_relevance([a, c], R.new_ones(3, 50), a + c)
    torch.testing.assert_close(outs[0] + outs[1], torch.ones(3, 50), rtol=1e-4, atol=1e-4)


def test_the_triton_backend_sends_what_the_kernels_cannot_take_to_native():
    pytest.importorskip("triton")
    from fastlrp.backends.triton import MIN_INPUT_CHANNELS, cuda_worthwhile
    from fastlrp.reference.affine import AffineOp
    conv = AffineOp("conv", 2, (1, 1), (1, 1), (1, 1), 1)
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w = torch.empty(8, 64, 56, 56, **meta), torch.empty(64, 64, 3, 3, **meta)
    assert cuda_worthwhile(conv, x, w)
    stem = torch.empty(64, MIN_INPUT_CHANNELS - 1, 7, 7, **meta)
    assert not cuda_worthwhile(conv, torch.empty(8, MIN_INPUT_CHANNELS - 1, 224, 224, **meta), stem)
    assert not cuda_worthwhile(conv, torch.empty(128, 64, 32, 112, 112, **meta), w.unsqueeze(2))
    # float32 off CUDA: no TF32, so the IEEE dot, which the kernels leave to native
    assert not cuda_worthwhile(conv, x.float(), w.float())


# ---------------------------------------------------------------- TF32

@pytest.mark.parametrize("flag", [True, False])
def test_tf32_follows_torch_flags_per_layer_kind(flag):
    cuda = torch.device("cuda", 0)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flag, not flag
        assert triton_ops.allow_tf32(cuda, "conv") is flag  # cuDNN's flag, as torch's own convolutions
        assert triton_ops.allow_tf32(cuda, "linear") is (not flag)  # cuBLAS's, as torch's matmul
        assert not triton_ops.allow_tf32(torch.device("cpu"), "conv")  # TF32 is a CUDA mode
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------- native CUDA kernels: capability probe

class _FakeC:
    has_cuda_kernels = True

    def __init__(self, probe_ok):
        self.probe_ok, self.probes = probe_ok, []

    def cuda_probe_kernel(self, device):
        self.probes.append(device)
        return self.probe_ok


@pytest.fixture
def fake_device(monkeypatch):
    def install(capability, probe_ok=True):
        fake = _FakeC(probe_ok)
        monkeypatch.setattr(_native, "_C", fake)
        monkeypatch.setattr(_native, "_CUDA_USABLE", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        return fake
    return install


def test_native_cuda_kernels_need_compute_capability_8(fake_device):
    fake = fake_device((7, 5))
    with pytest.warns(RuntimeWarning, match="compute capability 7.5 is below 8.0"):
        assert not ops.native_supports(torch.device("cuda", 1), torch.float32)
    assert fake.probes == []  # not even probed
    from fastlrp.backends.native import NativeBackend
    assert not NativeBackend().available(torch.device("cuda", 1))


def test_native_cuda_kernels_need_a_probe_launch_once(fake_device):
    fake = fake_device((9, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.native_supports(torch.device("cuda", 0), torch.bfloat16)
        assert ops.native_supports(torch.device("cuda", 0), torch.float32)
    assert fake.probes == [0]  # one probe per device, then the answer is kept
    assert not ops.native_supports(torch.device("cuda", 0), torch.int64)


def test_a_failed_probe_turns_the_native_cuda_kernels_off_with_a_warning(fake_device):
    fake_device((8, 6), probe_ok=False)
    with pytest.warns(RuntimeWarning, match="probe kernel from fastlrp._C failed"):
        assert not ops.native_supports(torch.device("cuda", 2), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        assert not ops.native_supports(torch.device("cuda", 2), torch.float32)


def test_no_cuda_build_means_no_native_cuda_kernels(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    assert not _native.cuda_kernels_usable(torch.device("cuda", 0))


# ---------------------------------------------------------------- CUDA-graph capture, autotuning

def test_no_timing_under_capture(monkeypatch):
    from fastlrp.backends import timing
    monkeypatch.setenv("FASTLRP_TRITON_CHOICE", "measure")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(timing, "device_key", lambda device: "fake-gpu")
    monkeypatch.setattr(timing, "_CHOICES", {"fake-gpu": {"cached": "triton"}})

    def never():
        raise AssertionError("timed under capture")
    cuda = torch.device("cuda", 0)
    assert timing.prefers_first("cached", cuda, never, never)
    assert not timing.prefers_first("unknown", cuda, never, never)  # native: nothing to tune


class _FakeAutotuner:
    """The parts of triton.runtime.Autotuner that affine_lrp._launch reads."""

    def __init__(self, configs, cache):
        self.configs, self.cache, self.keys = configs, cache, ["N", "FLAG"]
        self.arg_names = ["x", "N", "FLAG"]
        self.fn, self.launched = self, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((self is self.fn, args, kwargs))


def test_autotuning_is_kept_out_of_graph_captures(monkeypatch):
    triton = pytest.importorskip("triton")
    from fastlrp.kernels import affine_lrp
    configs = [triton.Config({"BM": 16 * (i + 1)}, num_warps=4) for i in range(len(affine_lrp.CONFIG_SHAPES))]
    x = torch.empty(3)
    tuned = _FakeAutotuner(configs, {(7, True, str(x.dtype)): configs[0]})
    monkeypatch.delenv("FASTLRP_TRITON_TUNE", raising=False)
    monkeypatch.setattr(affine_lrp, "_capturing", lambda: True)
    affine_lrp._launch(tuned, (1,), (x, 7), {"FLAG": True}, None)  # tuned before: through the autotuner
    assert tuned.launched[-1][2] == {"FLAG": True}
    untuned = _FakeAutotuner(configs, {})
    calls = []
    untuned.fn = lambda: None
    untuned.fn = type("JIT", (), {"__getitem__": lambda self, grid: lambda *a, **k: calls.append(k)})()
    affine_lrp._launch(untuned, (1,), (x, 8), {"FLAG": True}, None)
    assert calls == [{"FLAG": True, **configs[affine_lrp.SAFE_CONFIG].all_kwargs()}]
    monkeypatch.setattr(affine_lrp, "_capturing", lambda: False)
    affine_lrp._launch(untuned, (1,), (x, 8), {"FLAG": True}, None)  # outside a capture: tuned as usual
    assert len(calls) == 1 and untuned.launched
    monkeypatch.setenv("FASTLRP_TRITON_TUNE", "0")  # tuning off: the safe tile, also for a tuned key
    affine_lrp._launch(tuned, (1,), (x, 7), {"FLAG": True}, None)
    assert tuned.launched[-1][2] == calls[0]


def test_the_autotune_key_names_the_rule_groups_and_layout():
    pytest.importorskip("triton")
    from fastlrp.kernels import affine_lrp
    kernels = (affine_lrp._lrp_forward_kernel, affine_lrp._lrp_relevance_kernel)
    names = set(kernels[0].arg_names) | set(kernels[1].arg_names)
    assert set(affine_lrp._AUTOTUNE_KEY) <= names  # no key name that no kernel has (it would be ignored)
    for flag in ("NEED_PP", "NEED_NN", "GROUPS_Z", "PREC", "CG", "OG", "sxc", "sxw"):
        assert flag in affine_lrp._AUTOTUNE_KEY
    for kernel in kernels:
        assert kernel.keys == affine_lrp._AUTOTUNE_KEY


def test_config_pruning_drops_spills_and_shared_memory_over_the_limit():
    pytest.importorskip("triton")
    from fastlrp.kernels import affine_lrp
    stats = {"a": (0, 100), "b": (512, 50), "c": (0, 300), "d": None}
    assert affine_lrp.choosable(list(stats), stats.get, 200) == ["a"]
    # no clean config: the one that spills least among those that fit
    stats = {"a": (64, 100), "b": (8, 150), "c": (0, 300)}
    assert affine_lrp.choosable(list(stats), stats.get, 200) == ["b"]


# ---------------------------------------------------------------- native CUDA element-wise kernels: launch plan

FLAT, CHANNELS_LAST, CHANNELS_FIRST = 0, 1, 2
needs_plan = pytest.mark.skipif(_native._C is None or not hasattr(_native._C, "elementwise_plan"),
                                reason="fastlrp._C is not built")


def _views(*tensors):
    """(N, C, S) strides as fastlrp.ops hands them to the kernels (spatial dims collapsed)."""
    from fastlrp.ops._views import collapse_spatial
    out = []
    for t in tensors:
        v = collapse_spatial(t, "t")
        out.append(tuple(v.stride()))
    return out


def _full_plan(x, *tensors, max_threads=1 << 20, vectors=False):
    """(layout, index32, elements per vector access, why); with vectors, the tensors' element size and
    base addresses as the kernels pass them."""
    n, c = x.shape[:2]
    s = x[0, 0].numel()
    extra = (x.element_size(), [t.data_ptr() for t in (x, *tensors)]) if vectors else ()
    return tuple(_native._C.elementwise_plan(n, c, s, _views(x, *tensors), max_threads, *extra))


def _plan(x, *tensors, max_threads=1 << 20):
    return _full_plan(x, *tensors, max_threads=max_threads)[:2]


@needs_plan
def test_plan_walks_dense_tensors_flat_in_either_layout():
    x = torch.empty(2, 3, 4, 5)
    assert _plan(x, torch.empty_like(x)) == (FLAT, True)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _plan(cl, torch.empty_like(cl)) == (FLAT, True)
    # channels-last with a per-channel bound broadcast over the image: channel index fastest
    bound = torch.empty(1, 3, 1, 1).expand(2, 3, 4, 5)
    assert _plan(cl, torch.empty_like(cl), bound) == (CHANNELS_LAST, True)
    # contiguous with the same bound, or mixed layouts led by a contiguous tensor: spatial index fastest
    assert _plan(x, bound) == (CHANNELS_FIRST, True)
    assert _plan(x, cl) == (CHANNELS_FIRST, True)


@needs_plan
def test_plan_uses_64_bit_indices_only_where_needed():
    big = torch.empty(2 ** 31 // (64 * 56 * 56) + 1, 64, 56, 56, device="meta")
    assert _plan(big) == (FLAT, False)
    # under the limit, but the grid-stride loop's overshoot would wrap a 32-bit index
    near = torch.empty(1, 1, 2 ** 31 - 1000, device="meta")
    assert _plan(near, max_threads=1 << 20) == (FLAT, False)
    assert _plan(torch.empty(1, 1, 2 ** 20, device="meta"), max_threads=1 << 20) == (FLAT, True)


WALKS = {  # views, the plan's layout
    "contiguous": (["c"], FLAT), "channels_last": (["cl"], FLAT),
    "channels_last_with_contiguous": (["cl", "c"], CHANNELS_LAST),
    "contiguous_with_channels_last": (["c", "cl"], CHANNELS_FIRST),
}


@needs_plan
@pytest.mark.parametrize("walk", list(WALKS))
@pytest.mark.parametrize("index32", [True, False])
def test_every_walk_visits_each_element_once_and_lines_views_up(walk, index32):
    """The host-side copy of the kernels' index math: for each plan layout, walk index i lands on the same
    logical element (n, c, s) of every view, every element exactly once; channels-last walks are coalesced
    (consecutive i, consecutive addresses within a pixel)."""
    n, c, h, w = 2, 3, 4, 5
    total = n * c * h * w
    logical = torch.arange(total).reshape(n, c, h, w)
    formats = {"c": torch.contiguous_format, "cl": torch.channels_last}
    names, expected_layout = WALKS[walk]
    views = [logical.contiguous(memory_format=formats[name]) for name in names]
    plan_layout = _plan(views[0], *views[1:])[0]
    assert plan_layout == expected_layout
    seen = []
    for t, strides in zip(views, _views(*views)):
        offsets = _native._C.elementwise_offsets(plan_layout, index32, c, h * w, strides, list(range(total)))
        assert len(set(offsets)) == total and min(offsets) == 0 and max(offsets) == total - 1
        storage = torch.as_strided(t, (total,), (1,))  # the value stored at an offset is its logical index
        seen.append(storage[torch.tensor(offsets)])
    for other in seen[1:]:
        assert torch.equal(seen[0], other)  # the same logical element in every view
    if plan_layout == CHANNELS_LAST:  # one pixel's channels: consecutive addresses for consecutive threads
        first = torch.tensor(_native._C.elementwise_offsets(plan_layout, index32, c, h * w, _views(views[0])[0],
                                                            list(range(c))))
        assert torch.equal(first.diff(), torch.ones(c - 1, dtype=torch.long))


VECTOR = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}  # 16 bytes each


def _at_offset(shape, dtype, offset, memory_format=torch.contiguous_format):
    """A dense tensor whose data starts `offset` elements into its storage (offset 1: not 16-byte aligned)."""
    base = torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format)
    storage = torch.empty(base.numel() + offset, dtype=dtype)
    assert storage.data_ptr() % 16 == 0  # torch's CPU allocator aligns to at least 64 bytes
    return storage[offset:].as_strided(base.shape, base.stride())


@needs_plan
@pytest.mark.parametrize("dtype", list(VECTOR))
def test_flat_walk_reads_16_byte_vectors_where_every_pointer_is_aligned(dtype):
    width = VECTOR[dtype]
    x, out = (_at_offset((2, 3, 5, 7), dtype, 0) for _ in range(2))  # 210 elements: 16-byte steps and a tail
    assert _full_plan(x, out, vectors=True) == (FLAT, True, width, "16-byte vectors")
    cl = _at_offset((2, 3, 5, 7), dtype, 0, torch.channels_last)
    assert _full_plan(cl, _at_offset((2, 3, 5, 7), dtype, 0, torch.channels_last), vectors=True)[2] == width
    # one view one element off a 16-byte boundary: every view stays scalar
    shifted = _at_offset((2, 3, 5, 7), dtype, 1)
    assert _full_plan(x, shifted, vectors=True) == (FLAT, True, 1, "a base pointer is not 16-byte aligned")
    assert _full_plan(shifted, x, vectors=True)[2:] == (1, "a base pointer is not 16-byte aligned")
    # offset by a whole vector: aligned again
    assert _full_plan(x, _at_offset((2, 3, 5, 7), dtype, width), vectors=True)[2] == width
    # fewer elements than one vector; strided walks never read vectors
    tiny = _at_offset((1, 1, 1, 1), dtype, 0)
    assert _full_plan(tiny, vectors=True)[2:] == (1, "fewer elements than one vector")
    bound = torch.zeros(1, 3, 1, 1, dtype=dtype).expand(2, 3, 5, 7)
    assert _full_plan(cl, bound, vectors=True)[::2] == (CHANNELS_LAST, 1)
    assert _full_plan(x, bound, vectors=True)[2:] == (1, "not flat")
    # without an element size (the old call) the walk is scalar
    assert _full_plan(x, out)[2:] == (1, "element size unknown or not a divisor of 16 bytes")


@needs_plan
def test_plan_wants_an_address_for_every_view():
    x = torch.empty(2, 3, 4, 4)
    with pytest.raises(ValueError, match="1 addresses for 2 views"):
        _native._C.elementwise_plan(2, 3, 16, _views(x, x), 1 << 20, 4, [x.data_ptr()])


@needs_plan
@pytest.mark.parametrize("total", [210, 8, 7, 1, 16 * 3 + 5])
@pytest.mark.parametrize("dtype", list(VECTOR))
def test_vector_walk_visits_each_element_once(dtype, total):
    """The flat walk with vectors, as the kernels step it: vector steps of W aligned consecutive offsets,
    then a scalar tail; together every element exactly once, for every count (odd counts included)."""
    width = VECTOR[dtype]
    x = _at_offset((1, 1, total), dtype, 0)
    layout, index32, vector, _ = _full_plan(x, x, vectors=True)
    assert layout == FLAT and vector == (width if total >= width else 1)
    steps = total // vector + (total % vector if vector > 1 else 0)
    offsets = _native._C.elementwise_offsets(layout, index32, 1, total, _views(x)[0], list(range(steps)),
                                             vector=vector, total=total)
    assert sorted(offsets) == list(range(total))
    vector_offsets = offsets[:(total // vector) * vector] if vector > 1 else []
    assert all(o % width == 0 for o in vector_offsets[::width])  # each vector starts on a 16-byte boundary
    assert vector_offsets == list(range(len(vector_offsets)))  # consecutive within and across steps


def test_run_time_pruning_reads_spills_and_shared_memory_of_each_configs_compile():
    pytest.importorskip("triton")
    from types import SimpleNamespace
    from fastlrp.kernels import affine_lrp

    class FakeJIT:
        def __init__(self):
            self.calls = []

        def warmup(self, *args, grid, **kwargs):
            self.calls.append((args, grid, kwargs))
            if kwargs["BM"] == 64:
                raise RuntimeError("out of resources: shared memory")
            return SimpleNamespace(n_spills=kwargs["BM"] // 32 - 1, metadata=SimpleNamespace(shared=1024),
                                   _init_handles=lambda: None)
    triton = pytest.importorskip("triton")
    jit = FakeJIT()
    # as Autotuner.run passes them: the launch's grid and warmup flag next to the constexprs
    named, flags = {"x": 1, "N": 7}, {"NEED_Y": True, "grid": (3, 1, 1), "warmup": False}
    big, mid, safe = (triton.Config({"BM": bm}, num_warps=4) for bm in (128, 64, 32))
    assert affine_lrp._device_resources(jit, named, flags, big) == (12, 1024)  # 3 spilled words = 12 bytes
    assert affine_lrp._device_resources(jit, named, flags, mid) is None
    assert jit.calls[0][0] == (1, 7) and jit.calls[0][2]["NEED_Y"] and jit.calls[0][2]["BM"] == 128
    assert "warmup" not in jit.calls[0][2] and jit.calls[0][1] == (1,)
    stats = {c: affine_lrp._device_resources(jit, named, flags, c) for c in (big, mid, safe)}
    assert affine_lrp.choosable([big, mid, safe], stats.get, 2048) == [safe]
