"""fastlrp.reuse_freed_memory: freed CPU tensors' pages are reused, not faulted in again; the CLI applies
it unless told not to. The real setting changes the whole process, so it is tried in subprocesses."""
import subprocess
import sys
import textwrap

import pytest

from fastlrp import allocator
from fastlrp.apps import cli

# Allocate and free a 64 MiB tensor, then count the page faults of allocating and filling a 32 MiB one:
# both are above glibc's largest mmap threshold (32 MiB), and the second fits in the first's freed block.
_FAULTS_OF_A_SECOND_TENSOR = textwrap.dedent("""
    import resource, sys, torch
    import fastlrp
    if sys.argv[1] == "reuse":
        assert fastlrp.reuse_freed_memory() is True
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(8 << 20, dtype=torch.float32).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_SECOND_TENSOR, mode], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not allocator.available(), reason="glibc only")
def test_reused_memory_takes_no_page_faults():
    # glibc's default: the 32 MiB tensor is a fresh mapping, one fault per 4 KiB page (8192)
    assert _faults("default") > 4000
    assert _faults("reuse") < 400


def test_cli_keeps_freed_memory_unless_told_not_to(_allocator_left_alone, tmp_path, capsys):
    # a command that fails on its argument after parsing: the allocator is set before the command runs
    command = ["video", str(tmp_path / "missing.mp4"), "--model", "resnet18", "--out", str(tmp_path / "out.mp4")]
    assert cli.main(command) == 2
    assert "missing.mp4" in capsys.readouterr().err
    assert _allocator_left_alone == ([True] if allocator.available() else [])
    _allocator_left_alone.clear()
    assert cli.main(["--return-freed-memory", *command]) == 2
    assert _allocator_left_alone == []
