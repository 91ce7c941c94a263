"""Merges of four models into a base on the 1.1B-parameter bf16 models: ours (`run`) beside
mergekit 0.1.5 on the same config, and the floor of reading the five inputs.

The trio of the other benches plus two more fine-tunes of its base ("expert 3", "expert 4";
5 x 2.2 GB, generated once).  Each contender is a separate process from the same warm page
cache (bench_end_to_end.settle_page_cache); we record wall time, CPU time and peak RSS.  Ours
runs with --no-fsync: mergekit does not fsync its output either.  mergekit gets one run without
a warm-up (its TIES of four takes minutes).

    pytest benches/bench_model_set.py --benchmark-json=benches/results/model-set.json
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

from bench_end_to_end import RESULTS, bench_command
from conftest import record

from mergealign_fast.tools.demo import default_cache_dir
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio

SECTION = ("four models into a base, 1.1B-parameter bf16 models (5 x 2.2 GB), warm; ours "
           "--no-fsync (median of 3), mergekit one run")
ROLES = ("base", "domain", "aligned", "expert 3", "expert 4")
ROUNDS_OURS = 3
ROUNDS_MERGEKIT = 1

# Configs of the shape public model cards use: weights summing to 1, densities around 0.5.
CONFIGS = {
    "ties": ("ties", "{{weight: {w}, density: 0.5}}", "normalize: true"),
    "dare_ties": ("dare_ties", "{{weight: {w}, density: 0.5}}", "normalize: true"),
    "task_arithmetic": ("task_arithmetic", "{{weight: {w}}}", ""),
}
WEIGHTS = (0.4, 0.3, 0.2, 0.1)


@pytest.fixture(scope="module")
def models():
    cache = Path(os.environ.get("MERGEALIGN_BENCH_CACHE", default_cache_dir()))
    return ensure_synthetic_trio(cache / "bench-llama-1.1b-v1", LLAMA_1B, roles=ROLES)


@pytest.fixture(scope="module")
def inputs(models):
    from mergealign_fast.io.checkpoint import open_checkpoint

    return [str(f) for folder in models.values() for f in open_checkpoint(folder).files]


def config_text(method: str, models) -> str:
    name, per_model, shared = CONFIGS[method]
    listed = "".join(f"  - model: {models[r]}\n    parameters: {per_model.format(w=w)}\n"
                     for r, w in zip(ROLES[1:], WEIGHTS))
    parameters = f"parameters: {{{shared}}}\n" if shared else ""
    return (f"merge_method: {name}\nbase_model: {models['base']}\nmodels:\n{listed}"
            f"{parameters}dtype: bfloat16\n")


def _timed(benchmark, models, inputs, tmp_path, method, label, command, rounds, warmup=1):
    config = tmp_path / f"{method}.yml"
    config.write_text(config_text(method, models))
    out = tmp_path / "out"
    return bench_command(benchmark, label, command(config, out), out, rounds, inputs,
                         warmup_rounds=warmup)[:3]


def test_read_floor(benchmark, inputs):
    """cat of the five inputs from the page cache: what any merge of them must read."""
    cmd = ["sh", "-c", f"cat {' '.join(inputs)} > /dev/null"]
    wall, cpu, _, _ = bench_command(benchmark, "set cat floor", cmd, Path("/nonexistent-output"),
                                    ROUNDS_OURS, inputs)
    record(SECTION, "cat inputs > /dev/null (floor)", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s")


@pytest.mark.parametrize("method", CONFIGS)
def test_ours(benchmark, models, inputs, tmp_path, method):
    wall, cpu, rss = _timed(
        benchmark, models, inputs, tmp_path, method, f"set ours {method}",
        lambda config, out: [sys.executable, "-m", "mergealign_fast", "run", str(config),
                             str(out), "--quiet", "--no-fsync"], ROUNDS_OURS)
    floor = RESULTS.get("set cat floor")
    ratio = {"over_cat": f"{wall / floor:.2f}x"} if floor else {}
    record(SECTION, f"ours {method}", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s",
           peak_rss=f"{rss / 1e6:.0f}MB", **ratio)


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("method", CONFIGS)
def test_mergekit(benchmark, models, inputs, tmp_path, method):
    wall, cpu, rss = _timed(
        benchmark, models, inputs, tmp_path, method, f"set mergekit {method}",
        lambda config, out: ["mergekit-yaml", str(config), str(out)], ROUNDS_MERGEKIT,
        warmup=0)  # minutes a run: the page cache is settled before it all the same
    ours = RESULTS.get(f"set ours {method}")
    ratio = {"mergekit_over_ours": f"{wall / ours:.1f}x"} if ours else {}
    record(SECTION, f"mergekit {method}", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s",
           peak_rss=f"{rss / 1e6:.0f}MB", **ratio)
