"""The conformance set: configs in the shapes model cards publish (tests/published_configs.py),
each through `run` and through mergekit 0.1.5 on a base and four fine-tunes, in float32 and in
bfloat16.  Every one runs in both (no refusal, no traceback) and agrees within its method's
documented bound (docs/mergekit.md, "How close to mergekit's tensors"):

- float32: mergekit computes in fp32 like us; the elementwise methods (task arithmetic, linear,
  TIES, breadcrumbs, nearswap, RAM) are bit for bit; those with norms, dot products or
  iterations over the whole tensor (slerp, multislerp, nuslerp, karcher, model_stock, SCE's
  variances) sum in another order: a few steps of the tensor's largest value.
- bfloat16: mergekit casts the inputs and computes in bf16, rounding after every operation,
  where we compute in fp32 and round once; sign election and top-k in bf16 then pick other
  elements now and then (TIES, breadcrumbs, SCE: up to ~32 steps of the largest value).
- arcee_fusion: mergekit scores importance in the config's dtype, we in float64, so a share of
  elements (0.3% in fp32, 9% in bf16) take or drop their task-vector element the other way;
  mergekit also writes it (and ramplus_tl) in fp32 under a bf16 config.

With --compute-dtype mergekit, every byte of every tensor is mergekit's: these configs, more
shapes (published_configs.MERGEKIT_ARITHMETIC_CONFIGS), and tensors over a million elements.
"""

import pytest

import published_configs as published
from mergealign_fast.dtypes import DType

pytest.importorskip("mergekit")

# (dtype, method) -> (the largest share of elements more than one step apart, the largest
# difference in steps of the tensor's largest value); measured on these models, then rounded
# up (benches/published_configs.py prints the measured table).
BOUNDS = {
    ("float32", "ties"): (0.0, 0.0), ("float32", "breadcrumbs_ties"): (0.0, 0.0),
    ("float32", "task_arithmetic"): (0.0, 0.0), ("float32", "linear"): (0.0, 0.0),
    ("float32", "nearswap"): (0.0, 0.0), ("float32", "ramplus_tl"): (0.0, 0.0),
    ("float32", "slerp"): (0.25, 3.0), ("float32", "model_stock"): (0.06, 6.0),
    ("float32", "multislerp"): (0.6, 8.0), ("float32", "nuslerp"): (0.25, 5.0),
    ("float32", "karcher"): (0.35, 5.0), ("float32", "sce"): (0.015, 2.0),
    ("float32", "arcee_fusion"): (0.005, None),
    ("bfloat16", "ties"): (0.04, 48.0), ("bfloat16", "breadcrumbs_ties"): (0.06, 48.0),
    ("bfloat16", "task_arithmetic"): (0.02, 2.0), ("bfloat16", "linear"): (0.0, 0.0),
    ("bfloat16", "nearswap"): (0.015, 2.0), ("bfloat16", "ramplus_tl"): (0.01, 1.0),
    ("bfloat16", "slerp"): (0.0, 0.5), ("bfloat16", "model_stock"): (0.002, 2.0),
    ("bfloat16", "multislerp"): (0.05, 3.0), ("bfloat16", "nuslerp"): (0.06, 3.0),
    ("bfloat16", "karcher"): (0.07, 3.0), ("bfloat16", "sce"): (0.02, 40.0),
    ("bfloat16", "arcee_fusion"): (0.1, 24.0),
}
FP32_OUT = {"arcee_fusion", "ramplus_tl"}  # mergekit writes these in fp32 whatever the dtype


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def models(request, tmp_path_factory):
    from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio

    dtype = DType.F32 if request.param == "float32" else DType.BF16
    folders = ensure_synthetic_trio(tmp_path_factory.mktemp(f"set-{request.param}"), LLAMA_TINY,
                                    seed=3, roles=published.SET, dtype=dtype)
    return request.param, folders


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    """mergekit's output of each (dtype, config), merged once for every test of this module."""
    merged = {}

    def output(models, name):
        dtype, folders = models
        if (dtype, name) not in merged:
            folder = tmp_path_factory.mktemp("theirs")
            config = published.write_config(folder, folders, name, dtype)
            published.run_mergekit(config, folder / "theirs")
            merged[dtype, name] = config, folder / "theirs"
        return merged[dtype, name]
    return output


def _method_of(config) -> str:
    return next(line.split(":")[1].strip() for line in config.read_text().splitlines()
                if line.startswith("merge_method:"))


@pytest.mark.slow  # mergekit merges each config (its import alone takes ~7 s)
@pytest.mark.parametrize("name", published.CONFIGS)
def test_a_published_config_runs_and_agrees_with_mergekit(models, mergekit_outputs, name,
                                                          tmp_path):
    dtype, _ = models
    config, theirs = mergekit_outputs(models, name)
    method = _method_of(config)
    done = published.run_ours(config, tmp_path / "ours")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    found = published.agreement(tmp_path / "ours", theirs)
    share, steps = BOUNDS[dtype, method]
    assert found.beyond <= share, found.shares
    assert steps is None or found.most_steps <= steps, found.shares
    if dtype == "bfloat16" and method in FP32_OUT:
        assert found.dtypes == ("BF16", "F32")
    else:
        assert found.dtypes == ()


@pytest.mark.slow  # as above
@pytest.mark.parametrize("name", [*published.CONFIGS, *published.MERGEKIT_ARITHMETIC_CONFIGS])
def test_compute_dtype_mergekit_gives_mergekits_tensors_bit_for_bit(models, mergekit_outputs,
                                                                   name, tmp_path):
    """--compute-dtype mergekit: every element of every tensor, and each tensor's dtype, as
    mergekit 0.1.5 writes them (under bf16 too: signs, top-k, importance in bf16)."""
    config, theirs = mergekit_outputs(models, name)
    done = published.run_ours(config, tmp_path / "ours", "--compute-dtype", "mergekit")
    assert done.returncode == 0, done.stderr
    differing = published.tensors_differing_in_bytes(tmp_path / "ours", theirs)
    assert not differing, published.agreement(tmp_path / "ours", theirs).shares


# Tensors over a million elements: mergekit's slerp sums norms and dots over slices of 2^20
# elements, and torch splits long reductions between threads.
LARGE = ("slerp by filters and gradients", "ties, booleans as numbers", "karcher of three",
         "multislerp of five, no base, eps", "sce of four, select_topk", "model_stock of four",
         "nuslerp of two, no base")


@pytest.fixture(scope="module")
def large_models(tmp_path_factory):
    from mergealign_fast.tools.synthetic import LlamaShape, ensure_synthetic_trio

    shape = LlamaShape(hidden=256, intermediate=4352, layers=2, heads=4, kv_heads=2, vocab=4352)
    return "bfloat16", ensure_synthetic_trio(tmp_path_factory.mktemp("large"), shape, seed=5,
                                             roles=published.SET, dtype=DType.BF16)


@pytest.mark.slow  # mergekit merges each config
@pytest.mark.parametrize("name", LARGE)
def test_compute_dtype_mergekit_is_bit_for_bit_on_tensors_over_a_million(large_models, name,
                                                                        tmp_path):
    _, folders = large_models
    config = published.write_config(tmp_path, folders, name, "bfloat16")
    published.run_mergekit(config, tmp_path / "theirs")
    done = published.run_ours(config, tmp_path / "ours", "--compute-dtype", "mergekit")
    assert done.returncode == 0, done.stderr
    differing = published.tensors_differing_in_bytes(tmp_path / "ours", tmp_path / "theirs")
    assert not differing, published.agreement(tmp_path / "ours", tmp_path / "theirs").shares
