import subprocess
import sys

CORE = [
    "shortcut_unlearning",
    "shortcut_unlearning.masks",
    "shortcut_unlearning.data.synthetic",
    "shortcut_unlearning.data.folders",
    "shortcut_unlearning.files",
    "shortcut_unlearning.figures",
    "shortcut_unlearning.cli",
    "shortcut_unlearning.model",
    "shortcut_unlearning.training",
    "shortcut_unlearning.unlearning",
    "shortcut_unlearning.metrics",
    "shortcut_unlearning.saliency",
    "shortcut_unlearning.experiment",
    "shortcut_unlearning.benchmarks",
]


def test_core_imports_no_qt():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
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
