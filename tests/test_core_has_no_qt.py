import pkgutil
import subprocess
import sys

import shortcut_unlearning

# Every module of the package outside the napari layer: the core the plugin's design rests on.
CORE = [
    module.name
    for module in pkgutil.walk_packages(shortcut_unlearning.__path__, "shortcut_unlearning.")
    if not module.name.startswith("shortcut_unlearning.napari")
]


def test_the_core_lists_every_module_outside_the_napari_layer():
    assert {"shortcut_unlearning.workbench", "shortcut_unlearning.unlearning.relearn"} <= set(CORE)


def test_core_imports_no_qt():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in ["shortcut_unlearning", *CORE])
        + "qt = [m for m in sys.modules if m.split('.')[0] in "
        "('PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'napari')]\n"
        "print(qt)\n"
        "sys.exit(1 if qt else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
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
