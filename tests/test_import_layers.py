"""Import direction inside `memshare`, read from the source with `ast` (nothing is imported).

Every `import` and `from ... import` of a memshare module counts: at module level, inside functions (a lazy import
is still a dependency), under `if TYPE_CHECKING:`, relative ones, and `importlib.import_module("memshare....")`
with a literal name. `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg` (its
`__init__`). The implicit import of parent packages is not an edge.

Asserted: (a) layering: a module imports only modules of its own layer or of lower ones (LAYERS); (b) no import
cycle among modules; (c) `sharing/` reaches the engine only through its policy seam.
"""

import ast
from collections import deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Module-name prefix -> (layer, rank). A module may import its own layer and layers of lower rank; layers of equal
# rank ("beside" each other) may not import each other. "memshare" is only the top-level __init__; a module that no
# entry covers fails the test until it is placed here.
LAYERS = {
    # The public API: its __init__ re-exports names of every layer below it, and nothing in the package imports it.
    "memshare": ("facade", 8),
    # The command line and the OpenAI server drive everything below (eval runs, engines, policies).
    "memshare.entrypoints": ("entrypoints", 7),
    # MemShare inside vLLM: runs sharing's policies on vLLM's engine core; beside the entrypoints, independent of them.
    "memshare.vllm_plugin": ("vllm_plugin", 7),
    # Datasets, comparison runs, reports and calibration: they build engines and sharing policies.
    "memshare.eval": ("eval", 6),
    # The policies: plugged into the engine through engine/policy.py's hooks; the engine never imports them.
    "memshare.sharing": ("sharing", 5),
    # Scheduler, block manager, model runner: runs a model over the paged KV cache.
    "memshare.engine": ("engine", 4),
    # Model loading and the lean forward passes, built from layers; the engine's runner owns them.
    "memshare.models": ("models", 3),
    # Attention, KV cache, sampler, kernels: tensors in, tensors out; they know no sequence or engine.
    "memshare.layers": ("layers", 2),
    # Plain definitions every layer may use: configs and their checks, errors, outputs, sampling parameters.
    "memshare.config": ("definitions", 1),
    "memshare.errors": ("definitions", 1),
    "memshare.outputs": ("definitions", 1),
    "memshare.sampling_params": ("definitions", 1),
}

# What sharing/ may import of the engine: the Protocols of the policy contract and the base policy.
SHARING_ENGINE_SEAM = {"memshare.engine.policy"}

def discover(root: Path, package: str = "memshare") -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package __init__) for every .py file under root/package."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _known(name: str, modules: dict) -> str | None:
    """`name` or its longest prefix that is a module."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def imports_of(name: str, modules: dict[str, tuple[Path, bool]], package: str = "memshare") -> set[str]:
    """The modules of `package` that module `name` imports."""
    path, is_package = modules[name]
    current = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {_known(alias.name, modules) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = current[: len(current) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in modules else _known(source, modules))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets.add(_known(node.args[0].value, modules))
    return {t for t in targets if t and t != name and (t == package or t.startswith(package + "."))}


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    modules = discover(root)
    return {name: imports_of(name, modules) for name in modules}


def layer_of(module: str) -> tuple[str, int]:
    if module == "memshare":
        return LAYERS["memshare"]
    keys = [k for k in LAYERS if k != "memshare" and (module == k or module.startswith(k + "."))]
    if not keys:
        pytest.fail(f"{module} is in no layer: add it to LAYERS in tests/test_import_layers.py")
    return LAYERS[max(keys, key=len)]


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(a shortest cycle, every module of its component) per strongly connected component of more than one module
    or a module importing itself (Tarjan, then BFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        start = min(component)
        parent = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            if start in graph[node]:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                cycles.append(([*reversed(path), start], sorted(component)))
                break
            for succ in sorted(graph[node] & component):
                if succ not in parent:
                    parent[succ] = node
                    queue.append(succ)
    return cycles


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_parser_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "memshare"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from memshare.sub import a\n")
    (pkg / "top.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nimport importlib\nimport os\nfrom . import b\nfrom .. import top\n"
        "if TYPE_CHECKING:\n    from memshare.sub.c import Thing\n"
        "def lazy():\n    import memshare.top\n    return importlib.import_module('memshare.sub.c')\n")
    (pkg / "sub" / "b.py").write_text("from .c import name\nfrom memshare.sub import helper\n")
    (pkg / "sub" / "c.py").write_text("from memshare import top\n")
    graph = import_graph(tmp_path)
    assert graph == {"memshare": {"memshare.sub.a"}, "memshare.top": set(), "memshare.sub": set(),
                     "memshare.sub.a": {"memshare.sub.b", "memshare.top", "memshare.sub.c"},
                     "memshare.sub.b": {"memshare.sub.c", "memshare.sub"}, "memshare.sub.c": {"memshare.top"}}
    assert find_cycles({"x": {"y"}, "y": {"z", "x"}, "z": {"x"}, "w": set()}) == [(["x", "y", "x"], ["x", "y", "z"])]
    assert find_cycles({"w": {"w"}}) == [(["w", "w"], ["w"])]


def test_every_module_sits_in_a_layer(graph):
    assert "memshare.layers.sampler" in graph and "memshare.engine.model_runner" in graph
    for module in graph:
        layer_of(module)


def test_lower_layers_never_import_upper_ones(graph):
    violations = []
    for module, targets in sorted(graph.items()):
        layer, rank = layer_of(module)
        for target in sorted(targets):
            target_layer, target_rank = layer_of(target)
            if target_layer != layer and target_rank >= rank:
                violations.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{' -> '.join(cycle)} (all of {', '.join(component)} import each other, directly or not)"
        for cycle, component in cycles)


def test_sharing_reaches_the_engine_only_through_the_policy_seam(graph):
    crossings = [f"{module} imports {target}" for module, targets in sorted(graph.items())
                 if module.startswith("memshare.sharing") for target in sorted(targets)
                 if target.startswith("memshare.engine") and target not in SHARING_ENGINE_SEAM]
    assert not crossings, "sharing/ reaches past the policy Protocols into the engine:\n" + "\n".join(crossings)

