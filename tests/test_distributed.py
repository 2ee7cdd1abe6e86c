"""Multi-process data-parallel training (semiseg.distributed) with the Gloo backend on CPU."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch
from torch import distributed as dist

import semiseg
from semiseg import distributed as sd

from ._util import TINY_PARAMS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    return semiseg.make_phantom(0, shape=(10, 36, 40), labelled=3, n_tumours=2)


#: Runs each rank makes: name -> (method, extra TrainConfig settings). The annealed run has a
#: wall-clock budget, so the ranks' learning rates agree only through the shared schedule.
CASES = {
    "supervised": ("supervised", {"steps": 3}),
    "mean-teacher": ("mean-teacher", {"steps": 3}),
    "supervised-anneal": ("supervised", {"steps": 10**6, "minutes": 0.02, "anneal": 1.0}),
}


def _worker(rank, world, port, out_dir):
    """One rank: join the group from torchrun-style variables, train each method, save weights
    and first losses; then train once more through the CLI (rank 0 alone must write)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    sd.init_from_env("cpu", timeout_s=120)
    s = _data()
    for case, (method, settings) in CASES.items():
        config = semiseg.TrainConfig(batch_size=2, crop=32, seed=0, **settings)
        if "anneal" in settings:
            time.sleep(0.3 * rank)  # the ranks' clocks start apart
        gen = semiseg.iter_train(s.image, s.labels, tags=s.tags, method=method, params=TINY_PARAMS,
                                 config=config, device="cpu")
        first = None
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                model = stop.value
                break
            if p.step == 1:
                first = p.losses
        nets = {k: {n: t.clone() for n, t in net.state_dict().items()} for k, net in model.method.nets.items()}
        torch.save({"nets": nets, "first": first, "hook_removed": model.method.grad_sync is None},
                   f"{out_dir}/{case}-rank{rank}.pt")
    from semiseg.cli import main

    code = main(["train", f"{out_dir}/image.tif", f"{out_dir}/labels.tif", "-o", f"{out_dir}/model.pt",
                 "--no-runs", "--steps", "2", "--batch-size", "2", "--crop", "32", "--device", "cpu",
                 "--param", "features=8,16"])
    assert code == 0
    assert not dist.is_initialized()  # the CLI leaves the group when done


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the 2-rank Gloo job once for the tests below; returns (folder, stdout)."""
    from semiseg.io import write_volume

    tmp = tmp_path_factory.mktemp("ddp")
    s = _data()
    write_volume(tmp / "image.tif", s.image)
    write_volume(tmp / "labels.tif", s.labels)
    log = open(tmp / "stdout.txt", "w+")
    saved = os.dup(1)
    os.dup2(log.fileno(), 1)
    try:
        torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    log.seek(0)
    out = log.read()
    log.close()
    return tmp, out


@pytest.mark.parametrize("case", CASES)
def test_two_gloo_ranks_agree(two_ranks, case):
    tmp, _ = two_ranks
    method = CASES[case][0]
    r0, r1 = (torch.load(tmp / f"{case}-rank{r}.pt", weights_only=True) for r in (0, 1))
    # Each rank drew its own crops ...
    assert r0["first"] != r1["first"]
    # ... yet every parameter and buffer of every network is identical afterwards.
    for net in r0["nets"]:
        for name, t in r0["nets"][net].items():
            assert torch.equal(t, r1["nets"][net][name]), f"{net}.{name}"
    assert r0["hook_removed"] and r1["hook_removed"]
    # And training did something: weights moved away from the shared initialisation.
    torch.manual_seed(0)
    fresh = semiseg.get_method(method)(1, 2, params=TINY_PARAMS).nets["seg"].state_dict()
    assert any(not torch.equal(t, fresh[n]) for n, t in r0["nets"]["seg"].items())


def test_cli_train_under_two_ranks_writes_once(two_ranks):
    tmp, out = two_ranks
    assert out.count("trained supervised") == 1  # only rank 0 prints ...
    model = semiseg.load_model(tmp / "model.pt")  # ... and writes
    assert model.history[-1]["steps"] == 2
    assert np.isfinite(list(model.history[-1]["losses"].values())).all()


def test_single_process_group_trains_like_no_group(tmp_path):
    """A process group of one rank changes nothing: same seed streams, no gradient hooks."""
    s = _data()
    config = semiseg.TrainConfig(steps=2, batch_size=2, crop=32, seed=3)
    ref = semiseg.train(s.image, s.labels, tags=s.tags, params=TINY_PARAMS, config=config, device="cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert not sd.is_active() and sd.world_size() == 1 and sd.is_main()
        got = semiseg.train(s.image, s.labels, tags=s.tags, params=TINY_PARAMS, config=config, device="cpu")
    finally:
        sd.cleanup()
    for n, t in ref.method.nets["seg"].state_dict().items():
        assert torch.equal(t, got.method.nets["seg"].state_dict()[n]), n


@pytest.mark.parametrize(
    ("seed", "rank", "world", "expected"),
    [(7, 0, 1, 7), (7, 3, 1, 7)],  # one process: the base seed itself
)
def test_rank_seed_single_process(seed, rank, world, expected):
    assert sd.rank_seed(seed, rank, world) == expected


def test_rank_seeds_differ_and_are_reproducible():
    seeds = [sd.rank_seed(0, r, 4) for r in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [sd.rank_seed(0, r, 4) for r in range(4)]
    assert sd.rank_seed(1, 0, 4) != seeds[0]


def test_init_from_env_without_torchrun_is_a_no_op(monkeypatch):
    for v in sd.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    assert sd.init_from_env("cpu") == torch.device("cpu")
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="outside"):
        sd.init_from_env("cpu")


def test_helpers_without_group_are_no_ops():
    net = torch.nn.Linear(2, 2)
    net.weight.grad = torch.ones_like(net.weight)
    sd.all_reduce_gradients(net.parameters())
    assert torch.equal(net.weight.grad, torch.ones_like(net.weight))
    assert sd.any_true(True) and not sd.any_true(False)
    assert sd.max_value(0.25) == 0.25
