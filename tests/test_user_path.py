"""The plugin as a clinician meets it: a fresh process, napari first, the widget from the Plugins
menu, real mouse events on the canvas, buttons clicked (see user_path.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui  # napari and a display, in a fresh process

HERE = Path(__file__).parent


def run_fresh(args, env_home, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHORTCUT_UNLEARNING_HOME": str(env_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_clinicians_session_from_the_plugins_menu(tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    done = run_fresh([str(HERE / "user_path.py"), str(exports), "2"], tmp_path / "home")
    line = [x for x in done.stdout.splitlines() if x.startswith("SEEN ")]
    assert done.returncode == 0 and line, done.stdout[-2000:] + done.stderr[-4000:]
    seen = json.loads(line[-1][5:])
    assert seen["dock_visible"] and seen["ready"] and seen["mode"] == "erase"
    # The mouse stroke reached the forget set, undo and redo too.
    assert seen["erased_after_drag"] > 0 and seen["overlay_matches"]
    assert "1 of 12 images refined" in seen["stats_after_drag"]
    assert seen["erased_after_undo"] == 0
    assert seen["erased_after_redo"] == seen["erased_after_drag"]
    assert seen["refined_layers"] == 1
    # The eraser as it comes keeps to the band: a stroke along its middle erases no lesion.
    stroke = seen["band_stroke"]
    assert stroke["erased_band"] > 0 and stroke["erased_lesion"] == 0, stroke
    # At 1280 x 800 every control and line of the dock is within its width.
    for state in ("dock_fits_after_refine", "dock_fits_after_run"):
        needed, shown = seen[state]
        assert needed <= shown, f"{state}: the dock's content needs {needed} px, shows {shown}"
    # The run, its results, and the export of exactly what the dock showed.
    assert seen["finished"]
    assert seen["result_layers"] == ["images (after)", "predicted lesion", "saliency"]
    assert "Shown: run 1" in seen["current"]
    # The verdict leads in plain words; the numbers are one click away.
    assert seen["result_text"].splitlines()[1] == seen["verdict"]
    assert "nats" not in seen["result_text"] and "nats per pixel" in seen["details_text"]
    # The progress line names the method as the dock does, never by its code name.
    code_name, plain = seen["method"]
    assert not any(f"({code_name})" in line for line in seen["progress_lines"])
    assert any(f"({plain})" in line for line in seen["progress_lines"])
    # Accept, Revert and Export are in view at 1280 x 800, the numbers shown or not, and no
    # text in the dock is cut short.
    states = ("actions_in_view_after_refine", "actions_in_view")
    states += ("actions_in_view_with_details", "actions_in_view_certified")
    for state in states:
        for name, (whole, rect, dock) in seen[state].items():
            assert whole, f"{state}: {name} at {rect} is not in view in the dock of {dock}"
    assert seen["elided_after_run"] == seen["elided_with_details"] == []
    # A certified method's settings and its preview's details too.
    assert seen["certified_shown"] == ["Certified, gradient clip", True]
    assert seen["elided_certified"] == []
    assert seen["table_names_in_tooltips"] and seen["table_elides_middle"]
    (export,) = [p for p in exports.iterdir() if p.is_dir()]
    report = json.loads((export / "metrics.json").read_text())
    assert report["unlearned"]["s_global"]["value"] == seen["shown_after_s_global"]
    assert report["unlearning"]["accepted"] is False
    from safetensors.numpy import load_file

    weights = load_file(export / "model.safetensors")
    norm = sum(
        float((v.astype(np.float64) ** 2).sum())
        for k, v in weights.items()
        if "running" not in k and "num_batches" not in k
    )
    assert abs(norm - seen["shown_model_norm"]) < 1e-3 * norm
    assert len(list((export / "refined_masks").glob("*_segmentation.png"))) == 12
    # Revert leaves no result on screen and nothing to export; the current model is named.
    assert not set(seen["after_revert_layers"]) & {"saliency", "predicted lesion", "images (after)"}
    assert not seen["after_revert_overlay"]
    assert not seen["after_revert_export_enabled"]
    assert seen["after_revert_current"].startswith("Current model:")
    # An edit made right before closing napari is on disk.
    assert seen["closing_with_erased"] > 0
    saved = list((tmp_path / "home" / "data" / "autosave").glob("*/1.npy"))
    assert len(saved) == 1 and (np.load(saved[0]) == 0).sum() > 0


def test_the_dock_opens_without_importing_torch(tmp_path):
    code = (
        "import sys, napari\n"
        "import shortcut_unlearning.napari._widget, shortcut_unlearning.napari._io\n"
        "assert 'torch' not in sys.modules, 'torch imported with the widget module'\n"
        "print('ok')\n"
    )
    done = run_fresh(["-c", code], tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
