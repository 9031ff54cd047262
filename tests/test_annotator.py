import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from shortcut_unlearning import masks
from shortcut_unlearning.data.annotator import Annotator
from shortcut_unlearning.data.synthetic import generate
from shortcut_unlearning.experiment import RunConfig, choose_refined, prepare_data


@pytest.fixture(scope="module")
def data():
    return generate(n=16, size=64, seed=9)


@pytest.mark.parametrize("kind", masks.COARSE_METHODS)
def test_jittered_refinements_move_the_border_a_few_pixels_inside_the_coarse_mask(data, kind):
    coarse = masks.coarse_masks(data.masks, kind)
    annotator = Annotator(jitter=2, seed=1)
    moved = 0
    for i, (fine, outer) in enumerate(zip(data.masks, coarse, strict=True)):
        refined = annotator.refine(fine, outer, None, i)
        assert set(np.unique(refined)) == {0, fine.max()}  # the lesion's class, not empty
        assert (outer[refined != 0] != 0).all()  # a subset of the coarse mask
        changed = (refined != 0) != (fine != 0)
        border = np.minimum(distance_transform_edt(fine != 0), distance_transform_edt(fine == 0))
        assert border[changed].max(initial=0) <= 2.5  # within the jitter of the fine border
        moved += changed.sum()
        np.testing.assert_array_equal(refined, annotator.refine(fine, outer, None, i))
    assert moved > 0.05 * (data.masks != 0).sum()  # the border moved, not only in places
    np.testing.assert_array_equal(
        Annotator().refine(data.masks[0], coarse[0], None, 0), data.masks[0]
    )


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_missed_refinements_leave_that_share_of_the_artefact_forget_pixels_as_lesion(data, share):
    coarse = masks.coarse_masks(data.masks)
    spurious = data.artefact_mask()
    annotator = Annotator(missed=share)
    refined = {
        i: annotator.refine(data.masks[i], coarse[i], spurious[i], i) for i in range(len(data))
    }
    exact = masks.split_pixels(coarse, {i: data.masks[i] for i in refined})
    drawn = masks.split_pixels(coarse, refined)  # valid refinements: inside the coarse masks
    candidates = exact.forget & spurious
    missed = candidates & ~drawn.forget
    assert candidates.sum() > 100
    # Per image the share up to rounding; nothing else changes.
    for i in range(len(data)):
        assert abs(missed[i].sum() - share * candidates[i].sum()) <= 0.5
    assert not (drawn.forget ^ exact.forget & ~missed).any()
    assert (drawn.targets[missed] == coarse[missed]).all()  # left as lesion of its class
    with pytest.raises(ValueError, match="artefact maps"):
        annotator.refine(data.masks[0], coarse[0], None, 0)
    with pytest.raises(ValueError, match="refine_missed"):
        Annotator(missed=1.5)


def test_a_run_refines_as_a_person_from_one_percent_of_a_small_set():
    config = RunConfig(
        data="synthetic", synth_n=40, image_size=48, fine_fraction=0.01, coarse="outline"
    )
    exact = prepare_data(config)
    assert len(exact.refined) == 1 == len(choose_refined(exact.train, config))
    person = prepare_data(RunConfig(**{**vars(config), "refine_jitter": 2, "refine_missed": 0.5}))
    np.testing.assert_array_equal(person.refined, exact.refined)
    assert person.split.forget_count != exact.split.forget_count
    assert not (person.split.forget & (person.coarse == 0)).any()
    with pytest.raises(ValueError, match="refine_jitter"):
        RunConfig(refine_jitter=-1)
    with pytest.raises(ValueError, match="synth_placement must be one of"):
        RunConfig(synth_placement="nowhere")
