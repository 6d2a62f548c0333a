"""The layer rule, enforced: a lower layer never imports a higher one.

From the bottom up (CONTRIBUTING.md): engine <- operators <- ess <- probes (the capture layer) <-
{layers, watch} <- integrations <- {tools, demo} <- cli. Modules of one layer may import each other; ``layers``
and ``watch`` are siblings and import neither each other. ``_version`` is a leaf anyone may
import. The graph is read from the source with ``ast`` (every ``import``, also inside
functions, and every string literal that names an ``esswatch`` module, which catches
``importlib.import_module`` by name), so it sees ``integrations/``, which lives at the top
of the repository but installs as ``esswatch.integrations``: import-linter's graph builder
only scans the package's own folder and would miss it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: (layer name, rank): a module may import modules of its own rank or lower
LAYERS = {
    "_version": 0,
    "engine": 1,
    "operators": 2,
    "ess": 3,
    "probes": 4,
    "layers": 5,
    "watch": 5,
    "integrations": 6,
    "tools": 7,
    "demo": 7,
    "cli": 8,
}
SIBLINGS = {frozenset({"layers", "watch"})}
NAME_IN_STRING = re.compile(r"^esswatch(\.[A-Za-z_][A-Za-z0-9_]*)+$")
#: names the package root re-exports, and the module each comes from
ROOT_EXPORTS = {
    "entropy_ess": "esswatch.ess",
    "tolerance_ess": "esswatch.ess",
    "operators": "esswatch.operators",
    "capture": "esswatch.probes",
    "ESSWatch": "esswatch.watch",
    "Regularizer": "esswatch.watch",
    "__version__": "esswatch._version",
}


def _modules():
    """(dotted name, path) of every module of the package."""
    for base, prefix in ((ROOT / "esswatch", "esswatch"), (ROOT / "integrations", "esswatch.integrations")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([prefix, *parts]), path


MODULES = {m for m, _ in _modules()}


def _layer(module: str):
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package root: re-exports only, not a layer
    return parts[1]


def _imports(module: str, path: Path):
    """Every esswatch module ``module`` names: imports (anywhere in the file) and string literals."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from . import x` may name a submodule or a re-export
                sub = f"{target}.{a.name}"
                if sub in MODULES:
                    yield sub, node.lineno
                elif target == "esswatch":
                    yield ROOT_EXPORTS.get(a.name, target), node.lineno
                else:
                    yield target, node.lineno
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and NAME_IN_STRING.match(node.value)
            and node.value in MODULES
        ):
            yield node.value, node.lineno


def _allowed(src: str, dst: str) -> bool:
    if src == dst or src is None or dst is None:
        return True
    if dst not in LAYERS or src not in LAYERS:
        return False
    if frozenset({src, dst}) in SIBLINGS:
        return False
    return LAYERS[dst] <= LAYERS[src]


def test_every_top_level_module_has_a_layer():
    names = {_layer(m) for m, _ in _modules()} - {None}
    assert names <= set(LAYERS), f"modules outside the layer map: {sorted(names - set(LAYERS))}"


def test_no_import_goes_up_a_layer():
    bad = []
    for module, path in _modules():
        src = _layer(module)
        for target, line in _imports(module, path):
            if not target.startswith("esswatch."):
                continue
            dst = _layer(target)
            if not _allowed(src, dst):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({src}) -> {target} ({dst})")
    assert not bad, "imports against the layer rule:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize(
    "src,dst,ok",
    [
        ("watch", "engine", True),
        ("engine", "watch", False),
        ("layers", "watch", False),
        ("watch", "layers", False),
        ("integrations", "watch", True),
        ("probes", "integrations", False),
        ("cli", "tools", True),
        ("tools", "cli", False),
        ("engine", "_version", True),
    ],
)
def test_the_rule_itself(src, dst, ok):
    assert _allowed(src, dst) is ok
