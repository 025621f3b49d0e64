"""The floor plan: each top-level folder is one layer or one role and imports only downward."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top. A package may import its own modules and any package of a lower layer; packages
# of one layer (the three roles, for instance) never import each other.
LAYERS = [
    ["common"],
    ["diffusion", "protocol", "datasets"],
    ["engine"],
    ["broker", "worker", "node"],
    ["evaluation", "system"],
    ["tools"],
    ["cli"],
]
LAYER = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def imported_packages(path: Path) -> set[str]:
    """The collafuse packages a module imports (at any depth: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "collafuse" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_module_imports_upward_or_sideways():
    wrong = []
    for package in LAYER:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target in imported_packages(path) - {package}:
                if target not in LAYER:
                    wrong.append(f"{path.relative_to(ROOT)} imports unknown package collafuse.{target}")
                elif LAYER[target] >= LAYER[package]:
                    wrong.append(f"{path.relative_to(ROOT)} imports collafuse.{target} (layer {LAYER[target]} ≥ {LAYER[package]})")
    assert not wrong, "\n".join(wrong)


def test_every_top_level_package_is_placed_and_none_is_named_like_the_distribution():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYER)
    assert not (ROOT / "collafuse").exists()


def test_the_package_imports_from_the_repository_root():
    import subprocess
    import sys

    code = "import collafuse.engine.simulate, collafuse.cli.main, collafuse.diffusion.schedule"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
