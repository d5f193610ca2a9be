"""The public API (`import moefleet`) and the promise that importing moefleet changes no
process-wide state: environment variables, warning filters, logging configuration."""

import inspect
import json
import os
import subprocess
import sys

import moefleet
from moefleet.cluster import errors

PUBLIC = {"LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Client", "AsyncClient", "ServeConfig",
          "ControllerConfig", "EngineConfig"}


def _python(code: str, *args: str, stdin: str = "") -> str:
    """Runs `code` in a fresh interpreter, without the RAY_ variables this test run sets (so a
    module that sets one, as RAY_AUTH_MODE once was, shows)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_moefleet_exports_the_api_and_every_error_type():
    error_types = {name for name, value in vars(errors).items()
                   if inspect.isclass(value) and issubclass(value, errors.MoefleetError)}
    assert set(moefleet.__all__) == PUBLIC | error_types
    exported = {name: getattr(moefleet, name) for name in moefleet.__all__}  # what `from moefleet import *` binds
    assert exported["ShardUnavailableError"] is errors.ShardUnavailableError
    assert exported["LLM"].__module__ == "moefleet.llm" and exported["AsyncClient"].__module__ == "moefleet.client"


def test_import_moefleet_loads_neither_torch_nor_grpc():
    loaded = _python("import sys, moefleet, moefleet.cluster.config.serve_config; "
                     "print(sorted({'torch', 'grpc', 'ray'} & set(sys.modules)))")
    assert loaded.strip() == "[]"


# Imports every moefleet module (and touches every export, which imports lazily); with "deps",
# prints the other modules that loaded; with "check", imports those first, so what the third-party
# libraries do at import is in the baseline, and prints what moefleet's own modules changed.
_PROBE = """
import importlib, json, logging, os, pkgutil, sys, warnings

def import_moefleet():
    import moefleet
    for name in moefleet.__all__:
        getattr(moefleet, name)
    for package in ("moefleet", "moefleet.cluster", "moefleet.actors", "moefleet.models", "moefleet.autoscaler",
                    "moefleet.kernels"):
        for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            importlib.import_module(module.name)

def state():
    default = repr((logging.NOTSET, [], True, False))
    loggers = {name: repr((logger.level, logger.handlers, logger.propagate, logger.disabled))
               for name, logger in logging.Logger.manager.loggerDict.items() if isinstance(logger, logging.Logger)}
    return {"environ": dict(os.environ), "warnings.filters": [repr(f) for f in warnings.filters],
            "root logger": repr((logging.root.level, logging.root.handlers, logging.root.manager.disable)),
            "loggers": {name: config for name, config in loggers.items() if config != default}}

if sys.argv[1] == "deps":
    import_moefleet()
    print(json.dumps([name for name in sys.modules if name.split(".")[0] != "moefleet"]))
else:
    for name in json.loads(sys.stdin.read()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # made by its parent package under a name it cannot be imported by
    before = state()
    import_moefleet()
    after = state()
    changed = {}
    for key, old in before.items():
        new = after[key]
        if isinstance(old, dict):
            changed[key] = {name: [old.get(name), new.get(name)] for name in old.keys() | new.keys()
                            if old.get(name) != new.get(name)}
        elif isinstance(old, list):
            changed[key] = {"added": [f for f in new if f not in old], "removed": [f for f in old if f not in new]}
        elif old != new:
            changed[key] = [old, new]
    print(json.dumps({key: change for key, change in changed.items()
                      if change and change != {"added": [], "removed": []}}))
"""


def test_importing_moefleet_changes_no_global_state():
    deps = _python(_PROBE, "deps")
    changed = json.loads(_python(_PROBE, "check", stdin=deps))
    assert changed == {}
