"""Two processes on gloo (the CPU) take the steps one process takes, up to floating point.

Two ranks joined through a FileStore run training, NegGrad-Seg and Gradient Clipping on a
tiny synthetic set, each rank computing its half of every batch; their final scopes (weights
and batch-norm statistics) must equal a one-process run's, and be bit for bit the same on both
ranks. A deliberately wrong sharding (every rank computing the first half) must differ, so the
comparison can fail.

Where the optimiser is plain SGD (NegGrad-Seg with optimiser "sgd", the certified noisy phase)
the weights agree element by element (rtol and atol 1e-5; measured: 6e-8). Adam (training)
divides each gradient entry by its own magnitude plus 1e-8, so an entry near 1e-8 turns a float
rounding difference into an update difference of order lr: measured here, one process fed the
same batch in reverse row order already moves some weights by 5e-6 after one step. For Adam
the test therefore bounds the distance to the one-process weights relative to the distance
both travelled (measured: 3e-6 after 4 steps), and compares the losses step by step.
"""

import os
import sys
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, refinement
from safetensors.numpy import load_file, save_file

from shortcut_unlearning import distributed, masks
from shortcut_unlearning.data.synthetic import generate
from shortcut_unlearning.model import SCOPE_MODULES, Model
from shortcut_unlearning.progress import drive
from shortcut_unlearning.training import TrainConfig, train
from shortcut_unlearning.unlearning import GradientClipping, NegGradSeg, UnlearnData

SMALL = replace(TINY, image_size=32)
WORLD = 2


def _probe(model) -> dict:
    # The rank that computed the metrics: rank 0 everywhere once they are broadcast.
    return {"dice": 1.0, "probed_on": distributed.rank()}


def _scope(model) -> dict[str, np.ndarray]:
    return {
        k: v.detach().cpu().double().numpy()
        for k, v in model.net.state_dict().items()
        if k.split(".")[0] in SCOPE_MODULES[model.config.scope]
    }


def _jobs(wrong: bool = False) -> dict[str, dict]:
    """In however many processes are running: train (2 epochs of 2 batches of 4 rows, 3
    images held out for validation), then, from another model, NegGrad-Seg (2 steps of 3 + 3
    rows: 2 and 1 per rank) and Gradient Clipping's noisy phase (2 steps, as C0 = 0.02
    calibrates, of 1 row with batch statistics: one rank holds none). `wrong` adds
    NegGrad-Seg with every rank computing the first part of each batch."""
    data = generate(n=11, size=32, seed=5, test_fraction=0.0)
    coarse = masks.coarse_masks(data.masks)
    model = Model(SMALL)
    config = TrainConfig(epochs=2, batch_size=4, val_fraction=0.25, min_val_dice=0.0)
    out = {"start": _scope(model)}
    history = drive(_recorded(train(model, data.images, coarse, config)), quiet=True)
    out["train"] = {**_scope(model), "losses": history}
    model = Model(replace(SMALL, seed=1))
    unlearn = UnlearnData(data.images, coarse, refinement(coarse, data.masks, 4), _probe)
    neggrad = NegGradSeg(steps=2, batch_size=3, lr=0.05, optimiser_name="sgd")
    operators = {
        "neggrad-seg": neggrad,
        # the context term's losses are means over every rank's part of the batch too
        "neggrad-seg+context": replace(neggrad, context="blind+consistent"),
        # the noisy phase alone (plain SGD): clipping, projection, noise, batch statistics
        # noise_seed: the same noise in both runs (by default it comes from fresh entropy)
        "gradient-clipping": GradientClipping(
            c0=0.02, finetune_steps=0, batch_size=1, noise_seed=0
        ),
    }
    if wrong:
        operators["neggrad-seg-wrong"] = neggrad
    for name, operator in operators.items():
        right_shard = distributed.shard
        if name.endswith("wrong"):
            distributed.shard = lambda rows: distributed.shards(rows)[0]
        try:
            result = drive(operator.run(model, unlearn), quiet=True)
        finally:
            distributed.shard = right_shard
        out[name] = _scope(result.model)
        out[name]["losses"] = np.array([list(e.losses.values()) for e in result.history])
        out[name]["probed_on"] = np.array([e.metrics["probed_on"] for e in result.history[-1:]])
    return out


def _recorded(job):
    """Drive a training job, returning its losses per step."""
    losses = []
    while True:
        try:
            event = next(job)
        except StopIteration:
            return np.array(losses)
        losses.append(event.losses["loss"])
        yield event


def _save(jobs: dict[str, dict], path) -> None:
    """A rank's results as safetensors (no pickle), one "job/key" array each."""
    flat = {f"{job}/{k}": np.ascontiguousarray(v) for job, d in jobs.items() for k, v in d.items()}
    save_file(flat, str(path))


def _load(path) -> dict[str, dict]:
    jobs: dict[str, dict] = {}
    for name, value in load_file(str(path)).items():
        job, key = name.split("/", 1)
        jobs.setdefault(job, {})[key] = value
    return jobs


def _raised_by_failing_main() -> int:
    """1: this rank raised rank 0's own error; 2: it raised the RuntimeError naming it."""
    try:
        distributed.from_main(lambda: 1 / 0)
    except ZeroDivisionError:
        return 1
    except RuntimeError as error:
        return 2 if "ZeroDivisionError" in str(error) else 3
    return 0


def _worker(rank: int, store: str, folder: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):  # a container's hostname may not resolve
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # a collective that waits longer than this fails the test instead of hanging it
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(minutes=3),
    )
    try:
        assert distributed.world() == WORLD and distributed.rank() == rank
        jobs = _jobs(wrong=True)
        jobs["rank 0 fails"] = {"raised": np.array([_raised_by_failing_main()])}
        _save(jobs, f"{folder}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(ranks' results, one process's results): the two ranks run while this process runs
    the same jobs alone."""
    folder = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(
        _worker,
        args=(str(folder / "store"), str(folder)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    assert not distributed.active()
    alone = _jobs()
    while not context.join():
        pass
    ranks = [_load(folder / f"rank{r}.safetensors") for r in range(WORLD)]
    return ranks, alone


def _max_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a if k not in ("losses", "probed_on"))


def _drift(a: dict, b: dict, start: dict) -> float:
    """Distance between two runs' scope tensors over the distance b travelled from start."""
    keys = [k for k in start if "num_batches" not in k]
    apart = np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in keys))
    return float(apart / np.sqrt(sum(((b[k] - start[k]) ** 2).sum() for k in keys)))


@pytest.mark.parametrize(
    "job", ["train", "neggrad-seg", "neggrad-seg+context", "gradient-clipping"]
)
def test_two_processes_equal_one(runs, job):
    ranks, alone = runs
    one, two = alone[job], ranks[0][job]
    # The ranks never drift apart: bit for bit the same scope on both.
    assert _max_difference(two, ranks[1][job]) == 0
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, err_msg="losses")
    if job == "train":  # Adam: see the module's docstring
        assert _drift(two, one, alone["start"]) < 1e-3  # measured: 3e-6
    else:  # SGD: element by element, weights and batch-norm statistics
        for key in one:
            if key not in ("losses", "probed_on"):
                np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)
        # the probe ran on rank 0 and its metrics reached every rank
        assert [r[job]["probed_on"].tolist() for r in ranks] == [[0], [0]]


def test_a_failure_on_rank_0_stops_every_rank_at_once(runs):
    # Without the broadcast failure, rank 1 would wait until the 3-minute timeout and fail.
    ranks, _ = runs
    assert [r["rank 0 fails"]["raised"].tolist() for r in ranks] == [[1], [2]]


def test_a_wrong_sharding_differs(runs):
    ranks, alone = runs
    assert (
        _max_difference(ranks[0]["neggrad-seg-wrong"], alone["neggrad-seg"]) > 1e-4
    )  # measured: 2e-3


@pytest.mark.parametrize("argv", [["synth", "--n", "8"], ["bench", "removal"]])
def test_commands_that_run_in_one_process_refuse_torchrun(argv, tmp_path, monkeypatch, capsys):
    from shortcut_unlearning.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "under torchrun only run, train, bench seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not distributed.active()


def test_in_one_process_every_helper_hands_back_its_input():
    rows, t = np.arange(5), torch.ones(3, requires_grad=True)
    assert distributed.world() == 1 and distributed.is_main() and not distributed.active()
    assert distributed.shard(rows) is rows and distributed.global_sums(t) == (t,)
    assert distributed.gather_shares(t, [3]) is t and distributed.from_main(lambda: 7) == 7
    net = torch.nn.BatchNorm2d(3)
    with distributed.pooled_batch_norms(net):
        assert "forward" not in vars(net)
