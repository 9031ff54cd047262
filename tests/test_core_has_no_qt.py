import ast
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import shortcut_unlearning

WIDGET_BENCHES = "shortcut_unlearning.bench.widget"
# Every module of the package outside the napari layer and the benches that drive it: the core
# the plugin's design rests on.
CORE = [
    module.name
    for module in pkgutil.walk_packages(shortcut_unlearning.__path__, "shortcut_unlearning.")
    if not module.name.startswith(("shortcut_unlearning.napari", WIDGET_BENCHES))
]
GUI = ("PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "napari")

# Imports the modules named in argv one by one and names the first that loads a GUI module.
CHECK = f"""
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    gui = sorted({{m.split(".")[0] for m in sys.modules}} & set({GUI!r}))
    if gui:
        sys.exit(f"{{name}} imports {{', '.join(gui)}}: the core must not load Qt or napari")
"""


HARNESS = "shortcut_unlearning.bench"
# The library: the core less the benchmark harness and the command line, whose `bench` command
# hands over to the harness.
LIBRARY = [m for m in CORE if not m.startswith((HARNESS, "shortcut_unlearning.cli"))]


def test_the_core_lists_every_module_outside_the_napari_layer():
    root = Path(shortcut_unlearning.__path__[0])
    files = {
        ".".join(("shortcut_unlearning", *path.relative_to(root).with_suffix("").parts))
        for path in root.rglob("*.py")
        if path.relative_to(root).parts[0] != "napari" and path.name != "__init__.py"
    }
    files.discard(WIDGET_BENCHES)  # drives the plugin: Qt by design
    assert "shortcut_unlearning.workbench" in files
    assert files <= set(CORE), f"modules the no-Qt check misses: {sorted(files - set(CORE))}"


def test_core_imports_no_qt():
    done = subprocess.run(
        [sys.executable, "-c", CHECK, "shortcut_unlearning", *CORE], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_safe_writer_imports_neither_qt_nor_torch():
    code = (
        "import sys\n"
        "import shortcut_unlearning.files\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'qtpy', 'napari')]\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def imported_by(module: str) -> set[str]:
    """Every module `module` imports, at its top or inside a function, by absolute name (for
    `from a import b`: both a and a.b)."""
    spec = importlib.util.find_spec(module)
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            base = importlib.util.resolve_name(base, package) if node.level else base
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return names


def test_the_library_imports_nothing_of_the_harness():
    assert len(LIBRARY) > 30 and "shortcut_unlearning.experiment" in LIBRARY
    harness = {
        module: sorted(n for n in imported_by(module) if n.startswith(HARNESS))
        for module in LIBRARY
    }
    assert not {module: names for module, names in harness.items() if names}


def test_only_the_bench_command_loads_the_harness():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LIBRARY)
        + "from shortcut_unlearning.cli import build_parser\n"
        "def harness():\n"
        f"    return [m for m in sys.modules if m.startswith({HARNESS!r})]\n"
        "build_parser().parse_args(['run', '--data', 'synthetic'])\n"
        "build_parser().parse_args(['train', '--out', 'model'])\n"
        "assert not harness(), harness()\n"
        "build_parser().parse_args(['bench', 'gpu'])\n"
        f"assert {HARNESS + '.cli'!r} in harness(), harness()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
