"""Package boundaries are the architecture: imports go one way, and serving loads only what serving needs.

Direction (a package may import those to its right, never the reverse):
    nirvana_cli → nirvana_dev → nirvana_export → nirvana (engine)        nirvana_client: tritonclient only
    nirvana_dev → nirvana_sim (replica-pool simulator) → nirvana_client (its routing policies)
    nirvana_quality (research) → nirvana_cli, nirvana_dev, nirvana
Each check imports real modules in a fresh interpreter, with the packages a module must not reach made
unimportable, so an import hidden inside a function that runs at import time is caught too.

Inside the engine (`nirvana`) each concept has one place, and its parts (subpackages and top-level modules) import
one another without a circle: the tensor contract in `contract/`, LoRA and ControlNet in `addons/` below the
runtimes, calibration in `calibration/` (and `nirvana_cli.calibration`), the cache seam by role (`cache.wire`,
`cache.endpoint`, `runtime.cache_client`), the similarity → K choice in `k_choice`.
"""

from __future__ import annotations

import ast
import graphlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "nirvana": ROOT / "python_backend" / "nirvana",
    "nirvana_cli": ROOT / "python_backend" / "nirvana_cli",
    "nirvana_dev": ROOT / "python_backend" / "nirvana_dev",
    "nirvana_quality": ROOT / "python_backend" / "nirvana_quality",
    "nirvana_export": ROOT / "export" / "nirvana_export",
    "nirvana_client": ROOT / "client" / "nirvana_client",
    "nirvana_sim": ROOT / "client" / "nirvana_sim",
}
# package → our packages it may import (at module level or inside functions)
ALLOWED = {
    "nirvana": set(),
    "nirvana_export": {"nirvana"},
    "nirvana_client": set(),
    "nirvana_sim": {"nirvana_client"},
    "nirvana_dev": {"nirvana", "nirvana_export", "nirvana_client", "nirvana_sim"},
    "nirvana_cli": {"nirvana", "nirvana_export", "nirvana_dev"},
    "nirvana_quality": {"nirvana", "nirvana_cli", "nirvana_dev"},
}
# What the client may import besides the standard library and itself: its declared dependencies.
CLIENT_DEPS = {"tritonclient", "numpy", "typer", "rich", "PIL", "matplotlib", "tqdm", "pyarrow"}
# Research, report and dev packages that the server must never load.
NOT_FOR_SERVING = ("nirvana_quality", "nirvana_client", "nirvana_dev", "skimage", "matplotlib", "pandas")

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not importable here (architecture test)")
sys.meta_path.insert(0, Block())
"""


def _modules(package: str) -> list[str]:
    found = [package]
    for info in pkgutil.walk_packages([str(PACKAGES[package])], prefix=f"{package}."):
        found.append(info.name)
    return found


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level names each module of `package` imports anywhere in its source (functions included)."""
    result = {}
    for path in PACKAGES[package].rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        result[str(path.relative_to(ROOT))] = names
    return result


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    script = f"BLOCKED = {sorted(blocked)!r}\n" + BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_sources_import_only_the_packages_below_them(package: str) -> None:
    ours = set(PACKAGES)
    wrong = {
        module: sorted((names & ours) - ALLOWED[package] - {package})
        for module, names in _imported_packages(package).items()
        if (names & ours) - ALLOWED[package] - {package}
    }
    assert not wrong, f"{package} imports packages above it: {wrong}"


def test_client_imports_only_tritonclient_stdlib_and_its_declared_deps() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = {
        module: sorted(names - stdlib - CLIENT_DEPS - {"nirvana_client"})
        for module, names in _imported_packages("nirvana_client").items()
        if names - stdlib - CLIENT_DEPS - {"nirvana_client"}
    }
    assert not wrong, wrong


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_module_imports_with_the_packages_above_it_unimportable(package: str) -> None:
    blocked = set(PACKAGES) - ALLOWED[package] - {package}
    code = f"""
    import importlib
    for name in {_modules(package)!r}:
        importlib.import_module(name)
    """
    done = _run(code, blocked)
    assert done.returncode == 0, done.stderr[-3000:]


def _loaded_by(modules: str) -> set[str]:
    done = _run(f"import sys\nimport {modules}\nprint(sorted({{m.split('.')[0] for m in sys.modules}}))", set())
    assert done.returncode == 0, done.stderr[-3000:]
    return set(eval(done.stdout.strip().splitlines()[-1]))


def test_serving_loads_no_research_client_or_report_library() -> None:
    """What the orchestrator and sub-model stubs import: BLS glue, ONNX and torch glue, the request path. They
    reach Milvus only through the `cache` model, so they do not load pymilvus (which imports pandas) either."""
    loaded = _loaded_by(
        "nirvana.serving.bls_model, nirvana.serving.onnx_model, nirvana.serving.torch_model, nirvana.pipeline"
    )
    assert not loaded & {*NOT_FOR_SERVING, "pymilvus"}, sorted(loaded & {*NOT_FOR_SERVING, "pymilvus"})


def test_cache_model_loads_milvus_but_no_research_or_client_library() -> None:
    loaded = _loaded_by("nirvana.serving.cache_model")
    assert "pymilvus" in loaded  # the one owner of the Milvus connection (pymilvus imports pandas itself)
    assert not loaded & {*NOT_FOR_SERVING} - {"pandas"}, sorted(loaded & set(NOT_FOR_SERVING))


def test_product_modules_stay_short() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for package in ("nirvana", "nirvana_cli")
        for p in PACKAGES[package].rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 350
    }
    assert not long, f"modules over 350 lines: {long}"


def _engine_imports() -> dict[str, set[str]]:
    """Each `nirvana` module (dotted) → the `nirvana` modules it imports anywhere in its source."""
    root = PACKAGES["nirvana"]
    modules = {
        ".".join(("nirvana", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found.update(n for n in names if n in modules and n != name)
        edges[name] = found
    return edges


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_engine_parts_import_one_another_without_a_circle() -> None:
    graph: dict[str, set[str]] = {}
    for module, targets in _engine_imports().items():
        graph.setdefault(_part(module), set()).update(_part(t) for t in targets if _part(t) != _part(module))
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"engine parts import in a circle: {' -> '.join(err.args[1])}")


def test_each_engine_concept_has_one_place() -> None:
    edges = _engine_imports()
    top = {m.split(".")[1] for m in edges if m.count(".") == 1}
    assert not {m for m in top if "spec" in m or "contract" in m} - {"contract"}, "contract files outside contract/"
    scattered = {m for m in top if m.startswith(("calibrat", "lora", "adapter", "controlnet", "variant"))}
    assert scattered == {"calibration"}, f"add-on or calibration modules outside their package: {scattered}"
    below = {
        m: sorted(t for t in ts if t.startswith(("nirvana.runtime", "nirvana.serving", "nirvana.pipeline")))
        for m, ts in edges.items()
        if m.startswith("nirvana.addons")
    }
    assert not any(below.values()), f"add-ons import the layers above them: {below}"
    assert not {t for t in edges["nirvana.config"] if t.startswith("nirvana.cache")}, "config imports the cache"
    k_classes = {m for m, path in _sources("nirvana").items() if "class KSelector" in path}
    assert k_classes == {"nirvana/k_choice.py"}, k_classes
    seam = {m for m, ts in edges.items() if "nirvana.cache.wire" in ts}
    assert seam == {
        "nirvana.cache.endpoint",
        "nirvana.runtime.cache_client",
        "nirvana.runtime.bls_denoiser",
        "nirvana.serving.cache_model",
        "nirvana.serving.scheduler_model",
    }, seam


def _sources(package: str) -> dict[str, str]:
    root = PACKAGES[package]
    return {str(p.relative_to(root.parent)): p.read_text() for p in root.rglob("*.py")}
