"""Merges on a real local Ray instance (two CPUs, one per module; no mocks), run as a user runs
them: the sharded merge and the sweep are bitwise the single-process ones, a worker killed
mid-task is retried, reruns skip what is done, tune's cells score as tune's own.  A node that
cannot see the inputs is in test_ray_nodes.py (a cluster of two nodes).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mergealign_fast.engine.cluster import _groups
from mergealign_fast.output.manifest import verify_output
from mergealign_fast.output import partial_dir_for
from mergealign_fast.tools.synthetic import LLAMA_TINY, LlamaShape, ensure_synthetic_trio
from ray_cluster import cluster_env, run_cli, start_head, stop

pytest.importorskip("ray")

# ~77M parameters (154 MB per bf16 model): a task takes about a second, long enough to be
# caught writing.
LLAMA_KILLABLE = LlamaShape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4,
                            vocab=16000)


@pytest.fixture(scope="module")
def cluster():
    """(address, environment) of a local Ray instance with two CPUs."""
    env = cluster_env()
    try:
        yield start_head(2, env), env
    finally:
        stop(env)


@pytest.fixture(scope="module")
def killable_trio(tmp_path_factory):
    return ensure_synthetic_trio(tmp_path_factory.mktemp("killable"), LLAMA_KILLABLE, seed=5)


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _merge(trio, out, env, *extra) -> subprocess.CompletedProcess:
    done = run_cli(["merge", trio["base"], trio["domain"], trio["aligned"], "-o", out,
                    "--quiet", *extra], env)
    return done


def test_groups_are_contiguous_runs_of_about_equal_bytes():
    shards = [SimpleNamespace(size=s) for s in (10, 10, 10, 10, 30, 10, 10)]
    groups = _groups(shards, 3)
    assert [x for g in groups for x in g] == shards  # every shard once, in order
    assert [sum(s.size for s in g) for g in groups] == [30, 40, 20]
    assert _groups(shards[:2], 8) == [[shards[0]], [shards[1]]]  # never more than the shards


@pytest.mark.slow  # starts a Ray instance (~5 s) and Ray workers
def test_a_merge_split_by_shard_is_bitwise_the_single_process_merge(tiny_trio, tmp_path,
                                                                      cluster):
    address, env = cluster
    for method in ([], ["--method", "ties", "--density", "0.4"]):
        plain, split = tmp_path / f"plain{len(method)}", tmp_path / f"ray{len(method)}"
        options = ["--max-shard-size", "60KB", *method]
        assert _merge(tiny_trio, plain, env, *options).returncode == 0
        done = _merge(tiny_trio, split, env, *options, "--ray", address)
        assert done.returncode == 0, done.stderr
        assert len([p for p in split.iterdir() if p.suffix == ".safetensors"]) > 2
        assert _files(split) == _files(plain)  # shards, index, config, manifest
        assert verify_output(split) == []
    # a rerun with --resume finds it complete and verifies it
    done = _merge(tiny_trio, split, env, *options, "--resume", "--ray", address)
    assert done.returncode == 0 and "already complete" in done.stdout
    # a mergekit config through `run`: the same split
    config = tmp_path / "ties.yml"
    config.write_text(f"""merge_method: ties
base_model: {tiny_trio['base']}
models:
  - model: {tiny_trio['domain']}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {tiny_trio['aligned']}
    parameters: {{weight: 0.4, density: 0.5}}
""")
    # and a model set (three models besides the base; the domain expert listed twice)
    three = tmp_path / "three.yml"
    three.write_text(f"""merge_method: dare_ties
base_model: {tiny_trio['base']}
parameters: {{density: 0.5, seed: 2}}
models:
  - model: {tiny_trio['domain']}
    parameters: {{weight: 0.5}}
  - model: {tiny_trio['aligned']}
    parameters: {{weight: 0.3}}
  - model: {tiny_trio['domain']}
    parameters: {{weight: 0.2}}
""")
    for name in ("ties", "three"):
        for where, extra in (("run-plain", []), ("run-ray", ["--ray", address])):
            done = run_cli(["run", tmp_path / f"{name}.yml", tmp_path / where / name,
                            "--max-shard-size", "60KB", "--quiet", *extra], env)
            assert done.returncode == 0, done.stderr  # one OUT name: the model card names it
        assert _files(tmp_path / "run-ray" / name) == _files(tmp_path / "run-plain" / name)


@pytest.mark.slow  # starts a Ray instance (~5 s) and Ray workers
def test_a_sweep_on_ray_is_the_sweep_and_a_rerun_skips_finished_cells(tiny_trio, tmp_path,
                                                                      cluster):
    address, env = cluster

    def sweep(out, *extra):
        done = run_cli(["sweep", tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                        "-o", out, "--lambdas", "0,0.3,1", "--max-shard-size", "60KB",
                        "--quiet", *extra], env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    sweep(tmp_path / "plain")
    sweep(tmp_path / "ray", "--ray")  # alone: joins the instance this machine runs
    cells = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert cells == ["lambda-0", "lambda-0.3", "lambda-1"]
    for cell in cells:
        assert _files(tmp_path / "ray" / cell) == _files(tmp_path / "plain" / cell)

    def stamps(cell):
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / cell).iterdir()}

    before = {c: stamps(c) for c in cells}
    # one cell lost: the rerun merges it alone and leaves the others untouched
    shutil.rmtree(tmp_path / "ray" / "lambda-0.3")
    said = sweep(tmp_path / "ray", "--resume", "--ray", address)
    assert said.count("already complete") == 2 and "lambda-0.3 in" in said
    for cell in ("lambda-0", "lambda-1"):
        assert stamps(cell) == before[cell]
    assert _files(tmp_path / "ray" / "lambda-0.3") == _files(tmp_path / "plain" / "lambda-0.3")


# Plans a merge, then cuts an input short before the tasks read it: an error only a task finds.
CUT_SHORT_AFTER_PLANNING = """
import sys
from mergealign_fast.engine.cluster import merge_on_ray
from mergealign_fast.errors import MergeError
from mergealign_fast.plan import plan_merge

base, domain, aligned, out, address = sys.argv[1:]
plan = plan_merge(base, domain, aligned, out)
victim = plan.shards[0].tensors[-1].sources[1].file
victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
try:
    merge_on_ray(plan, address)
except MergeError as exc:
    sys.exit(f"error: {exc}")
"""


@pytest.mark.slow  # starts a Ray instance (~5 s) and Ray workers
def test_an_error_a_task_finds_is_one_line_not_retried_and_nothing_is_published(
        tmp_path, cluster):
    address, env = cluster
    trio = ensure_synthetic_trio(tmp_path / "trio", LLAMA_TINY, seed=3, max_shard_size=60_000)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CUT_SHORT_AFTER_PLANNING, trio["base"],
                           trio["domain"], trio["aligned"], tmp_path / "out", address],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 1 of 1 shard groups failed: out[model.safetensors]: ")
    assert "shrank since its header was read" in error and "out is unchanged" in error
    assert not (tmp_path / "out").exists() and not partial_dir_for(tmp_path / "out").exists()
    assert time.monotonic() - started < 120  # refused, not retried until a timeout


def _writer_of(partial: Path, exclude: int):
    """The pid of a process (not `exclude`) with a shard file of `partial` open."""
    prefix = str(partial) + os.sep
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in (exclude, os.getpid()):
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix) and target.endswith(".safetensors"):
                    return int(pid)
        except OSError:  # the process or descriptor went away meanwhile
            continue
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_retried_and_the_merge_is_still_bitwise(
        killable_trio, tmp_path, cluster):
    address, env = cluster
    trio = killable_trio
    out = tmp_path / "out"
    options = ["--max-shard-size", "20MB", "--no-fsync", "--quiet"]
    merging = subprocess.Popen(
        [sys.executable, "-m", "mergealign_fast", "merge", trio["base"], trio["domain"],
         trio["aligned"], "-o", out, *options, "--ray", address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    while merging.poll() is None and killed is None:
        killed = _writer_of(partial_dir_for(out), exclude=merging.pid)
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
    stdout, stderr = merging.communicate(timeout=600)
    assert killed is not None, "no worker was seen writing a shard"
    assert merging.returncode == 0, stderr
    assert verify_output(out) == []
    assert _merge(trio, tmp_path / "plain", env, *options).returncode == 0
    assert _files(out) == _files(tmp_path / "plain")


@pytest.mark.slow
def test_a_killed_command_is_finished_by_resume_keeping_the_journaled_shards(
        killable_trio, tmp_path, cluster):
    address, env = cluster
    trio, out = killable_trio, tmp_path / "out"
    options = ["--max-shard-size", "20MB", "--no-fsync", "--quiet"]
    command = [sys.executable, "-m", "mergealign_fast", "merge", trio["base"], trio["domain"],
               trio["aligned"], "-o", out, *options, "--ray", address]
    merging = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)
    journal = partial_dir_for(out) / "mergealign-manifest.json"
    while merging.poll() is None and not journal.exists():
        time.sleep(0.01)
    merging.kill()  # the command itself, after its first shard group was journaled
    merging.wait()
    assert journal.exists() and not out.exists()
    kept = json.loads(journal.read_text())["shards"]
    stamps = {name: (partial_dir_for(out) / name).stat().st_mtime_ns for name in kept}
    done = run_cli(command[3:] + ["--resume"], env)
    assert done.returncode == 0, done.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == stamps  # not redone
    assert _merge(trio, tmp_path / "plain", env, *options).returncode == 0
    assert _files(out) == _files(tmp_path / "plain")


@pytest.mark.slow
def test_tune_on_ray_scores_every_cell_as_tune_here_does(tmp_path_factory, tmp_path, cluster):
    pytest.importorskip("lm_eval")
    from eval_world import make_world

    address, env = cluster
    world = make_world(tmp_path_factory.mktemp("eval-world"))

    def tune(out, *extra):
        done = run_cli(["tune", world["base"], world["domain"], world["aligned"], "-o", out,
                        "--lambdas", "0.5,1", "--tasks", "clinic_mc", "--include-path",
                        world["tasks"], "--safety", world["harmful"], "--benign",
                        world["benign"], "--max-new-tokens", "8", "--keep", "--quiet",
                        *extra], env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def measured(out):  # the scores, not the time each took
        table = json.loads((out / "results.json").read_text())["table"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in table]

    tune(tmp_path / "here")
    tune(tmp_path / "ray", "--ray", address)
    assert measured(tmp_path / "ray") == measured(tmp_path / "here")
    for cell in ("lambda-0.5", "lambda-1"):
        assert _files(tmp_path / "ray" / "merges" / cell) == \
            _files(tmp_path / "here" / "merges" / cell)
    assert sorted(p.name for p in (tmp_path / "ray" / "answers").iterdir()) == \
        sorted(p.name for p in (tmp_path / "here" / "answers").iterdir())
    # a lost cell: the rerun evaluates it alone
    (tmp_path / "ray" / "cells" / "lambda-1.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "cells").iterdir()}
    assert "4 of 5 cells already evaluated" in tune(tmp_path / "ray", "--ray", address)
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "cells").iterdir()}
    assert {k: now[k] for k in kept} == kept and "lambda-1.json" in now
    assert measured(tmp_path / "ray") == measured(tmp_path / "here")
