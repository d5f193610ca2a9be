"""Compiled CPU fast paths (kernels/csrc/*.cpp), built on first use and cached.

The ops register as torch.ops.moefleet.*; callers ask `cpu_ops()` and use the plain torch
reference when it returns None (no compiler, a failed build, MOEFLEET_CPU_KERNELS=0, or not
Linux). The build takes ~15-25 s once; it is cached under $MOEFLEET_CACHE/kernels/<key>, keyed
by the sources, torch's version, the CPU's flags and the compile flags (the code is built for
this CPU's vector units, so another CPU builds its own).
"""

import hashlib
import logging
import os
import platform
import threading

import torch

log = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops": the loaded namespace or None, "why": why not


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


# -fopenmp: at::parallel_for is inlined from ATen's headers as an OpenMP region; without it the
# ops would run on one thread.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]
_LIBRARY = "moefleet_cpu_ops"


def _sources() -> list[str]:
    return sorted(os.path.join(_CSRC, name) for name in os.listdir(_CSRC) if name.endswith(".cpp"))


def cache_root() -> str:
    """$MOEFLEET_CACHE, else ~/.cache/moefleet: where built kernels (and generated models) are kept."""
    return os.environ.get("MOEFLEET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "moefleet"))


def keyed_build_dir(sources: dict[str, bytes], kind: str = "kernels") -> str:
    """$MOEFLEET_CACHE/<kind>/<key>, made if absent: the key covers the sources (file name ->
    bytes, headers too: a change to one must rebuild), torch's version, this CPU's flags and the
    compile flags, so another CPU or torch never loads a build that was not made for it."""
    source = b"".join(name.encode() + b"\0" + sources[name] for name in sorted(sources))
    key_parts = [source, torch.__version__.encode(), _cpu_flags().encode(), " ".join(_CFLAGS + _LDFLAGS).encode()]
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    path = os.path.join(cache_root(), kind, key)
    os.makedirs(path, exist_ok=True)
    return path


def compile_library(name: str, cpp_paths: list[str], build_dir: str) -> None:
    """Compile and link the sources as lib <name>.so in build_dir and load it (its ops register)."""
    from torch.utils.cpp_extension import load

    load(name=name, sources=cpp_paths, extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, build_directory=build_dir,
         is_python_module=False, verbose=False)


def _build_dir() -> str:
    sources = {}
    for name in os.listdir(_CSRC):
        with open(os.path.join(_CSRC, name), "rb") as f:
            sources[name] = f.read()
    return keyed_build_dir(sources)


def _load():
    if os.environ.get("MOEFLEET_CPU_KERNELS", "1") == "0":
        return None, "disabled by MOEFLEET_CPU_KERNELS=0"
    if platform.system() != "Linux":
        return None, f"built only on Linux (this is {platform.system()})"
    build_dir = _build_dir()
    # A finished build is loaded directly: torch's loader re-runs ninja under a file lock even
    # when nothing changed, which took seconds when a replica and its shards started together.
    finished = os.path.join(build_dir, "finished")
    if os.path.exists(finished):
        torch.ops.load_library(os.path.join(build_dir, f"{_LIBRARY}.so"))
    else:
        log.warning("building moefleet's CPU kernels for this machine (once; ~15 s) in %s", build_dir)
        compile_library(_LIBRARY, _sources(), build_dir)
        with open(finished, "w") as f:  # after the link: the library is whole
            f.write(torch.__version__)
    return torch.ops.moefleet, ""


def cpu_ops():
    """torch.ops.moefleet once the extension is loaded (building it if needed), else None."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                try:
                    _state["ops"], _state["why"] = _load()
                except Exception as exc:  # no compiler, no ninja, a compile error: the references serve
                    lines = str(exc).splitlines() or [""]
                    errors = [line.strip() for line in lines if "error" in line.lower()][-1:]  # the compiler's own words
                    _state["ops"], _state["why"] = None, f"{type(exc).__name__}: {' / '.join([lines[0][:200]] + errors)}"
                    log.warning("moefleet CPU kernels unavailable, using the torch references (%s)", _state["why"])
    return _state["ops"]


def unavailable_reason() -> str:
    """Why cpu_ops() is None ('' when the kernels are loaded)."""
    cpu_ops()
    return str(_state["why"])
