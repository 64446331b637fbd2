"""The house's layers, checked with import-linter (contracts in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout


def test_no_module_over_450_lines_and_no_class_over_300():
    """The house's size limits (issue 12): a room that grows past them holds several jobs."""
    import ast

    too_big = []
    for path in sorted((ROOT / "qmagic").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n")
        if lines > 450:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                too_big.append(f"{path.relative_to(ROOT)}: class {node.name}, "
                               f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "\n".join(too_big)


def test_every_module_is_in_the_readme_layout():
    """README's *Layout* is the maintainer's map of the house: each module of qmagic/ has its
    line there, under its folder (a module left off it is a room nobody knows of)."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("\n## Layout"):]
    layout = layout[:layout.index("\n```", layout.index("```") + 3)]
    listed, folders = set(), []
    for line in layout.splitlines():
        m = re.match(r"( *)(\S+)", line)
        if not m or m.group(2) == "```":
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name)
        elif name.endswith(".py"):
            listed.add("".join(folders) + name)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "qmagic").rglob("*.py")
               if p.name != "__init__.py" or p.parent == ROOT / "qmagic"}  # (a folder's line: its package)
    assert sorted(modules - listed) == [], "modules missing from README's Layout"
    assert sorted(m for m in listed - modules if m.startswith("qmagic/")) == [], "listed, not in qmagic/"
