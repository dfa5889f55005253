"""The package's shape, checked from its source: subpackages import each other in one direction only (no cycles),
no stage imports the CLI, and manifest JSON is read and written by canvasrt.core.manifest alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "canvasrt"
# Lowest first; each may import only those before it (and the standard library / third parties).
LAYERS = ["core", "model", "exporter", "builder", "runtime", "validation", "calibration", "serving", "cli"]


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def imported(module: str, path: Path) -> set[str]:
    """canvasrt modules that `module` imports, anywhere in its body (lazy imports count too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("canvasrt")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("canvasrt"):
                found.add(name)
    return found


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def subpackage_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for module, path in modules().items():
        source = subpackage(module)
        for target in map(subpackage, imported(module, path)):
            if source and target and target != source:
                edges[source].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


ENTRY = ("canvasrt", "canvasrt.__main__")  # the package and its command-line entry point, above every layer


def test_every_module_belongs_to_a_layer():
    strays = [m for m in modules() if m not in ENTRY and subpackage(m) is None]
    assert strays == []


def test_subpackages_import_each_other_without_cycles():
    assert find_cycle(subpackage_edges()) is None


def test_each_layer_imports_only_layers_below_it():
    upward = [
        (src, dst)
        for src, targets in subpackage_edges().items()
        for dst in targets
        if LAYERS.index(dst) > LAYERS.index(src)
    ]
    assert upward == []


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"core": {"runtime"}, "runtime": {"calibration"}, "calibration": {"core"}}) == [
        "calibration",
        "core",
        "runtime",
        "calibration",
    ]
    assert find_cycle({"core": set(), "runtime": {"core"}}) is None


def test_no_stage_imports_the_cli():
    offenders = [
        m
        for m, p in modules().items()
        if m not in ENTRY and subpackage(m) != "cli" and any(subpackage(name) == "cli" for name in imported(m, p))
    ]
    assert offenders == []


# A manifest dict indexed by one of its top-level keys, or its JSON parsed outside the manifest module.
MANIFEST_ACCESS = re.compile(
    r"""manifest\w*(\[|\.get\()["'](model|capacity|graphs|engines|kv_layout|quantization|generation|dtype|moe|key|"""
    r"""precision|checkpoint|tokenizer|config_digest|format)["']"""
)


@pytest.mark.parametrize("pattern", [MANIFEST_ACCESS])
def test_only_the_manifest_module_reads_manifest_dicts(pattern):
    offenders = []
    for module, path in modules().items():
        if module == "canvasrt.core.manifest":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) or ("json.loads" in line and "manifest" in line.lower()):
                offenders.append(f"{module}:{number}: {line.strip()}")
    assert offenders == []
    assert pattern.search('x = manifest["capacity"]["canvas"]') and pattern.search("manifest.get('quantization')")
