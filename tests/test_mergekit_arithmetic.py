"""--compute-dtype mergekit: what it refuses, the dtypes it writes, what the output records.
Its tensors are compared with mergekit's own, bit for bit, over the conformance set in
tests/test_published_configs.py (slow: it runs mergekit)."""

import json

import pytest

from mergealign_fast import methods
from mergealign_fast.dtypes import DType
from mergealign_fast.errors import PlanError
from mergealign_fast.mergekit.run import plan_config
from mergealign_fast.plan import MergeOptions
from test_cli import assert_clean_error, run_cli
from test_mergekit_yaml import DARE

pytest.importorskip("torch")


def _config(tmp_path, trio, method: str, extra: str = "dtype: bfloat16"):
    """test_mergekit_yaml's config of the trio (weights 0.6 and 0.4, densities 0.5), with
    another method and dtype lines."""
    path = tmp_path / "config.yml"
    path.write_text(DARE.replace("dare_ties", method).replace("dtype: bfloat16\n", extra + "\n")
                    .format(**trio))
    return path


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_a_method_mergekit_draws_at_random_is_refused_saying_why(tiny_trio, tmp_path, method):
    done = run_cli("run", _config(tmp_path, tiny_trio, method), tmp_path / "out",
                   "--compute-dtype", "mergekit")
    assert_clean_error(done, f"--compute-dtype mergekit: {method} cannot be computed as "
                       "mergekit computes it", "global generator")
    assert not (tmp_path / "out").exists()
    assert run_cli("run", _config(tmp_path, tiny_trio, method), tmp_path / "out",
                   "--quiet").returncode == 0  # this engine's arithmetic merges it


def test_mergekit_arithmetic_runs_on_the_cpu_only(tiny_trio, tmp_path):
    done = run_cli("mergekit-yaml", _config(tmp_path, tiny_trio, "ties"), tmp_path / "out",
                   "--cuda", "--compute-dtype", "mergekit")
    assert done.returncode == 2 and "--compute-dtype mergekit runs on the CPU" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_compute_dtype_is_refused(tiny_trio, tmp_path):
    done = run_cli("run", _config(tmp_path, tiny_trio, "ties"), tmp_path / "out",
                   "--compute-dtype", "bf16")
    assert done.returncode == 2 and "invalid choice: 'bf16'" in done.stderr
    with pytest.raises(ValueError, match="compute_dtype 'bf16': choose one of fp32, mergekit"):
        MergeOptions(compute_dtype="bf16")


@pytest.mark.parametrize("method, extra, written, ours", [
    ("arcee_fusion", "dtype: bfloat16", "F32", "BF16"),  # its float32 mask promotes the result
    ("ramplus_tl", "dtype: bfloat16", "F32", "BF16"),  # its float32 count ratio, likewise
    ("arcee_fusion", "dtype: bfloat16\nout_dtype: bfloat16", "BF16", "BF16"),  # out_dtype rules
    ("ties", "dtype: bfloat16", "BF16", "BF16"),
    ("ties", "dtype: float16", "F16", "F16"),
    ("arcee_fusion", "dtype: float32", "F32", "F32"),
])
def test_tensors_are_written_in_the_dtype_mergekit_writes(tiny_trio, tmp_path, method, extra,
                                                          written, ours):
    config = _config(tmp_path, tiny_trio, method, extra)
    if method == "arcee_fusion":  # one model besides the base
        config.write_text(f"merge_method: arcee_fusion\nbase_model: {tiny_trio['base']}\n"
                          f"models:\n  - model: {tiny_trio['domain']}\n{extra}\n")

    def written_in(options):
        plan = plan_config(config, tmp_path / "out", options)
        return {t.out_safetensors_dtype for s in plan.shards for t in s.tensors}
    assert written_in(MergeOptions(compute_dtype="mergekit")) == {written}
    assert written_in(MergeOptions()) == {ours}


def test_the_output_records_its_arithmetic_and_another_is_another_merge(tiny_trio, tmp_path):
    config = _config(tmp_path, tiny_trio, "ties")
    out = tmp_path / "out"
    assert run_cli("run", config, out, "--compute-dtype", "mergekit", "--quiet").returncode == 0
    manifest = json.loads((out / "mergealign-manifest.json").read_text())
    assert manifest["compute_dtype"] == "mergekit"
    assert run_cli("verify", out).returncode == 0
    again = run_cli("run", config, out, "--resume", "--compute-dtype", "mergekit", "--quiet")
    assert again.returncode == 0 and "already complete" in again.stdout
    other = run_cli("run", config, out, "--resume")
    assert_clean_error(other, "holds another merge", "option compute_dtype: 'mergekit' then, "
                       "'fp32' now")


def test_every_mergekit_method_is_reproduced_or_says_why_not():
    """A method registered inside mergekit has its mergekit form, or the reason it cannot."""
    for spec in methods.specs():
        form = spec.mergekit
        if form.registers is None:
            continue
        assert form.arithmetic is not None or "mergekit has no" not in form.unreproducible, \
            spec.name
        if form.without_base is not None:  # the method a base-less config runs: the same
            assert methods.get(form.without_base).mergekit.arithmetic is not None, spec.name


def test_a_merge_method_inside_a_slice_is_refused_as_mergekit_ignores_it(tiny_trio, tmp_path):
    config = tmp_path / "sliced.yml"
    config.write_text(f"""merge_method: ties
base_model: {tiny_trio['base']}
slices:
  - sources:
      - model: {tiny_trio['base']}
        layer_range: [0, 2]
      - model: {tiny_trio['domain']}
        layer_range: [0, 2]
    merge_method: slerp
""")
    with pytest.raises(PlanError, match=r"slices\[0\]: `merge_method` inside a slice: mergekit "
                       "0.1.5 ignores it"):
        plan_config(config, tmp_path / "out", MergeOptions())


def test_the_dtype_mergekit_computes_in(tiny_trio, tmp_path):
    """The config's dtype; else the inputs' own, promoted as torch promotes them."""
    from mergealign_fast.plan.mergekit_arithmetic import compute_dtype_of

    config = _config(tmp_path, tiny_trio, "ties", "")
    plan = plan_config(config, tmp_path / "out", MergeOptions(compute_dtype="mergekit"))
    tensor = plan.shards[0].tensors[0]
    assert compute_dtype_of(plan.options, tensor) == DType.BF16  # the trio's stored dtype
    assert compute_dtype_of(MergeOptions(input_dtype="fp16"), tensor) == DType.F16

