"""The import rules of docs/architecture.md, read from the source: every import statement of
every module (function-local ones included), followed transitively through the project's own
modules. No import machinery runs, so a rule broken behind a lazy import is caught too."""

import ast
import sys
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY_SERVICES = {"ray", "redis", "grpc"}


def _package_dirs() -> dict[str, Path]:
    """Import package -> folder, as pyproject maps them (moefleet.cluster -> cluster/, ...)."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {package: ROOT / folder for package, folder in dirs.items()}


@cache
def modules() -> dict[str, Path]:
    """Every project module by dotted name (packages by their __init__)."""
    found = {}
    for package, folder in _package_dirs().items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
                continue
            found[".".join([package, *parts])] = path
    return found


@cache
def imports_of(module: str) -> frozenset[str]:
    """Dotted names `module` imports: project modules resolved to the deepest module that exists,
    others as written."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base)
    return frozenset(_resolve(name) for name in out)


def _resolve(name: str) -> str:
    """A project name to the deepest existing module (moefleet.x.y.Cls -> moefleet.x.y)."""
    while name not in modules() and "." in name and name.startswith("moefleet"):
        name = name.rpartition(".")[0]
    return name


@cache
def reachable(module: str) -> frozenset[str]:
    """Everything importing `module` imports, through project modules and their parent packages
    (but the root package: moefleet/__init__.py is the public API's facade, which loads its
    exports lazily, not a dependency of the parts)."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        for name in imports_of(current):
            chain = [".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 2)] or [name]
            for step in chain:
                if step not in seen:
                    seen.add(step)
                    if step in modules():
                        todo.append(step)
    return frozenset(seen)


def under(prefix: str) -> list[str]:
    return sorted(m for m in modules() if m == prefix or m.startswith(prefix + "."))


def test_the_reader_sees_imports_it_must_see():
    """The rules below pass only if the reader works: check it finds known edges, lazy ones too."""
    assert "moefleet.cluster.experts.dispatcher" in imports_of("moefleet.cluster.engine.llm_engine")
    assert "ray" in imports_of("moefleet.cluster.experts.remote_backend")
    assert "ray" in reachable("moefleet.actors.replica")
    assert len(under("moefleet.cluster")) > 30


def test_cluster_never_imports_actors_or_entry_points():
    entry_points = ("moefleet.actors", "moefleet.llm", "moefleet.serve", "moefleet.cli")
    broken = {m: sorted(i for i in imports_of(m) if i.startswith(entry_points))
              for m in under("moefleet.cluster") + under("moefleet.autoscaler")}
    assert {m: b for m, b in broken.items() if b} == {}


def test_placement_routing_and_policies_import_only_numpy_and_the_standard_library():
    pure_packages = ("moefleet.cluster.placement", "moefleet.cluster.routing", "moefleet.cluster.workload")
    pure = [m for package in pure_packages for m in under(package)]
    pure += [m for m in under("moefleet.autoscaler") if m.endswith("_rule")]
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    broken = {}
    for module in pure:
        bad = [name for name in imports_of(module)
               if name.split(".")[0] not in allowed and not name.startswith(pure_packages)]
        if bad:
            broken[module] = sorted(bad)
    assert broken == {}


def test_the_autoscaling_policy_and_its_simulator_reach_only_numpy_pydantic_and_yaml():
    """The policy file, the policies and the simulator run in the controller and offline alike: through every
    project module they import, nothing but the standard library, numpy, pydantic and yaml (no torch, Ray,
    Redis or gRPC)."""
    pure = ["moefleet.autoscaler." + name for name in ("policy_file", "signals", "predictor", "policy",
                                                       "queue_length_policy", "performance_model", "simulator")]
    allowed = set(sys.stdlib_module_names) | {"numpy", "pydantic", "yaml"}
    broken = {m: sorted(n for n in reachable(m) if not n.startswith("moefleet") and n.split(".")[0] not in allowed)
              for m in pure}
    assert {m: b for m, b in broken.items() if b} == {}
    assert "moefleet.cluster.placement.planner" in reachable("moefleet.autoscaler.simulator")


def test_the_engine_never_reaches_ray_redis_or_grpc():
    broken = {m: sorted(n for n in reachable(m) if n.split(".")[0] in HEAVY_SERVICES)
              for m in under("moefleet.cluster.engine")}
    assert {m: b for m, b in broken.items() if b} == {}


def test_the_gateway_never_imports_engine_internals():
    broken = {m: sorted(n for n in reachable(m) if n.startswith("moefleet.cluster.engine"))
              for m in under("moefleet.cluster.gateway")}
    assert {m: b for m, b in broken.items() if b} == {}
