import json
import re

import numpy as np
import pytest
from scipy.stats import chi2_contingency, entropy
from sklearn.metrics import mutual_info_score, roc_auc_score

from shortcut_unlearning import metrics


def one_hot(z, k=3, on=1.0):
    """Probabilities (N, K, H, W) putting `on` on class z and the rest evenly on the others."""
    probs = np.full((*z.shape[:1], k, *z.shape[1:]), (1 - on) / (k - 1))
    np.put_along_axis(probs, z[:, None], on, axis=1)
    return probs


def contingency(a, b):
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    return table


# --- Information measures ---


@pytest.mark.parametrize("shape", [(2, 2), (3, 4)])
def test_mutual_information_matches_sklearn_the_g_test_and_the_entropy_identity(shape):
    rng = np.random.default_rng(1)
    a = rng.integers(0, shape[0], 500)
    b = (a + rng.integers(0, shape[1], 500) * (rng.random(500) < 0.6)) % shape[1]
    table = contingency(a, b)
    mi = metrics.mutual_information(table)
    assert mi > 0.01
    assert mi == pytest.approx(mutual_info_score(a, b), rel=1e-10)
    g = chi2_contingency(table, correction=False, lambda_="log-likelihood")[0]
    assert g == pytest.approx(2 * table.sum() * mi, rel=1e-10)
    identity = entropy(table.sum(1)) + entropy(table.sum(0)) - entropy(table.ravel())
    assert mi == pytest.approx(identity, rel=1e-10)
    # A probability table gives the same value as its counts; an empty table gives 0.
    assert metrics.mutual_information(table / table.sum()) == pytest.approx(mi, rel=1e-12)
    assert metrics.mutual_information(np.zeros(shape)) == 0.0


def test_binary_entropy_and_the_disjoint_support_form():
    assert metrics.binary_entropy(0.0) == 0.0
    assert metrics.binary_entropy(1.0) == 0.0
    assert metrics.binary_entropy(0.5) == pytest.approx(np.log(2))
    np.testing.assert_allclose(metrics.binary_entropy([0.2, 0.8]), entropy([0.2, 0.8]))
    # With no spurious pixels there is nothing to share.
    assert metrics.disjoint_support_mi(0.0, 0.3) == pytest.approx(0.0, abs=1e-15)


# --- S_global ---


def test_s_global_hard_equals_the_stratum_weight_times_sklearn_mi():
    rng = np.random.default_rng(2)
    z = rng.integers(0, 3, (20, 16, 16))
    labels = rng.integers(0, 3, z.shape)
    # S leans towards the pixels labelled as the predicted class, so each stratum has signal.
    spurious = rng.random(z.shape) < np.where(labels == z, 0.6, 0.2)
    expected = {}
    for k in (1, 2):
        inside = z == k
        oracle = inside.mean() * mutual_info_score(spurious[inside], labels[inside] == k)
        got = metrics.s_global(one_hot(z), spurious, labels, k_classes=(k,), hard=True)
        assert got == pytest.approx(oracle, rel=1e-6)
        expected[k] = oracle
    assert min(expected.values()) > 1e-3
    assert metrics.s_global(one_hot(z), spurious, labels, hard=True) == pytest.approx(
        max(expected.values()), rel=1e-6
    )
    # hard=True reduces soft probabilities to their argmax; one-hot soft counts agree with it.
    soft = one_hot(z, on=0.5)
    assert metrics.s_global(soft, spurious, labels, hard=True) == pytest.approx(
        max(expected.values()), rel=1e-6
    )
    assert metrics.s_global(one_hot(z), spurious, labels) == pytest.approx(
        max(expected.values()), rel=1e-6
    )
    assert metrics.s_global(soft, spurious, labels) != pytest.approx(max(expected.values()))


@pytest.mark.parametrize(("a", "b"), [(0.25, 1 / 3), (0.5, 0.5), (0.1, 0.8)])
def test_s_global_matches_the_disjoint_support_closed_form(a, b):
    n_pixels = 4 * 10 * 10
    n_s = round(a * n_pixels)
    n_y = round(b * (n_pixels - n_s))
    flat_s = np.arange(n_pixels) < n_s
    flat_y = (np.arange(n_pixels) >= n_s) & (np.arange(n_pixels) < n_s + n_y)
    order = np.random.default_rng(3).permutation(n_pixels)
    spurious = flat_s[order].reshape(4, 10, 10)
    labels = np.where(flat_y[order], 2, 0).reshape(4, 10, 10)
    assert not (spurious & (labels == 2)).any()
    predict_malignant = one_hot(np.full((4, 10, 10), 2))
    value = metrics.s_global(predict_malignant, spurious, labels, hard=True)
    assert value == pytest.approx(metrics.disjoint_support_mi(a, b), rel=1e-6)


@pytest.mark.parametrize("grid", [1, 4])
def test_independent_maps_sit_inside_the_permutation_null(grid):
    # One draw lands above its null's 95th percentile 5% of the time, so judge several.
    scores, above = [], 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        shape = (100, 24, 24)
        probs = rng.dirichlet(np.ones(3), size=shape).transpose(0, 3, 1, 2)
        spurious = rng.random(shape) < 0.2
        labels = rng.integers(0, 3, shape)
        report = metrics.s_global_report(probs, spurious, labels, grid=grid, n_boot=0, n_perm=40)
        assert report["null_mean"] > 0  # the estimator's upward bias, which the null measures
        assert abs(report["excess"]) < 5 * report["null_sd"]  # the null is skewed: allow a tail
        scores.append(report["excess"] / report["null_sd"])
        above += report["value"] > report["null_p95"]
    assert above <= 2
    assert abs(np.mean(scores)) < 1.5


def shortcut_maps(seed=5, n=60, size=32):
    """A lesion and an artefact patch at random places; the patch mostly comes with malignancy."""
    rng = np.random.default_rng(seed)
    malignant = np.arange(n) % 2 == 1
    labels = np.zeros((n, size, size), int)
    spurious = np.zeros((n, size, size), bool)
    for i in range(n):
        side = rng.integers(4, 12)
        top, left = rng.integers(0, size - side, 2)
        labels[i, top : top + side, left : left + side] = 2 if malignant[i] else 1
        if rng.random() < (0.8 if malignant[i] else 0.2):
            patch = rng.integers(3, 8)
            top, left = rng.integers(0, size - patch, 2)
            spurious[i, top : top + patch, left : left + patch] = True
    spurious &= labels == 0  # disjoint support: artefacts never cover the lesion
    clean = labels.copy()
    shortcut = np.where(spurious, 2, labels)  # also calls the artefact malignant lesion
    return spurious, labels, clean, shortcut


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("grid", [1, 4])
def test_a_model_that_segments_artefacts_has_the_higher_s_global(hard, grid):
    spurious, labels, clean, shortcut = shortcut_maps()
    args = {"hard": hard, "grid": grid, "n_boot": 20, "n_perm": 50}
    fair = metrics.s_global_report(one_hot(clean, on=0.8), spurious, labels, **args)
    cheat = metrics.s_global_report(one_hot(shortcut, on=0.8), spurious, labels, **args)
    assert cheat["value"] > 2 * fair["value"] + 1e-4
    assert cheat["excess"] > fair["excess"] + 3 * cheat["null_sd"]
    assert cheat["value"] > cheat["null_p95"]
    assert cheat["class"] == 2


def test_report_has_a_bootstrap_interval_and_is_json_ready():
    spurious, labels, _, shortcut = shortcut_maps()
    probs = one_hot(shortcut, on=0.8)
    report = metrics.s_global_report(probs, spurious, labels, grid=2, n_boot=100, n_perm=20)
    assert report["value"] == pytest.approx(metrics.s_global(probs, spurious, labels, grid=2))
    assert report["ci_low"] <= report["value"] <= report["ci_high"]
    assert report["ci_high"] - report["ci_low"] > 1e-3
    assert report["per_class"][report["class"]] == report["value"]
    assert (report["unit"], report["grid"], report["hard"]) == ("nats per pixel", 2, False)
    assert report["n_images"] == len(spurious)
    assert json.loads(json.dumps(report))["value"] == report["value"]
    # Same seed, same numbers.
    again = metrics.s_global_report(probs, spurious, labels, grid=2, n_boot=100, n_perm=20)
    assert again == report


def noisy_shortcut_probs(seed=11):
    """Soft float32 probabilities of a model that partly paints the artefacts malignant."""
    spurious, labels, _, shortcut = shortcut_maps(seed=7, n=40, size=30)
    noise = np.random.default_rng(seed).dirichlet(np.ones(3), size=labels.shape)
    probs = 0.7 * one_hot(shortcut, on=0.8) + 0.3 * noise.transpose(0, 3, 1, 2)
    return probs.astype(np.float32), spurious, labels


# s_global_report (value, ci_low, ci_high, null_mean, null_sd, null_p95) of the implementation
# before the sums were chunked and the null gathered (commit ee30030), on noisy_shortcut_probs
# with n_boot=50, n_perm=30, seed=3. Grid 3 and 4 have unequal bands, grid 40 empty ones.
EARLIER = {
    (1, False, (1, 2)): (
        1.057147982e-3,
        5.212021915e-4,
        1.941039049e-3,
        3.461970261e-4,
        3.751278953e-4,
        7.660399122e-4,
    ),
    (3, False, (1, 2)): (
        1.278780117e-3,
        5.586922333e-4,
        2.380226387e-3,
        7.10279284e-4,
        3.510246063e-4,
        1.401551135e-3,
    ),
    (4, True, (1, 2)): (
        2.418972616e-2,
        1.267137453e-2,
        3.235605597e-2,
        1.022148367e-3,
        1.316912097e-3,
        4.157089932e-3,
    ),
    (2, False, (2,)): (
        1.06301474e-3,
        4.458424346e-4,
        1.943556519e-3,
        3.44529869e-4,
        2.028485356e-4,
        8.059833758e-4,
    ),
    (40, False, (1, 2)): (
        1.36756162e-3,
        5.41371782e-4,
        2.501309126e-3,
        1.498063939e-3,
        5.984743997e-4,
        2.577403867e-3,
    ),
}


@pytest.mark.parametrize(("grid", "hard", "k_classes"), list(EARLIER))
def test_s_global_keeps_the_values_of_the_earlier_implementation(grid, hard, k_classes):
    probs, spurious, labels = noisy_shortcut_probs()
    args = {"k_classes": k_classes, "hard": hard, "grid": grid}
    report = metrics.s_global_report(probs, spurious, labels, n_boot=50, n_perm=30, seed=3, **args)
    keys = ("value", "ci_low", "ci_high", "null_mean", "null_sd", "null_p95")
    # float32 sums in another order: equal to about 1e-7
    np.testing.assert_allclose([report[k] for k in keys], EARLIER[grid, hard, k_classes], 1e-6)
    assert metrics.s_global(probs, spurious, labels, **args) == report["value"]


@pytest.mark.parametrize(("grid", "hard"), [(1, False), (3, True), (5, False)])
def test_both_ways_to_the_permutation_null_give_the_same_sums(grid, hard):
    probs, spurious, labels = noisy_shortcut_probs(seed=2)
    pairing = np.array([np.random.default_rng(i).permutation(len(probs)) for i in range(7)])
    args = (probs, spurious, labels, np.array([1, 2]), hard, grid, pairing)
    gathered = metrics._null_by_gathering(*args)
    assert gathered.shape == (7, 2, 2, grid * grid)
    np.testing.assert_allclose(gathered, metrics._null_by_products(*args), rtol=1e-5, atol=1e-9)
    # the definition: the soft malignant weights of image j over the S pixels of pairing[i, j]
    if not hard:
        weights = probs[:, 2] * (labels == 2)
        expected = sum(weights[j][spurious[pairing[4, j]]].sum() for j in range(len(probs)))
        assert gathered[4, 1, 1].sum() == pytest.approx(expected, rel=1e-5)


def test_shape_mismatches_and_missing_classes_are_refused():
    probs = np.full((2, 3, 8, 8), 1 / 3)
    good = np.zeros((2, 8, 8), int)
    bad = np.zeros((2, 8, 9), bool)
    with pytest.raises(ValueError, match=re.escape("(2, 8, 9)")) as caught:
        metrics.s_global(probs, bad, good)
    assert "(2, 3, 8, 8)" in str(caught.value)
    with pytest.raises(ValueError, match=r"labels_map.*\(2, 8, 9\).*\(2, 3, 8, 8\)"):
        metrics.s_global_report(probs, good.astype(bool), bad)
    with pytest.raises(ValueError, match="k_classes"):
        metrics.s_global(probs, good.astype(bool), good, k_classes=(1, 3))


# --- AUROC ---


def probs_with_scores(scores, size=2):
    """Probabilities whose malignant map is the image score everywhere."""
    scores = np.asarray(scores, float)[:, None, None]
    probs = np.zeros((len(scores), 3, size, size))
    probs[:, 2], probs[:, 0] = scores, 1 - scores
    return probs


def test_image_scores_average_the_malignant_map():
    probs = np.zeros((1, 3, 2, 2))
    probs[0, 2] = [[1.0, 0.0], [0.5, 0.5]]
    np.testing.assert_allclose(metrics.image_scores(probs), [0.5])


def test_pooled_auroc_matches_sklearn_and_is_nan_for_one_class():
    scores, labels = [0.1, 0.4, 0.35, 0.8], np.array([0, 0, 1, 1])
    probs = probs_with_scores(scores)
    assert metrics.pooled_auroc(probs, labels) == pytest.approx(0.75)
    assert metrics.pooled_auroc(probs, labels) == roc_auc_score(labels, scores)
    assert np.isnan(metrics.pooled_auroc(probs, np.zeros(4, int)))


def test_auroc_by_group_gives_nan_to_small_groups_and_worst_group_skips_them():
    rng = np.random.default_rng(6)
    labels = np.arange(12) % 2
    scores = labels * 0.3 + rng.random(12)
    probs = probs_with_scores(scores / scores.max())
    groups = {"all": np.ones(12, bool), "benign": labels == 0, "first": np.arange(12) < 8}
    by_group = metrics.auroc_by_group(probs, labels, groups, min_per_class=3)
    assert by_group["all"] == pytest.approx(roc_auc_score(labels, scores))
    assert by_group["first"] == pytest.approx(roc_auc_score(labels[:8], scores[:8]))
    assert np.isnan(by_group["benign"])
    assert metrics.worst_group_auroc(by_group) == min(by_group["all"], by_group["first"])
    # Eight images hold four of each class: too few when five are asked for.
    assert np.isnan(metrics.auroc_by_group(probs, labels, groups, min_per_class=5)["first"])
    assert np.isnan(metrics.worst_group_auroc({"a": float("nan")}))


def test_shortcut_groups():
    labels = np.array([1, 1, 0, 0])
    flags = {"ruler": np.array([1, 0, 0, 1], bool), "ink": np.array([0, 0, 1, 1], bool)}
    groups = metrics.shortcut_groups(flags, labels, ("ruler", "ink"))
    assert set(groups) == {
        f"{n}:{g}" for n in ("ruler", "ink", "any") for g in ("aligned", "conflicting")
    }
    # Aligned: malignant with the artefact, benign without.
    np.testing.assert_array_equal(groups["ruler:aligned"], [1, 0, 1, 0])
    np.testing.assert_array_equal(groups["ruler:conflicting"], [0, 1, 0, 1])
    np.testing.assert_array_equal(groups["any:aligned"], [1, 0, 0, 0])
    flipped = metrics.shortcut_groups(flags, labels, ["ink"], direction={"ink": -1})
    np.testing.assert_array_equal(flipped["ink:aligned"], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="hair"):
        metrics.shortcut_groups(flags, labels, ["hair"])


# --- Dice ---


def test_dice_on_hand_cases():
    truth = np.zeros((1, 4, 4), int)
    truth[0, 0, :2] = 2
    assert metrics.dice(truth, truth) == 1.0
    assert metrics.dice(np.roll(truth, 2, axis=2), truth) == 0.0
    half = np.roll(truth, 1, axis=2)  # 2 predicted pixels, 1 shared: 2*1 / (2+2)
    assert metrics.dice(half, truth) == pytest.approx(0.5)
    # Any lesion class counts as lesion; two empty images count as perfect.
    assert metrics.dice(np.where(half, 1, 0), truth) == pytest.approx(0.5)
    both = np.concatenate([truth, np.zeros_like(truth)])
    assert metrics.dice(np.concatenate([half, np.zeros_like(half)]), both) == pytest.approx(0.75)
    # Probabilities are reduced by argmax.
    assert metrics.dice(one_hot(half), truth) == pytest.approx(0.5)


def test_dice_by_class_scores_a_flipped_class_as_zero():
    truth = np.zeros((2, 4, 4), int)
    truth[0, :2, :2] = 1  # a benign lesion
    truth[1, 2:, 2:] = 2  # a malignant one
    flipped = np.where(truth != 0, 2, 0)  # both found, both called malignant
    assert metrics.dice(flipped, truth) == 1.0
    assert metrics.dice_by_class(flipped, truth) == {1: 0.0, 2: 1.0}
    assert metrics.dice_by_class(one_hot(truth), truth) == {1: 1.0, 2: 1.0}
    # A class no image holds has no Dice.
    assert np.isnan(metrics.dice_by_class(truth[:1], truth[:1])[2])


def test_malignant_share_of_the_predicted_lesion():
    pred = np.zeros((2, 4, 4), int)
    pred[0, 0, :3] = 2
    pred[1, 0, :1] = 1
    assert metrics.malignant_share(pred) == pytest.approx(0.75)
    assert metrics.malignant_share(one_hot(pred)) == pytest.approx(0.75)
    assert np.isnan(metrics.malignant_share(np.zeros((1, 4, 4), int)))


def test_lesion_probabilities_pool_over_the_predicted_lesion_only():
    probs = np.zeros((2, 3, 4, 4))
    probs[:, 0] = 0.9  # background everywhere, with a little malignant probability
    probs[:, 2] = 0.1
    probs[0, :, 0, :2] = np.array([0.1, 0.3, 0.6])[:, None]  # two lesion pixels
    probs[0, :, 1, 0] = [0.2, 0.6, 0.2]  # and a benign-looking one
    pooled = metrics.lesion_probabilities(probs)
    np.testing.assert_allclose(pooled[0], [(0.3 + 0.3 + 0.6) / 3, (0.6 + 0.6 + 0.2) / 3])
    assert np.isnan(pooled[1]).all()  # no lesion predicted


def hanley_mcneil_se(auc, n_pos, n_neg):
    """Standard error of AUROC (Hanley and McNeil 1982), an independent check."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)
    return np.sqrt(var / (n_pos * n_neg))


def test_auroc_ci_matches_sklearn_and_the_hanley_mcneil_width():
    rng = np.random.default_rng(8)
    labels = np.repeat([0, 1], 150)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    record = metrics.auroc_ci(scores, labels, n_boot=2000, seed=1)
    assert record["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert record["ci_low"] < record["value"] < record["ci_high"]
    se = hanley_mcneil_se(record["value"], 150, 150)
    assert record["ci_high"] - record["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert (record["n_malignant"], record["n_benign"]) == (150, 150)
    assert metrics.auroc_ci(scores, labels, n_boot=2000, seed=1) == record
    # A quarter of the images: about twice as wide.
    small = metrics.auroc_ci(scores[::4], labels[::4], n_boot=2000, seed=1)
    assert 1.5 < (small["ci_high"] - small["ci_low"]) / (record["ci_high"] - record["ci_low"]) < 2.6


def test_auroc_ci_is_nan_without_both_classes_and_by_group_follows_groups():
    one_class = metrics.auroc_ci([0.1, 0.2, 0.3], [1, 1, 1])
    assert np.isnan(one_class["value"]) and np.isnan(one_class["ci_low"])
    labels = np.arange(12) % 2
    scores = labels + np.linspace(0, 0.5, 12)
    groups = {"all": np.ones(12, bool), "few": np.arange(12) < 4}
    by_group = metrics.auroc_by_group_ci(scores, labels, groups, n_boot=50)
    assert by_group["all"]["value"] == 1.0 and np.isnan(by_group["few"]["value"])
    assert by_group["few"]["n_malignant"] == 2


def test_mean_ci():
    values = np.random.default_rng(2).normal(1.0, 1.0, 400)
    record = metrics.mean_ci(values, n_boot=2000)
    assert record["value"] == pytest.approx(values.mean())
    se = values.std(ddof=1) / np.sqrt(400)
    assert record["ci_high"] - record["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert np.isnan(metrics.mean_ci([])["value"])
