"""Rules read off the package's source: its modules import each other without cycles and only
downwards through the layers the README lists (bottom to top); every zip() compares lengths."""
import ast
from pathlib import Path

import pytest

import sdcn_trt

PACKAGE = Path(sdcn_trt.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (top level or in functions)."""
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "sdcn_trt" and (found := resolve(target)) and found != module:
                    graph[module].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


# bottom to top; a module may import from its own layer or a lower one (sub-packages count as one module)
LAYERS = [
    ["errors", "cache", "progress", "schedule", "samplers"],
    ["config", "preprocess", "images"],
    ["models"],  # weights in, torch modules out
    ["export"],
    ["engines"],
    ["pipeline"],
    ["scoring"],
    ["batch", "demo", "contest"],
    ["sdcn_trt", "cli", "cli_options", "app"],  # the package's own __init__ (the public API), the command line
    # (cli_options: its shared flag groups), the web page
]

# inside a sub-package, the same rule between its modules (its __init__ may import any of them)
INNER_LAYERS = {
    "models": [["weights"], ["tokenizer", "components"], ["weights_cache", "networks"], ["single_file"],
               ["ldm_layout", "presets"], ["lora"]],
    "scoring": [["contest", "latency", "metrics", "pd", "report", "run"], ["tune_report"], ["tune"]],
    "batch": [["local"], ["ray"]],
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    short = parts[1] if len(parts) > 1 else parts[0]
    for level, names in enumerate(LAYERS):
        if short in names:
            return level
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's list)")


def inner_layer_of(module: str) -> int | None:
    """The module's layer inside its sub-package, None for modules of packages without inner layers
    and for a package's __init__ (which sits above its modules)."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] not in INNER_LAYERS:
        return None
    for level, names in enumerate(INNER_LAYERS[parts[1]]):
        if parts[2] in names:
            return level
    raise AssertionError(f"{module} is in no layer of {parts[1]}: add it to INNER_LAYERS (and to its __init__'s list)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for src, dsts in graph.items():
        for dst in dsts:
            if layer_of(dst) > layer_of(src):
                found.append(f"{src} -> {dst}")
            elif (src.split(".")[:2] == dst.split(".")[:2] and (a := inner_layer_of(src)) is not None
                  and (b := inner_layer_of(dst)) is not None and b > a):
                found.append(f"{src} -> {dst}")
    return sorted(found)


def test_every_module_has_a_layer_and_imports_only_downwards():
    assert upward_imports(import_graph()) == []


def test_an_upward_import_is_reported():
    graph = {"sdcn_trt.errors": {"sdcn_trt.cli"}, "sdcn_trt.cli": {"sdcn_trt.errors"}}
    assert upward_imports(graph) == ["sdcn_trt.errors -> sdcn_trt.cli"]
    with pytest.raises(AssertionError, match="sdcn_trt.nowhere is in no layer"):
        layer_of("sdcn_trt.nowhere")


def test_an_upward_import_inside_a_package_is_reported():
    graph = {"sdcn_trt.models.weights": {"sdcn_trt.models.lora"}, "sdcn_trt.models.lora": {"sdcn_trt.models.weights"},
             "sdcn_trt.models": {"sdcn_trt.models.lora"}}
    assert upward_imports(graph) == ["sdcn_trt.models.weights -> sdcn_trt.models.lora"]
    with pytest.raises(AssertionError, match="sdcn_trt.models.nowhere is in no layer of models"):
        inner_layer_of("sdcn_trt.models.nowhere")


def test_the_top_level_holds_only_the_listed_modules_and_packages():
    top = sorted(p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                 if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists())
    listed = sorted(name for names in LAYERS for name in names if name != "sdcn_trt")
    assert top == listed


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def zips_without_strict(source: str) -> list[int]:
    """Lines of zip(...) calls that would silently drop the longer input's tail."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "zip"
            and not any(k.arg == "strict" for k in node.keywords)]


def test_every_zip_in_the_package_compares_lengths():
    found = {str(path.relative_to(PACKAGE)): lines for path in PACKAGE.rglob("*.py")
             if (lines := zips_without_strict(path.read_text()))}
    assert found == {}, "zip() without strict=True (lengths unchecked) at: " + repr(found)


def test_a_zip_without_strict_is_found():
    assert zips_without_strict("a = 1\nfor x, y in zip(p, q):\n    pass\nzip(p, q, strict=True)\n") == [2]
