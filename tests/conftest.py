import os
import zlib

import torch

# Without a GPU the Triton tests (tests/triton) run through Triton's CPU interpreter. The variable
# must be set before anything imports triton: triton decorates its own standard library when it is
# first imported (torch imports it while some test modules are collected), and kernels decorated
# in compiled mode cannot run in the interpreter. This file is the first one pytest imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # a distinct but reproducible seed per test: fresh inputs without flaky reruns
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module on one thread: for tiny tensors a second thread saves little and, on a shared CI
    machine, stalls in synchronization."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _allocator_left_alone(monkeypatch):
    """The CLI reconfigures its process's allocator (fastlrp.reuse_freed_memory); tests calling it in
    this process record the call instead, so the suite's process keeps glibc's defaults.
    tests/test_allocator.py checks the real effect in subprocesses."""
    from fastlrp import allocator

    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda enable=True: calls.append(enable) or True)
    return calls
