"""Dependencies point one way: a module of sawtrt imports only its own layer or lower ones.

The order, low to high ('<' between layers, ',' between the packages of one layer):
"""
from __future__ import annotations

import ast
import pathlib

import pytest

LAYERS = """spec, hadamard < quant < kv_cache < reference < kernels < models, data, calibration
< engine < serving, trt < build, eval, bench, studies, kv_plan < cli < __main__"""
__doc__ += LAYERS

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sawtrt"


def layer_ranks(text: str = LAYERS) -> dict[str, int]:
    return {name.strip(): rank for rank, group in enumerate(text.split("<"))
            for name in group.split(",")}


def imported(node: ast.AST, parts: tuple[str, ...]) -> list[str]:
    """The top-level sawtrt names (subpackage or module) one AST node imports. Relative imports
    are resolved against the module's package; a "sawtrt.x" string constant counts (importlib)."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            pkg = list(parts[:-1])
            base = pkg[:len(pkg) - (node.level - 1)]
            mod = base + (node.module.split(".") if node.module else [])
            return [mod[0]] if mod else [a.name for a in node.names]
        if node.module and node.module.startswith("sawtrt."):
            return [node.module.split(".")[1]]
        if node.module == "sawtrt":
            return [a.name for a in node.names]
    elif isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("sawtrt.")]
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
            and node.value.startswith("sawtrt."):
        return [node.value.split(".")[1]]
    return []


def backward_imports(root: pathlib.Path, ranks: dict[str, int] | None = None) -> list[str]:
    """"path:line me -> higher" for every import of a higher layer, and "path unplaced" for a
    module or subpackage the order does not name."""
    ranks = ranks or layer_ranks()
    bad = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).with_suffix("").parts
        me = parts[0]
        if me == "__init__":
            continue
        if me not in ranks:
            bad.append(f"{p.relative_to(root)} unplaced: add {me!r} to the layer order")
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            for name in imported(node, parts):
                if name in ranks and ranks[name] > ranks[me]:
                    bad.append(f"{p.relative_to(root)}:{node.lineno} {me} -> {name}")
    return sorted(set(bad))


def test_no_module_imports_a_higher_layer():
    assert backward_imports(ROOT) == []


@pytest.mark.parametrize("module,line,want", [
    ("kernels/ops.py", "from ..engine import llm_engine", "kernels -> engine"),
    ("engine/model_runner.py", "import sawtrt.serving.backend", "engine -> serving"),
    ("models/model.py", "from sawtrt.eval import kvquant", "models -> eval"),
    ("engine/llm.py", "import importlib; importlib.import_module('sawtrt.trt.runtime')",
     "engine -> trt"),
    ("spec.py", "from .kernels import library", "spec -> kernels"),
    ("kv_cache.py", "from . import reference", "kv_cache -> reference"),
    ("build/plan.py", "from ..cli import main", "build -> cli"),
])
def test_a_planted_backward_import_is_found(tmp_path, module, line, want):
    """The check is not vacuous: a copy of the package with one backward import planted (at
    module level, inside a function, relative, absolute, an importlib string) fails it."""
    import shutil
    copy = tmp_path / "sawtrt"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {line}\n")
    found = backward_imports(copy)
    assert any(f.startswith(module) and f.endswith(want) for f in found), found
    assert len(found) == 1, found


def test_an_unplaced_subpackage_is_reported(tmp_path):
    (tmp_path / "newthing").mkdir()
    (tmp_path / "newthing" / "x.py").write_text("from ..spec import KVPolicy\n")
    assert backward_imports(tmp_path) == ["newthing/x.py unplaced: add 'newthing' to the layer "
                                          "order"]

