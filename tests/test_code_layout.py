"""The package's shape: no import cycle inside `lerobot_ki/`, and the README's "How the code is laid out"
table names exactly the package's files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lerobot_ki", "lerobot_policy_ki_vla")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The lerobot_ki modules `path` imports at module level or inside functions (all are edges)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lerobot_ki"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lerobot_ki"))
    return found


def test_lerobot_ki_has_no_import_cycle():
    files = {_module_name(p): p for p in (ROOT / "lerobot_ki").rglob("*.py")}
    # Importing a module runs its package's __init__ first; that edge is implied, not listed.
    graph = {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}
    assert graph["lerobot_ki.modeling_ki"], "the parser found no edges: the test would prove nothing"
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_readme_lists_every_file_of_the_package():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.MULTILINE))
    files = {
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if p.name != "__init__.py" or p.parent.name in PACKAGES
    }
    assert listed == files, (sorted(files - listed), sorted(listed - files))


def test_one_list_of_rendering_packages():
    """record_dataset.py's hint, scripts/setup_env.sh's install and README name the same Debian packages."""
    recorder = (ROOT / "examples" / "metaworld" / "record_dataset.py").read_text()
    packages = re.search(r'^EGL_PACKAGES = "([^"]+)"', recorder, flags=re.MULTILINE).group(1)
    assert "libegl1" in packages
    assert f'EGL_PACKAGES="{packages}"' in (ROOT / "scripts" / "setup_env.sh").read_text()
    assert f"`{packages}`" in (ROOT / "README.md").read_text()
