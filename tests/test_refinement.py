"""The clinician's masks without Qt: forget set, sync after any edit, autosave and restore."""

import numpy as np
import pytest

from shortcut_unlearning.masks import MaskError
from shortcut_unlearning.refinement import Refinement


def stack(n=3, size=16):
    coarse = np.zeros((n, size, size), np.uint8)
    coarse[:, 4:12, 4:12] = 1
    coarse[1, 4:12, 4:12] = 2
    return coarse


def test_sync_finds_every_changed_image_and_autosaves_only_those(tmp_path):
    r = Refinement(stack())
    r.refined[1, 4, 4:8] = 0  # an erase, reported or not
    assert r.sync(None, tmp_path) == [1]
    assert r.forget[1].sum() == 4 and not r.forget[[0, 2]].any()
    (saved,) = (tmp_path / r.key).glob("*.npy")
    assert saved.name == "1.npy"
    assert r.sync([0, 1, 2], tmp_path) == []  # nothing new
    r.refined[1, 4, 4:8] = 2  # undo: the pixels come back
    assert r.sync([1], tmp_path) == [1] and not r.forget.any()
    np.testing.assert_array_equal(np.load(saved), r.coarse[1])


def test_restore_brings_the_edits_back_and_keeps_labels_above_255(tmp_path):
    coarse = stack()
    first = Refinement(coarse, coarse.astype(np.int32))
    first.refined[0, 5, 5:9] = 0
    first.refined[2, 6, 6] = 300  # a label the uint8 masks cannot hold
    first.sync(None, tmp_path)
    again = Refinement(coarse)
    note = again.restore(tmp_path)
    assert "Restored" in note and "2 images" in note
    assert again.refined[2, 6, 6] == 300 and again.forget[0].sum() == 4
    assert again.sync(None) == []  # what was restored counts as saved
    assert any("class" in p for p in again.problems())


def test_a_damaged_autosave_is_kept_aside_and_the_rest_restored(tmp_path):
    coarse = stack()
    r = Refinement(coarse)
    r.refined[0, 5, 5] = 0
    r.refined[1, 5, 5] = 0
    r.sync(None, tmp_path)
    (tmp_path / r.key / "1.npy").write_bytes(b"not an array")
    again = Refinement(coarse)
    note = again.restore(tmp_path)
    assert "1.npy" in note and "kept aside" in note
    assert again.refined[0, 5, 5] == 0 and again.refined[1, 5, 5] == 2
    assert (tmp_path / r.key / "1.npy.damaged-1").is_file()
    assert Refinement(coarse).restore(tmp_path).startswith("Restored")  # no second complaint


def test_the_single_file_autosave_of_earlier_versions_is_read(tmp_path):
    coarse = stack()
    refined = coarse.copy()
    refined[2, 4:6, 4:6] = 0
    r = Refinement(coarse)
    np.savez_compressed(tmp_path / f"{r.key}.npz", coarse_shape=coarse.shape, refined=refined)
    assert r.restore(tmp_path).startswith("Restored")
    assert r.forget[2].sum() == 4


def test_shapes_and_label_types_are_checked():
    with pytest.raises(MaskError, match=r"\(N, H, W\)"):
        Refinement(np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(MaskError, match="integer"):
        Refinement(np.zeros((2, 4, 4), np.float32))
    r = Refinement(stack())
    with pytest.raises(MaskError, match="shape"):
        r.set_refined(np.zeros((3, 8, 8), np.uint8))


def test_added_pixels_are_flagged_and_clipped():
    r = Refinement(stack())
    r.refined[0, 0, 0:3] = 1
    assert r.stats()["added_pixels"] == 3
    assert r.clip_added() == 3 and r.stats()["added_pixels"] == 0
