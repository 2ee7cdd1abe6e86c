"""The CPU thread policy (issue 20): idle OpenMP threads sleep, threads fit the CPUs we may use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semiseg import threads
from semiseg.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _spin_count(code: str, **env) -> tuple[str | None, str]:
    """GNU OpenMP's spin count in a fresh interpreter running ``code`` (None: not GNU OpenMP),
    and what ``code`` printed."""
    base = {k: v for k, v in os.environ.items() if k not in threads.WAIT_ENV}
    base.update(PYTHONPATH=SRC, OMP_DISPLAY_ENV="verbose", OMP_NUM_THREADS="1", **env)
    res = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    spins = [ln.split("=")[1].strip().strip("'") for ln in res.stderr.splitlines() if "GOMP_SPINCOUNT" in ln]
    return (spins[0] if spins else None), res.stdout.strip()


@pytest.fixture(scope="module")
def gnu_openmp():
    spin, _ = _spin_count("import torch")
    if spin is None:
        pytest.skip("torch does not use GNU OpenMP here (no GOMP_SPINCOUNT to read)")
    assert spin == "300000"  # torch alone: idle threads spin before they sleep


def test_import_semiseg_loads_torch_with_sleeping_openmp_threads(gnu_openmp):
    # PASSIVE: idle threads sleep at once; and only in torch's runtime: os.environ (what child
    # processes inherit) is as it was.
    spin, out = _spin_count("import os, semiseg; print(os.environ.get('OMP_WAIT_POLICY'))")
    assert (spin, out) == ("0", "None")


def test_the_napari_worker_gets_the_policy_too(gnu_openmp):
    # The worker process (spawned) imports its module, hence the package, before torch.
    assert _spin_count("import semiseg.napari._jobs")[0] == "0"


def test_a_users_own_wait_policy_and_an_earlier_torch_are_left_alone(gnu_openmp):
    assert _spin_count("import semiseg", OMP_WAIT_POLICY="ACTIVE")[0] == "30000000000"
    assert _spin_count("import torch, semiseg")[0] == "300000"  # too late: documented


@pytest.mark.parametrize(
    ("files", "cap"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs of quota -> 2 threads
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),  # no quota
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_available_cpus_is_the_affinity_capped_by_the_cgroup_quota(tmp_path, files, cap):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.available_cpus(tmp_path) == (affinity if cap is None else min(cap, affinity))


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_cli_uses_no_more_threads_than_cpus_it_may_use(monkeypatch, torch_threads, capsys):
    for k in threads.THREADS_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(threads, "_torch_threads_at_import", 4)  # torch's default on a 4-core host
    monkeypatch.setattr(threads, "available_cpus", lambda: 3)  # ... where the process may use 3
    torch.set_num_threads(1)
    assert main(["methods"]) == 0
    assert torch.get_num_threads() == 3
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    assert main(["methods"]) == 0
    assert torch.get_num_threads() == 4  # never more than torch's default (physical cores)


def test_the_cli_keeps_a_users_thread_count(monkeypatch, torch_threads, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "available_cpus", lambda: 3)
    torch.set_num_threads(1)
    assert main(["methods"]) == 0
    assert torch.get_num_threads() == 1

