"""cluster/malloc_tuning.py: the settings are taken, and a step-like allocation pattern then
reuses freed memory instead of faulting fresh pages in. Each case runs in its own process:
the settings are process-wide."""

import json
import platform
import subprocess
import sys

import pytest

# Steps that each make four 2 MB tensors and free them all, as a prefill's ops do with their
# activations; page faults counted over the last 10 of 20 steps. "keep": keep_freed_memory.
# "map": glibc's starting mmap threshold (128 KiB) held fixed, so every such tensor is a fresh
# mapping; glibc's defaults fall anywhere between the two depending on what the process freed
# before (module docstring), which is why the engine fixes them.
_PATTERN = """
import ctypes, json, resource, sys
import torch
from moefleet.cluster.engine.malloc_tuning import keep_freed_memory
taken = keep_freed_memory(256) if sys.argv[1] == "keep" else ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10) == 1
def step():
    held = [torch.ones(2 << 18) for _ in range(4)]
    del held
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"taken": taken, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_kept_memory_is_reused_where_fresh_mappings_fault_in_every_step():
    kept, mapped = _run("keep"), _run("map")
    assert kept["taken"] is True and mapped["taken"] is True
    # 10 steps x 8 MB is 20,480 pages of 4 KiB.
    assert mapped["faults"] > 10_000, mapped
    assert kept["faults"] < 100, kept


def test_nothing_is_changed_when_asked_to_keep_nothing():
    from moefleet.cluster.engine.malloc_tuning import keep_freed_memory

    assert keep_freed_memory(0) is False
