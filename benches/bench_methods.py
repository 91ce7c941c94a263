"""Every merge method on the 1.1B-parameter bf16 trio, ours beside mergekit 0.1.5's same method.

Each contender runs as a separate process from the same starting state (see
bench_end_to_end.settle_page_cache); we record wall time, CPU time and peak RSS.  Ours runs with
--no-fsync: mergekit does not fsync its output either.  mergekit takes 20 s to several minutes a
run, so it gets one round; ours gets three (medians).

    pytest benches/bench_methods.py --benchmark-json=benches/results/methods.json

Parameters: weights 0.5/0.5, density 0.3 (TIES, DARE), t 0.5 (SLERP family), dtype bfloat16.
"""

import shutil
import sys
from pathlib import Path

import pytest

from bench_end_to_end import RESULTS, bench_command
from conftest import record

SECTION = ("merge methods, 1.1B-parameter bf16 trio, weights 0.5/0.5, density 0.3, t 0.5; ours "
           "--no-fsync (median of 3), mergekit one run")
ROUNDS_OURS = 3
ROUNDS_MERGEKIT = 1

# our method -> (our extra flags, mergekit method or None, mergekit per-model parameters, shared)
METHODS = {
    "task_arithmetic": ([], "task_arithmetic", "{weight: 0.5}", ""),
    "linear": ([], "linear", "{weight: 0.5}", ""),
    "ties": (["--density", "0.3"], "ties", "{weight: 0.5, density: 0.3}", ""),
    "dare_linear": (["--density", "0.3"], "dare_linear", "{weight: 0.5, density: 0.3}", ""),
    "dare_ties": (["--density", "0.3"], "dare_ties", "{weight: 0.5, density: 0.3}", ""),
    "slerp": (["--t", "0.5"], "slerp", None, "t: 0.5"),
    "slerp_vectors": (["--t", "0.5"], None, None, ""),
    "resta": (["--density", "0.3"], None, None, ""),
    "chipalign": (["--t", "0.5"], None, None, ""),
}


@pytest.fixture(scope="module")
def inputs(trio_1b):
    from mergealign_fast.io.checkpoint import open_checkpoint

    return [str(f) for role in ("base", "domain", "aligned")
            for f in open_checkpoint(trio_1b[role]).files]


def mergekit_config(method: str, trio) -> str:
    _, name, per_model, shared = METHODS[method]
    if name == "slerp":  # base_model and one other: t runs from aligned (0) to domain (1)
        models = f"  - model: {trio['aligned']}\n  - model: {trio['domain']}\n"
        base = trio["aligned"]
    else:
        models = "".join(f"  - model: {trio[r]}\n    parameters: {per_model}\n"
                         for r in ("domain", "aligned"))
        base = trio["base"]
    parameters = f"parameters: {{{shared}}}\n" if shared else ""
    # mergekit's linear merges its base_model too (and wants a weight for it): leave it out.
    base_line = "" if name == "linear" else f"base_model: {base}\n"
    return (f"merge_method: {name}\n{base_line}models:\n{models}{parameters}"
            "dtype: bfloat16\n")


@pytest.mark.parametrize("method", METHODS)
def test_ours(benchmark, trio_1b, inputs, tmp_path, method):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mergealign_fast", "merge", str(trio_1b["base"]),
           str(trio_1b["domain"]), str(trio_1b["aligned"]), "-o", str(out), "--quiet",
           "--no-fsync", "--method", method, *METHODS[method][0]]
    wall, cpu, rss, _ = bench_command(benchmark, f"ours {method}", cmd, out, ROUNDS_OURS, inputs)
    record(SECTION, f"ours {method}", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s",
           peak_rss=f"{rss / 1e6:.0f}MB")


def time_config_run(benchmark, trio, inputs, tmp_path, method: str, name: str, runner):
    """Write `method`'s mergekit config, time runner(config, out) as one command; returns
    (wall, cpu, peak RSS)."""
    config = tmp_path / f"{method}.yml"
    config.write_text(mergekit_config(method, trio))
    out = tmp_path / "out"
    wall, cpu, rss, _ = bench_command(benchmark, name, runner(config, out), out,
                                      ROUNDS_MERGEKIT, inputs)
    return wall, cpu, rss


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec[1]])
def test_mergekit(benchmark, trio_1b, inputs, tmp_path, method):
    wall, cpu, rss = time_config_run(benchmark, trio_1b, inputs, tmp_path, method,
                                     f"mergekit {method}",
                                     lambda config, out: ["mergekit-yaml", str(config), str(out)])
    ours = RESULTS.get(f"ours {method}")
    ratio = {"mergekit_over_ours": f"{wall / ours:.1f}x"} if ours else {}
    record(SECTION, f"mergekit {method}", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s",
           peak_rss=f"{rss / 1e6:.0f}MB", **ratio)


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_mergekit_with_our_kernels(benchmark, trio_1b, inputs, tmp_path, method):
    """mergekit's own pipeline with mergealign_fast.mergekit.backend registered: what a user who
    stays inside mergekit gets."""
    script = Path(__file__).with_name("mergekit_backend_run.py")
    wall, cpu, rss = time_config_run(
        benchmark, trio_1b, inputs, tmp_path, method, f"mergekit+ours {method}",
        lambda config, out: [sys.executable, str(script), str(config), str(out)])
    theirs = RESULTS.get(f"mergekit {method}")
    ratio = {"mergekit_over_this": f"{theirs / wall:.1f}x"} if theirs else {}
    record(SECTION, f"mergekit + our kernels {method}", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s",
           peak_rss=f"{rss / 1e6:.0f}MB", **ratio)


def test_configs_are_what_mergekit_reads(trio_1b, tmp_path):
    """The generated configs parse as mergekit configurations (cheap; no merge runs)."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration

    for method, spec in METHODS.items():
        if spec[1]:
            MergeConfiguration.model_validate(yaml.safe_load(mergekit_config(method,
                                                                             trio_1b)))
    assert Path(trio_1b["base"]).is_dir()
