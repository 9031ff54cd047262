import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY

from shortcut_unlearning import masks as masklib
from shortcut_unlearning import ranking
from shortcut_unlearning.bench import ranking as bench_ranking
from shortcut_unlearning.cli import main
from shortcut_unlearning.experiment import RunConfig, choose_refined
from shortcut_unlearning.model import Model
from shortcut_unlearning.rounds import Rounds
from shortcut_unlearning.unlearning import FineTune, GradientClipping, NegGradSeg


class RedIsMalignant:
    """A stand-in model: a pixel's malignant probability is its red channel, the rest of
    its probability is lesion (benign) where green is high, background elsewhere."""

    def probabilities(self, images):
        rgb = np.asarray(images, np.float32) / 255
        malignant = rgb[..., 0]
        benign = (1 - malignant) * rgb[..., 1]
        return np.stack([1 - malignant - benign, benign, malignant], axis=1)


def disc_set(n=6, size=48):
    """Grey images with a disc lesion each; coarse masks are the discs dilated."""
    yy, xx = np.mgrid[:size, :size]
    fine = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        fine[i][(yy - 24) ** 2 + (xx - 20 - i) ** 2 < 64] = 1 + i % 2
    coarse = masklib.coarse_masks(fine)
    images = np.full((n, size, size, 3), 60, np.uint8)
    return images, coarse


def test_band_mass_ranks_the_image_whose_band_is_predicted_malignant_first():
    images, coarse = disc_set()
    width = ranking.default_width(coarse)
    band = ranking.bands(coarse, width)
    images[3][band[3]] = (230, 20, 20)  # red band: malignant under the stand-in model
    images[1][band[1] & (np.arange(48)[None, :] < 20)] = (140, 20, 20)  # half the band, dimmer
    ranked = ranking.rank_images(RedIsMalignant(), images, coarse, alternate=False)
    assert ranked.order[:2].tolist() == [3, 1]
    assert ranked.next == 3
    assert ranked.scores[3] == pytest.approx(230 / 255, abs=1e-6)
    assert np.all(np.diff(ranked.scores[ranked.order]) <= 0)  # best first
    assert "90% of its band is predicted malignant" in ranked.why(3)
    assert ranked.why(3).startswith("ranked 1 of 6")
    # The band: inside the coarse mask, outside its core eroded by the width.
    assert ranked.band(3).sum() == band[3].sum() > 0
    assert not (ranked.band(3) & (coarse[3] == 0)).any()


def test_excluded_images_are_not_ranked():
    images, coarse = disc_set()
    ranked = ranking.rank_images(RedIsMalignant(), images, coarse, exclude=[0, 4])
    assert sorted(ranked.order.tolist()) == [1, 2, 3, 5]
    assert np.isnan(ranked.scores[[0, 4]]).all()
    with pytest.raises(ValueError, match="not ranked"):
        ranked.why(0)
    none_left = ranking.rank_images(RedIsMalignant(), images, coarse, exclude=range(6))
    assert len(none_left) == 0 and none_left.next is None
    with pytest.raises(ValueError, match="only 6 images"):
        ranking.rank_images(RedIsMalignant(), images, coarse, exclude=[9])
    with pytest.raises(ValueError, match="ranking method"):
        ranking.rank_images(RedIsMalignant(), images, coarse, method="oracle")


def test_alternate_takes_the_lesion_classes_in_turn():
    images, coarse = disc_set()  # classes 1, 2, 1, 2, 1, 2
    band = ranking.bands(coarse, ranking.default_width(coarse))
    for i, red in zip((1, 3, 5, 0), (250, 240, 230, 100), strict=True):
        images[i][band[i]] = (red, 0, 0)
    plain = ranking.rank_images(RedIsMalignant(), images, coarse, alternate=False)
    mixed = ranking.rank_images(RedIsMalignant(), images, coarse)  # the default
    assert plain.order[:3].tolist() == [1, 3, 5]  # all class 2
    assert [int(coarse[i].max()) for i in mixed.order] == [2, 1, 2, 1, 2, 1]
    assert mixed.order[:2].tolist() == [1, 0]
    assert "2nd of the malignant masks" in mixed.why(3)
    assert mixed.why(0).startswith("ranked 2 of 6 (1st of the benign masks")


@pytest.mark.parametrize("method", ranking.METHODS)
def test_every_method_ranks_every_candidate_with_a_finite_score(method, tiny_data):
    data, coarse = tiny_data
    model = Model(TINY)
    ranked = ranking.rank_images(model, data.images[:6], coarse[:6], exclude=[2], method=method)
    assert sorted(ranked.order.tolist()) == [0, 1, 3, 4, 5]
    assert np.isfinite(ranked.scores[ranked.order]).all()
    assert ranked.why(int(ranked.order[0]))


def test_the_ranking_reads_no_annotation_the_clinician_has_not_given(tiny_data):
    """Shuffling the fine masks, labels, flags and artefact maps of the training images,
    with their images and coarse masks held fixed, leaves the ranked choice unchanged."""
    data, coarse = tiny_data
    model = Model(TINY)
    config = RunConfig(refine_order="ranked", fine_fraction=0.5, seed=3)
    chosen = choose_refined(data, config, coarse, model)
    rng = np.random.default_rng(0)
    p = rng.permutation(len(data))
    hidden = replace(
        data,
        masks=data.masks[p],
        labels=1 - data.labels[p],
        flags={k: v[p] for k, v in data.flags.items()},
        artefacts=data.artefacts[p[::-1]],
    )
    assert np.array_equal(choose_refined(hidden, config, coarse, model), chosen)
    # ... while the images and coarse masks it does read move the choice with them.
    moved = choose_refined(data.select(p), config, coarse[p], model)
    assert np.array_equal(moved, np.argsort(p)[chosen])


def test_ranked_order_differs_from_random_order(tiny_data):
    data, coarse = tiny_data
    model = Model(TINY)
    config = RunConfig(fine_fraction=0.5, seed=0)
    ranked = choose_refined(data, replace(config, refine_order="ranked"), coarse, model)
    random = choose_refined(data, config)
    assert len(ranked) == len(random) == 12
    assert set(ranked) != set(random)
    # The ranked choice is the top of the ranking, in its order: band-mass, classes in turn.
    ranking_ = ranking.rank_images(model, data.images, coarse)
    assert ranked.tolist() == ranking_.order[:12].tolist()
    classes = [int(coarse[i].max()) for i in ranked]
    assert all(a != b for a, b in itertools.pairwise(classes[:6]))
    for k in (1, 2):  # within a class, best band-mass first
        mine = [i for i in ranked if coarse[i].max() == k]
        assert np.all(np.diff(ranking_.scores[mine]) <= 0)
    with pytest.raises(ValueError, match="needs the coarse masks and the model"):
        choose_refined(data, replace(config, refine_order="ranked"))


def test_refine_order_settings_are_checked():
    with pytest.raises(ValueError, match="name them"):
        RunConfig(refine_order="given")
    with pytest.raises(ValueError, match="drop one of the two"):
        RunConfig(refined=["a"], refine_order="ranked")
    with pytest.raises(ValueError, match="must be one of"):
        RunConfig(refine_order="best")
    with pytest.raises(ValueError, match="fine_fraction must lie in"):
        RunConfig(refine_order="ranked", fine_fraction=0)  # before any training
    assert RunConfig().order == "random" and RunConfig(refined=["a"]).order == "given"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "start"
    Model(TINY).save(path)
    return path.with_suffix(".safetensors")


def run_args(out, checkpoint, *flags):
    return [
        "run",
        "--data",
        "synthetic",
        "--synth-n",
        "24",
        "--image-size",
        "48",
        "--model",
        str(checkpoint),
        "--steps",
        "2",
        "--fine-fraction",
        "0.2",
        *flags,
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("order", ["ranked", "random", "given"])
def test_run_refine_order(order, checkpoint, tmp_path, capsys):
    given = ["synth_0_00008", "synth_0_00001", "synth_0_00005"]
    flags = ["--refine-order", order] + (["--refined", ",".join(given)] if order == "given" else [])
    assert main(run_args(tmp_path, checkpoint, *flags)) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["refine_order"] == order
    ids = report["refined_ids"]
    if order == "given":
        assert ids == given  # in the given order
        return
    assert len(ids) == round(0.2 * report["n_train"])
    from shortcut_unlearning.experiment import prepare_data

    # the training images the run refines among: the split less its held-out validation images
    train = prepare_data(
        RunConfig(data="synthetic", synth_n=24, image_size=48, refine_order="ranked")
    ).train
    coarse = masklib.coarse_masks(train.masks)
    if order == "ranked":
        top = ranking.rank_images(Model.load(checkpoint), train.images, coarse).top(len(ids))
        assert ids == [train.ids[i] for i in top]
    else:
        assert ids == [train.ids[i] for i in choose_refined(train, RunConfig(fine_fraction=0.2))]


def test_run_refine_order_errors(checkpoint, tmp_path, capsys):
    assert main(run_args(tmp_path / "a", checkpoint, "--refine-order", "given")) == 2
    assert "name them" in capsys.readouterr().err
    flags = ("--refine-order", "ranked", "--refined", "synth_0_00001")
    assert main(run_args(tmp_path / "b", checkpoint, *flags)) == 2
    assert "drop one of the two" in capsys.readouterr().err


# --- sequential refinement ----------------------------------------------------------------


def fingerprint(model) -> dict:
    """A probe that identifies a model by its head's weights."""
    return {
        "head": float(
            sum(p.detach().double().sum() for p in model.net.segmentation_head.parameters())
        )
    }


def test_rounds_chain_each_round_from_the_last_accepted_model(tiny_data):
    data, coarse = tiny_data
    start = Model(TINY)
    rounds = Rounds(start, data.images, coarse, probe=fingerprint)
    one = _drive(rounds.run({0: data.masks[0], 1: data.masks[1]}, NegGradSeg(steps=2)))
    assert one.accepted and rounds.model is one.result.model and rounds.model is not start
    assert one.start_metrics == fingerprint(start)
    suggestion = rounds.suggest()
    assert not {0, 1} & set(suggestion.order.tolist())
    nxt = suggestion.next
    two = _drive(rounds.run({nxt: data.masks[nxt]}, FineTune(steps=2)))
    assert two.start_metrics == one.end_metrics != one.start_metrics  # started from round 1
    assert two.images == [nxt] and two.refined == sorted([0, 1, nxt])
    # Round 2 unlearns the forget set of all three refinements.
    full = masklib.split_pixels(coarse, {i: data.masks[i] for i in (0, 1, nxt)})
    assert two.forget_pixels == full.forget_count > one.forget_pixels
    history = rounds.to_dict()
    assert [r["index"] for r in history["rounds"]] == [1, 2]
    assert [r["operator"] for r in history["rounds"]] == ["neggrad-seg", "finetune"]
    json.dumps(history)  # exportable as it is
    assert "not certified" in history["certificate"]
    with pytest.raises(ValueError, match="earlier round"):
        _drive(rounds.run({0: data.masks[0]}, FineTune(steps=2)))


def test_a_round_that_is_not_accepted_leaves_the_chain_as_it_was(tiny_data):
    data, coarse = tiny_data
    start = Model(TINY)
    rounds = Rounds(start, data.images, coarse)
    record = _drive(rounds.run({0: data.masks[0]}, FineTune(steps=2), accept=False))
    assert not record.accepted and rounds.model is start and rounds.refined == {}
    assert "no accepted round" in rounds.certificate()


def test_certified_chain_states_the_last_rounds_certificate(tiny_data):
    data, coarse = tiny_data
    rounds = Rounds(Model(TINY), data.images, coarse)
    operator = GradientClipping(finetune_steps=2, scope="head", accept_collapse=True)
    with pytest.warns(UserWarning):
        _drive(rounds.run({0: data.masks[0]}, operator))
        _drive(rounds.run({3: data.masks[3]}, operator))
    text = rounds.certificate()
    assert "(1, 1.0e-05)-certified" in text and "round 2" in text
    assert "earlier rounds add nothing to epsilon or delta" in text
    assert [r.certificate["epsilon"] for r in rounds.history] == [1, 1]


def _drive(job):
    while True:
        try:
            next(job)
        except StopIteration as done:
            return done.value


# --- the benchmark ----------------------------------------------------------------------------


def test_reached_interpolates_between_measured_shares():
    fractions = [0.01, 0.02, 0.05, 0.1]
    got = bench_ranking._reached(fractions, [0.5, 0.4, 0.2, 0.1], 0.3, lower_better=True)
    assert got == {"fraction": pytest.approx(0.035), "bound": "interpolated"}
    assert bench_ranking._reached(fractions, [0.1] * 4, 0.3, True)["bound"] == "at_most"
    assert bench_ranking._reached(fractions, [0.5] * 4, 0.3, True)["bound"] == "not_reached"
    assert bench_ranking._reached(fractions, [0.6, 0.7, 0.8, 0.9], 0.75, False)["fraction"] == (
        pytest.approx(0.035)
    )


def test_refinement_order_benchmark(tmp_path):
    torch.manual_seed(0)
    base = RunConfig(
        data="synthetic", synth_n=30, image_size=48, epochs=1, steps=2, quiet=True, probe_images=8
    )
    result = bench_ranking.refinement_order(
        base, [0], tmp_path, fractions=(0.1, 0.2), orders=("ranked", "random")
    )
    cells = result["cells"]
    assert {"ranked 0.1", "ranked 0.2", "random 0.1", "random 0.2", "coarse"} == set(cells)
    assert cells["ranked 0.2"]["images"] == round(0.2 * 21)
    assert np.isfinite(cells["ranked 0.1"]["band_reliance"]["mean"])
    assert set(result["ratios"]) >= {"ranked band_reliance", "ranked s_global"}
    assert {r["method"] for r in result["precision"]} >= set(ranking.METHODS)
    table = (tmp_path / "summary.md").read_text()
    assert "| ranked | 10% |" in table and "share needed" in table
    assert (tmp_path / "ranking.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="not one of"):
        bench_ranking.refinement_order(base, [0], tmp_path, orders=("ranked/oracle",))
