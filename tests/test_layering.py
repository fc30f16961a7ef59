"""The import rule of the three layers, checked once for the whole tree (DESIGN.md, "Layers"):
``specvlm`` imports neither ``actors`` nor ``pipelines`` nor ``ray``; ``actors`` does not import ``pipelines``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"specvlm": {"ray", "actors", "pipelines"}, "actors": {"pipelines"}}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, module level or inside functions (lazy imports)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_layer_imports_a_layer_above_it():
    bad = []
    for layer, forbidden in FORBIDDEN.items():
        files = sorted((ROOT / layer).rglob("*.py"))
        assert files, layer
        bad += [f"{p.relative_to(ROOT)} imports {sorted(imported_roots(p) & forbidden)}" for p in files
                if imported_roots(p) & forbidden]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_importing_every_specvlm_module_loads_no_ray():
    code = (
        "import pkgutil, sys, importlib, specvlm\n"
        "for m in pkgutil.walk_packages(specvlm.__path__, 'specvlm.'): importlib.import_module(m.name)\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'ray', 'actors', 'pipelines'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
