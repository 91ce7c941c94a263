"""λ sweeps in one pass: every output is the single merge with its weights, bit for bit."""

import errno
import subprocess
import sys
from dataclasses import replace

import pytest

from mergealign_fast import MergeError, merge_checkpoints
from mergealign_fast.output.manifest import verify_output
from mergealign_fast.kernels import cpu
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.plan.sweep import parse_lambdas
from mergealign_fast.api import sweep_checkpoints

from test_engine import FailingNative, all_tensors_bytes, leftovers

LAMBDAS = [0.0, 0.3, 0.7, 1.0]


def test_each_output_equals_the_single_merge(tiny_trio, tmp_path):
    results = sweep_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                                tmp_path / "sweep", LAMBDAS, max_shard_size=100_000)
    assert [r.out_dir.name for r in results] == ["lambda-0", "lambda-0.3", "lambda-0.7",
                                                 "lambda-1"]
    for lam, result in zip(LAMBDAS, results):
        single = tmp_path / f"single-{lam}"
        merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], single,
                          domain_weight=lam, align_weight=round(1 - lam, 12),
                          max_shard_size=100_000)
        assert all_tensors_bytes(result.out_dir) == all_tensors_bytes(single), lam
        assert verify_output(result.out_dir) == []
    assert leftovers(tmp_path / "sweep") == []


def test_the_inputs_are_read_once(tiny_trio, tmp_path, monkeypatch):
    counting = FailingNative(fail_at=0, failure=None)  # counts merge_to_file calls only
    calls = []
    original = counting.real.merge_to_files

    def merge_to_files(*args):
        calls.append(len(args[1]))  # the targets
        return original(*args)

    counting.merge_to_files = merge_to_files
    monkeypatch.setattr(cpu, "native", lambda: counting)
    sweep_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "sweep", LAMBDAS)
    assert counting.calls == 0 and set(calls) == {len(LAMBDAS)}  # one K-output pass per chunk


def test_a_failed_sweep_keeps_every_output_resumable(tiny_trio, tmp_path, monkeypatch):
    failing = FailingNative(fail_at=0, failure=None)
    real = failing.real.merge_to_files
    state = {"n": 0}

    def merge_to_files(*args):
        state["n"] += 1
        return (errno.EIO, [], []) if state["n"] == 12 else real(*args)

    failing.merge_to_files = merge_to_files
    monkeypatch.setattr(cpu, "native", lambda: failing)
    with pytest.raises(MergeError, match="rerun with --resume"):
        sweep_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                          tmp_path / "sweep", LAMBDAS, max_shard_size=100_000)
    monkeypatch.undo()
    assert len(leftovers(tmp_path / "sweep")) == len(LAMBDAS)
    results = sweep_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                                tmp_path / "sweep", LAMBDAS, max_shard_size=100_000, resume=True)
    assert all(verify_output(r.out_dir) == [] for r in results)
    assert leftovers(tmp_path / "sweep") == []


def test_cli_and_bad_lambdas(tiny_trio, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mergealign_fast", "sweep", tiny_trio["base"],
                           tiny_trio["domain"], tiny_trio["aligned"], "-o", tmp_path / "s",
                           "--lambdas", "0.25,0.75", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("merged 21 tensors") == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["lambda-0.25", "lambda-0.75"]
    proc = subprocess.run([sys.executable, "-m", "mergealign_fast", "sweep", tiny_trio["base"],
                           tiny_trio["domain"], tiny_trio["aligned"], "-o", tmp_path / "t",
                           "--lambdas", "0.5,half"], capture_output=True, text=True)
    assert proc.returncode == 2 and "'half' is not a number" in proc.stderr
    with pytest.raises(ValueError, match="appears twice"):
        parse_lambdas("0.5,0.5")


@pytest.mark.parametrize("method", [Method("ties", domain_density=0.4, align_density=0.6),
                                    Method("dare_ties", domain_density=0.5, seed=2),
                                    Method("slerp")], ids=lambda m: m.name)
def test_a_sweep_of_any_method_equals_its_single_merges(tiny_trio, tmp_path, method):
    """λ sets w_d = λ, w_a = 1 - λ and t = λ; the passes a method needs are shared."""
    lambdas = [0.25, 0.75]
    results = sweep_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                                tmp_path / "sweep", lambdas, method=method)
    for lam, result in zip(lambdas, results):
        single = tmp_path / f"single-{lam}"
        merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], single,
                          domain_weight=lam, align_weight=1 - lam,
                          method=replace(method, t=lam) if method.name == "slerp" else method)
        assert all_tensors_bytes(result.out_dir) == all_tensors_bytes(single), lam
