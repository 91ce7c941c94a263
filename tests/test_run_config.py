"""`mergealign-fast run CONFIG.yml OUT`: mergekit configs through our engine."""

import re
import subprocess
import sys

import numpy as np
import pytest

from mergealign_fast import merge_tensors
from mergealign_fast.dtypes import DType, f32_to_bf16_bits
from mergealign_fast.errors import PlanError
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.mergekit.config import load
from mergealign_fast.methods.core.spec import TRIO_MODELS
from mergealign_fast.methods.core.parameters import Method, Rule
from mergealign_fast.methods.core.settings import resolve
from mergealign_fast.methods.core.spec import SET_ROLE
from mergealign_fast.methods.core.oracle import method_error_bound, method_ref

from conftest import as_f64

ROLES = ("base", "domain", "aligned")
# Tests that run mergekit itself (its import alone takes ~7 s): CI runs them, `-m "not slow"`
# does not.
RUNS_MERGEKIT = pytest.mark.slow
# A base and four fine-tunes: the trio and two more experts.
SET = (*ROLES, "expert 3", "expert 4")


def cli(*args):
    return [sys.executable, "-m", "mergealign_fast", *map(str, args)]


def write_config(folder, trio, text: str):
    path = folder / "config.yml"
    path.write_text(text.format(**{r.replace(" ", "_"): trio[r] for r in trio}))
    return path


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """The tiny trio's shape with two more fine-tunes of its base, in fp32: TIES then finds no
    ties at its thresholds (in bf16 they are common, and mergekit keeps an arbitrary subset of
    them where we keep the first in index order)."""
    from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio

    return ensure_synthetic_trio(tmp_path_factory.mktemp("tiny_set"), LLAMA_TINY, seed=3,
                                 roles=SET, dtype=DType.F32)


TIES = """
models:
  - model: {base}
  - model: {domain}
    parameters:
      weight: 0.7
      density: [0.3, 0.6]
  - model: {aligned}
    parameters:
      weight:
        - filter: mlp
          value: 0.2
        - value: 0.5
      density: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
out_dtype: bfloat16
"""


def test_filters_gradients_and_per_model_parameters_reach_each_tensor(tiny_trio, tmp_path):
    config = write_config(tmp_path, tiny_trio, TIES)
    subprocess.run(cli("run", config, tmp_path / "out", "--quiet"), check=True)
    merged = open_checkpoint(tmp_path / "out")
    models = {r: open_checkpoint(tiny_trio[r]) for r in ROLES}
    # (tensor, domain density, aligned weight) as mergekit resolves them: the density gradient
    # runs over the 2 layers (layer 0 -> 0.3, layer 1 -> 0.6, outside the layers 0.3) and the
    # aligned weight is 0.2 on mlp tensors.
    expected = {"model.embed_tokens.weight": (0.3, 0.5),
                "model.layers.0.mlp.up_proj.weight": (0.3, 0.2),
                "model.layers.1.mlp.up_proj.weight": (0.6, 0.2),
                "model.layers.1.self_attn.q_proj.weight": (0.6, 0.5)}
    for name, (density, w_align) in expected.items():
        raws = [read_elements(models[r].tensors[name]) for r in ROLES]
        reference = merge_tensors(*raws, domain_weight=0.7, align_weight=w_align,
                                  out_dtype="bf16", name=name,
                                  method=Method("ties", domain_density=density,
                                                align_density=0.5, normalize=True))
        np.testing.assert_array_equal(read_elements(merged.tensors[name]).ravel(),
                                      reference.ravel(), name)


def test_task_arithmetic_config_equals_the_merge_command(tiny_trio, tmp_path):
    config = write_config(tmp_path, tiny_trio, """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.3}}
  - model: {aligned}
    parameters: {{weight: 0.9}}
""")
    subprocess.run(cli("run", config, tmp_path / "run", "--quiet"), check=True)
    subprocess.run(cli("merge", *(tiny_trio[r] for r in ROLES), "-o", tmp_path / "merge",
                       "--domain-weight", 0.3, "--align-weight", 0.9, "--quiet"), check=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == \
        (tmp_path / "merge" / "model.safetensors").read_bytes()


def test_every_unsupported_key_is_named_before_any_tensor_is_read(tiny_trio, tmp_path):
    config = write_config(tmp_path, tiny_trio, """
slices: []
merge_method: ties
base_model: {base}
chat_template: chatml
tokenizer_source: {{source: union}}
modules: {{}}
models:
  - model: {domain}
    parameters: {{weight: 1, densty: 0.5}}
  - model: {aligned}
    parameters: {{weight: 1, t: 0.5, epsilon: 0.1, density: [{{pattern: mlp, value: 0.3}}]}}
""")
    with pytest.raises(PlanError) as info:
        load(config)
    text = str(info.value)
    for needle in ("`slices` or `models`, not both", "tokenizer_source", "`modules`",
                   "`densty`: did you mean `density`?", "`pattern` is not a condition's key"):
        assert needle in text, needle
    # mergekit ignores them for ties (della's and slerp's): a warning, not an error
    assert "`t`" not in text and "`epsilon`" not in text
    result = subprocess.run(cli("run", config, tmp_path / "out"), capture_output=True,
                            text=True)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert "Traceback" not in result.stderr


def test_keys_mergekit_ignores_are_ignored_with_one_warning_each(tiny_trio, tmp_path):
    """Published cards carry keys mergekit 0.1.5 accepts and ignores: a top-level `name`,
    `int8_mask` or `pad_to_multiple_of`, a model's `lora`, parameters no method reads, a shared
    parameter inside a model's parameters, a condition's comment.  Each is said once; the
    merge is the one without them."""
    body = """merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.4, density: [{{filter: mlp, value: 0.7}}, {{value: 0.5}}]}}
parameters: {{normalize: true}}
dtype: float32
"""
    extra = body.replace("models:\n", "name: my-merge\nint8_mask: true\n"
                         "pad_to_multiple_of: 64\nmodels:\n", 1)
    extra = extra.replace("weight: 0.6,", "weight: 0.6, smooth: true, normalize: false,")
    extra = extra.replace("{{filter: mlp, value: 0.7}}", "{{filter: mlp, value: 0.7, note: x}}")
    extra = extra.replace("  - model: {aligned}\n", "  - model: {aligned}\n    lora: none\n")
    extra = extra.replace("{{normalize: true}}", "{{normalize: true, allow_negative_weights: 1}}")
    (tmp_path / "plain").mkdir()
    plain = write_config(tmp_path / "plain", tiny_trio, body)
    config = write_config(tmp_path, tiny_trio, extra)
    subprocess.run(cli("run", plain, tmp_path / "plain-out", "--quiet"), check=True)
    result = subprocess.run(cli("run", config, tmp_path / "out", "--quiet"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    for needle in ("key `name`", "key `int8_mask`", "key `pad_to_multiple_of`",
                   "models[1]: key `lora`", "parameter `smooth`", "`normalize` in a model's",
                   "a condition's key `note`", "parameter `allow_negative_weights`"):
        assert sum(needle in line for line in warnings) == 1, (needle, warnings)
    assert all("ignored, as mergekit ignores it" in line for line in warnings)
    assert len(warnings) == 8
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "plain-out" / "model.safetensors").read_bytes()


def test_a_parameter_the_method_does_not_take_is_ignored_with_a_warning(tiny_trio, tmp_path):
    """As mergekit ignores it: `weight` on slerp, `t` on linear come from configs written for
    another method."""
    config = write_config(tmp_path, tiny_trio, """
merge_method: slerp
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.3}}
parameters:
  t: 0.25
  weight: 0.7
""")
    result = subprocess.run(cli("run", config, tmp_path / "out", "--quiet"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert warnings == [f"mergealign-fast: warning: {config}: parameter `weight` does not "
                        "apply to slerp: ignored, as mergekit ignores it"]
    (tmp_path / "plain").mkdir()
    without = write_config(tmp_path / "plain", tiny_trio, "merge_method: slerp\nbase_model: "
                           "{base}\nmodels:\n  - model: {domain}\nparameters:\n  t: 0.25\n")
    subprocess.run(cli("run", without, tmp_path / "plain-out", "--quiet"), check=True)
    name = "model.layers.1.mlp.up_proj.weight"
    assert np.array_equal(read_elements(open_checkpoint(tmp_path / "out").tensors[name]),
                          read_elements(open_checkpoint(tmp_path / "plain-out").tensors[name]))


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {domain}\n", "needs a `weight`"),
    ("merge_method: slerp\nmodels:\n  - model: {domain}\n  - model: {aligned}\n",
     "needs `base_model`"),
    ("merge_method: ties\nmodels: [\n", "not valid YAML"),
    ("merge_method: linear\nmodels:\n  - model: hub/name\n", "hub/name: cannot reach"),
    ("merge_method: linear\nmodels:\n  - model: /no/such/folder\n",
     "no such local folder, and not a Hugging Face Hub repo id"),
])
def test_config_mistakes_are_clear_errors(tiny_trio, tmp_path, text, message):
    with pytest.raises(PlanError, match=message):
        load(write_config(tmp_path, tiny_trio, text))


def test_weight_rules_that_miss_a_tensor_are_an_error_not_a_default(tiny_trio, tmp_path):
    config = write_config(tmp_path, tiny_trio, """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}]
""")
    result = subprocess.run(cli("run", config, tmp_path / "out"), capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "no weight for the domain model" in result.stderr


def test_slerp_runs_from_base_model_to_the_other_model(tiny_trio, tmp_path):
    config = write_config(tmp_path, tiny_trio, """
merge_method: slerp
base_model: {aligned}
models:
  - model: {aligned}
  - model: {domain}
parameters:
  t: 0.25
""")
    subprocess.run(cli("run", config, tmp_path / "out", "--quiet"), check=True)
    merged = open_checkpoint(tmp_path / "out")
    models = {r: open_checkpoint(tiny_trio[r]) for r in ROLES}
    name = "model.layers.0.mlp.down_proj.weight"
    raws = [read_elements(models[r].tensors[name]) for r in ROLES]
    expected = merge_tensors(*raws, method=Method("slerp", t=0.25), name=name)
    np.testing.assert_array_equal(read_elements(merged.tensors[name]), expected)


MERGEKIT_CONFIGS = {
    "task arithmetic, gradients, filters": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters:
      weight: [0.2, 0.8]
  - model: {aligned}
    parameters:
      weight: [{{filter: self_attn, value: 0.9}}, {{value: 0.4}}]
parameters:
  lambda: 0.9
dtype: float32
""",
    # a shared weight must not reach the base twice (it once gave (2 m0 + m1) / 3)
    "linear, one shared weight, no base_model": """
merge_method: linear
models:
  - model: {domain}
  - model: {aligned}
parameters:
  weight: 0.5
dtype: float32
""",
}


# Four models besides the base (a model set), as public model cards merge them.
SET_CONFIGS = {
    # mergekit's base is optional for multislerp: any number of models without one (five:
    # tests/published_configs.py).
    "multislerp of three, no base": """
merge_method: multislerp
models:
  - model: {domain}
    parameters: {{weight: 0.5}}
  - model: {expert_3}
    parameters: {{weight: 0.3}}
  - model: {aligned}
    parameters: {{weight: 0.4}}
parameters: {{normalize_weights: 0}}
dtype: float32
""",
    "multislerp of one, no base": """
merge_method: multislerp
models:
  - model: {expert_4}
    parameters: {{weight: 0.3}}
dtype: float32
""",
    "ties of four experts, per-model densities, a shared gradient": """
merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.4, density: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.3, density: 0.7}}
  - model: {expert_3}
    parameters: {{weight: [0.1, 0.5], density: 0.3}}
  - model: {expert_4}
    parameters: {{weight: 0.2, density: 0.9}}
parameters:
  normalize: true
dtype: float32
""",
    "linear of five, no base_model": """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {domain}
    parameters: {{weight: 0.2}}
  - model: {aligned}
    parameters: {{weight: [{{filter: mlp, value: 0.1}}, {{value: 0.3}}]}}
  - model: {expert_3}
    parameters: {{weight: 0.2}}
  - model: {expert_4}
    parameters: {{weight: 0.2}}
dtype: float32
""",
    "breadcrumbs_ties of four, gamma per model": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.4, density: 0.5, gamma: 0.02}}
  - model: {aligned}
    parameters: {{weight: 0.3, density: 0.7, gamma: 0.1}}
  - model: {expert_3}
    parameters: {{weight: 0.2, density: 0.4}}
  - model: {expert_4}
    parameters: {{weight: 0.1, density: 0.9}}
parameters: {{rescale: true}}
dtype: float32
""",
    "model_stock of four": """
merge_method: model_stock
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {expert_3}
  - model: {expert_4}
dtype: float32
""",
    "nuslerp of two with a base, weights by layer": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {expert_3}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {domain}
    parameters: {{weight: 0.5}}
parameters: {{nuslerp_flatten: true}}
dtype: float32
""",
    "nuslerp of two, no base": """
merge_method: nuslerp
models:
  - model: {aligned}
    parameters: {{weight: 0.3}}
  - model: {expert_4}
    parameters: {{weight: 0.6}}
dtype: float32
""",
    "task arithmetic of four, lambda": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {expert_3}
  - model: {expert_4}
parameters:
  weight: 0.3
  lambda: 0.8
dtype: float32
""",
}


@RUNS_MERGEKIT
@pytest.mark.parametrize("text", MERGEKIT_CONFIGS.values(), ids=list(MERGEKIT_CONFIGS))
def test_same_model_as_mergekit_yaml(tiny_trio, tmp_path, text):
    """mergekit 0.1.5 runs the same config (fp32 compute, fp32 output): every tensor agrees
    within twice the oracle bound (both are fp32 evaluations of the same formula)."""
    _assert_same_as_mergekit(write_config(tmp_path, tiny_trio, text), tmp_path)


@RUNS_MERGEKIT
@pytest.mark.parametrize("text", SET_CONFIGS.values(), ids=list(SET_CONFIGS))
def test_four_models_same_model_as_mergekit_yaml(tiny_set, tmp_path, text):
    _assert_same_as_mergekit(write_config(tmp_path, tiny_set, text), tmp_path)


@RUNS_MERGEKIT
def test_linear_over_one_model_is_that_model_as_in_mergekit(tiny_trio, tmp_path):
    _assert_same_as_mergekit(write_config(tmp_path, tiny_trio, """
merge_method: linear
models:
  - model: {domain}
    parameters: {{weight: 0.7}}
dtype: float32
"""), tmp_path)


@pytest.mark.parametrize("text, message", [
    ("merge_method: nuslerp\nmodels:\n  - model: {domain}\n    parameters: {{weight: 1}}\n"
     "  - model: {aligned}\n    parameters: {{weight: 1}}\nparameters: {{nuslerp_flatten: "
     "maybe}}\n", "parameter `nuslerp_flatten`: 'maybe' is not true or false"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {domain}\n"
     "parameters: {{filter_wise: true}}\n", "at least two other models"),
    ("merge_method: nuslerp\nmodels:\n  - model: {domain}\n  - model: {aligned}\n"
     "    parameters: {{weight: 1}}\n", "needs a `weight` for this model"),
])
def test_what_nuslerp_and_model_stock_refuse(tiny_set, tmp_path, text, message):
    with pytest.raises(PlanError, match=re.escape(message)):
        load(write_config(tmp_path, tiny_set, text))


def test_two_model_methods_name_the_model_count(tiny_set, tmp_path):
    with pytest.raises(PlanError, match="slerp takes base_model and exactly one other model"):
        load(write_config(tmp_path, tiny_set, "merge_method: slerp\nbase_model: {base}\n"
                          "models:\n  - model: {domain}\n  - model: {aligned}\n"
                          "  - model: {expert_3}\nparameters: {{t: 0.5}}\n"))


@RUNS_MERGEKIT
def test_models_stored_in_different_dtypes_merge_to_float32_as_in_mergekit(tmp_path):
    """Without `dtype`, torch promotes bf16 + fp32 to fp32 in mergekit: so does `run` (the
    `merge` command keeps the base model's dtype, its documented rule)."""
    from mergealign_fast.tools.synthetic import LLAMA_TINY, write_synthetic_model

    trio = {}
    for role, dtype in (("base", DType.BF16), ("domain", DType.F32), ("aligned", DType.BF16)):
        trio[role] = tmp_path / role
        write_synthetic_model(trio[role], LLAMA_TINY, role, seed=3, dtype=dtype)
    config = write_config(tmp_path, trio, "merge_method: task_arithmetic\nbase_model: {base}\n"
                          "models:\n  - model: {domain}\n    parameters: {{weight: 0.5}}\n"
                          "  - model: {aligned}\n    parameters: {{weight: 0.5}}\n")
    _assert_same_as_mergekit(config, tmp_path)
    dtypes = {loc.entry.dtype for loc in open_checkpoint(tmp_path / "ours").tensors.values()}
    assert dtypes == {"F32"}
    subprocess.run(cli("merge", trio["base"], trio["domain"], trio["aligned"], "-o",
                       tmp_path / "merge", "--quiet"), check=True)
    dtypes = {loc.entry.dtype for loc in open_checkpoint(tmp_path / "merge").tensors.values()}
    assert dtypes == {"BF16"}


def _assert_same_as_mergekit(config, tmp_path):
    """The config through `run` and through mergekit 0.1.5: the same tensors, dtypes and names,
    values within twice the oracle bound of the output dtype."""
    pytest.importorskip("mergekit")
    from published_configs import run_mergekit

    subprocess.run(cli("run", config, tmp_path / "ours", "--quiet"), check=True)
    run_mergekit(config, tmp_path / "theirs")
    ours, theirs = open_checkpoint(tmp_path / "ours"), open_checkpoint(tmp_path / "theirs")
    run = load(config)
    models = [open_checkpoint(folder) for folder in run.merged_folders]
    roles = tuple(SET_ROLE.format(i + 1) for i in range(len(run.models))) or TRIO_MODELS
    assert set(ours.tensors) == set(theirs.tensors)
    for name, loc in ours.tensors.items():
        from mergealign_fast.methods.core.settings import layer_position

        assert loc.entry.dtype == theirs.tensors[name].entry.dtype, name
        settings = resolve(run.method, name, layer_position(name, 2), (0.0,) * len(roles),
                           roles)
        inputs = [as_f64(read_elements(m.tensors[name]), DType[m.tensors[name].entry.dtype])
                  .ravel() for m in models]
        exact, scale = method_ref(settings, name, *inputs)
        bound = method_error_bound(exact, scale, DType[loc.entry.dtype], len(roles))
        out_dtype = DType[loc.entry.dtype]
        difference = np.abs(as_f64(read_elements(loc), out_dtype).ravel()
                            - as_f64(read_elements(theirs.tensors[name]), out_dtype).ravel())
        assert np.all(difference <= 2 * bound), name


def test_linear_base_model_needs_a_weight_as_in_mergekit(tiny_trio, tmp_path):
    text = ("merge_method: linear\nbase_model: {base}\nmodels:\n"
            "  - model: {domain}\n    parameters: {{weight: 0.5}}\n"
            "  - model: {aligned}\n    parameters: {{weight: 0.5}}\n")
    with pytest.raises(PlanError, match="linear merges it too"):
        load(write_config(tmp_path, tiny_trio, text))
    config = write_config(tmp_path, tiny_trio, text.replace("base_model: {base}\n", ""))
    subprocess.run(cli("run", config, tmp_path / "out", "--quiet"), check=True)
    # Two models, no base: (0.5 domain + 0.5 aligned) / 1.
    name = "model.layers.1.mlp.up_proj.weight"
    raws = [read_elements(open_checkpoint(tiny_trio[r]).tensors[name]) for r in ROLES]
    expected = merge_tensors(*raws, domain_weight=0.5, align_weight=0.5, method="linear")
    np.testing.assert_array_equal(
        read_elements(open_checkpoint(tmp_path / "out").tensors[name]), expected)


@pytest.mark.parametrize("value, message", [
    ('"abc"', "'abc' is not a finite number"),
    ('[0.3, "x"]', "'x' is not a finite number"),
    ('"nan"', "'nan' is not a finite number"),
    ('[{filter: mlp, value: "q"}]', "'q' is not a finite number"),
])
def test_parameter_values_of_the_wrong_type_are_named(tiny_trio, tmp_path, value, message):
    text = ("merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - model: {domain}\n    parameters: {{weight: 0.5, density: "
            + value.replace("{", "{{").replace("}", "}}") + "}}\n"
            "  - model: {aligned}\n    parameters: {{weight: 0.5}}\n"
            "parameters: {{normalize: 2, rescale: l2}}\n")
    with pytest.raises(PlanError) as info:
        load(write_config(tmp_path, tiny_trio, text))
    text = str(info.value)
    assert message in text and "`normalize`: 2 is not true or false" in text
    assert "`rescale`: 'l2' is not true, false or one of" in text


TRUE_SPELLINGS = ("true", "1", "1.0", '"true"', '"True"', "yes", '"on"', '"1"')
FALSE_SPELLINGS = ("false", "0", "0.0", '"false"', "no", '"off"', '"0"', '"F"')


@pytest.mark.parametrize("normalize", TRUE_SPELLINGS + FALSE_SPELLINGS)
def test_booleans_in_every_spelling_mergekit_reads(tiny_trio, tmp_path, normalize):
    """mergekit validates booleans as pydantic does: 1, 1.0, "true", "on"... are true; its
    outputs for `normalize: 1.0` and `true` are identical, and so are ours."""
    text = ("merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - model: {domain}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "  - model: {aligned}\n    parameters: {{weight: 0.3, density: 0.5}}\n"
            "parameters: {{normalize: %s, rescale: %s}}\n")
    spelled = load(write_config(tmp_path, tiny_trio, text % (normalize, normalize)))
    plain = "true" if normalize in TRUE_SPELLINGS else "false"
    (tmp_path / "plain").mkdir()
    written = load(write_config(tmp_path / "plain", tiny_trio, text % (plain, plain)))
    assert spelled.method == written.method
    assert {r.parameter: r.setting for r in written.method.rules
            if r.parameter in ("normalize", "rescale")} == \
        ({"normalize": True, "rescale": "l1"} if plain == "true"
         else {"normalize": False, "rescale": "none"})


@pytest.mark.parametrize("value, read", [('"1e-3"', 0.001), ("true", 1.0), ("2", 2.0)])
def test_numbers_and_counts_as_mergekit_reads_them(tiny_trio, tmp_path, value, read):
    text = ("merge_method: dare_linear\nbase_model: {base}\nmodels:\n"
            "  - model: {domain}\n    parameters: {{weight: %s, density: 0.5}}\n"
            "parameters: {{seed: 3.0, normalize: false}}\n" % value)
    rules = load(write_config(tmp_path, tiny_trio, text)).method.rules
    assert Rule("weight", "domain", read) in rules and Rule("seed", None, 3) in rules
    assert isinstance(next(r for r in rules if r.parameter == "seed").setting, int)
    with pytest.raises(PlanError, match="`seed`: 2.5 is not a non-negative integer"):
        load(write_config(tmp_path, tiny_trio, text.replace("seed: 3.0", "seed: 2.5")))


def test_a_model_s_own_parameters_come_before_the_shared_ones_as_in_mergekit(tiny_trio,
                                                                            tmp_path):
    """mergekit reads a model's `parameters`, then the top level's: a shared weight fills in
    only where the model has none (it once overrode the model's own)."""
    run = load(write_config(tmp_path, tiny_trio, """
merge_method: ties
base_model: {base}
parameters: {{weight: 0.5, density: 0.3}}
models:
  - model: {domain}
    parameters: {{weight: 0.9, density: [{{filter: mlp, value: 0.8}}]}}
  - model: {aligned}
"""))
    mlp = resolve(run.method, "model.layers.0.mlp.up_proj.weight", 0.0, (0.0, 0.0))
    attention = resolve(run.method, "model.layers.0.self_attn.q_proj.weight", 0.0, (0.0, 0.0))
    assert mlp.weights == attention.weights == (0.9, 0.5)
    assert mlp.densities == (0.8, 0.3)
    assert attention.densities == (0.3, 0.3)  # the model's filter misses: the shared value


def test_passthrough_over_one_model_copies_it_exactly(tiny_trio, tmp_path):
    """mergekit's way to convert or re-shard a model: every value as it was (bf16 to fp32)."""
    config = write_config(tmp_path, tiny_trio, "merge_method: passthrough\nmodels:\n"
                          "  - model: {domain}\ndtype: float32\n")
    subprocess.run(cli("run", config, tmp_path / "out", "--quiet"), check=True)
    copied, source = open_checkpoint(tmp_path / "out"), open_checkpoint(tiny_trio["domain"])
    for name, loc in source.tensors.items():
        assert copied.tensors[name].entry.dtype == "F32"
        assert np.array_equal(read_elements(copied.tensors[name]).ravel(),
                              as_f64(read_elements(loc), DType.BF16).ravel().astype(np.float32))
    with pytest.raises(PlanError, match="copies one model"):
        load(write_config(tmp_path, tiny_trio, "merge_method: passthrough\nmodels:\n"
                          "  - model: {domain}\n  - model: {aligned}\n"))


def test_passthrough_scale_multiplies_each_tensor_by_its_scale(tiny_trio, tmp_path):
    """mergekit's passthrough `scale` (its test zeroes o_proj and keeps the rest): each tensor
    is scale·x rounded once to its dtype, the model's own scale before the top level's."""
    config = write_config(tmp_path, tiny_trio, """
merge_method: passthrough
models:
  - model: {domain}
    parameters:
      scale: [{{filter: o_proj, value: 0}}, {{filter: up_proj, value: 0.3}}]
parameters: {{scale: 1.5}}
""")
    subprocess.run(cli("run", config, tmp_path / "out", "--quiet"), check=True)
    scaled, source = open_checkpoint(tmp_path / "out"), open_checkpoint(tiny_trio["domain"])
    seen = set()
    for name, loc in source.tensors.items():
        scale = 0.0 if "o_proj" in name else 0.3 if "up_proj" in name else 1.5
        seen.add(scale)
        x = as_f64(read_elements(loc), DType.BF16).astype(np.float32)
        expected = f32_to_bf16_bits(x * np.float32(scale))  # fp32 product, one rounding to bf16
        assert np.array_equal(read_elements(scaled.tensors[name]).view(np.uint16).ravel(),
                              expected.ravel()), name
    assert seen == {0.0, 0.3, 1.5}
    with pytest.raises(PlanError, match="one parameter, `scale`"):
        load(write_config(tmp_path, tiny_trio, "merge_method: passthrough\nmodels:\n"
                          "  - model: {domain}\n    parameters: {{weight: 2}}\n"))


def test_a_method_without_weights_runs_from_a_config_without_parameters(tiny_trio, tmp_path):
    """model_stock takes no parameter: a config that gives none (or a weight mergekit
    ignores) runs, with no check of weights it does not use."""
    for extra in ("", "parameters: {{weight: 0.5}}\n"):
        config = write_config(tmp_path, tiny_trio, "merge_method: model_stock\nbase_model: "
                              "{base}\nmodels:\n  - model: {domain}\n  - model: {aligned}\n"
                              + extra)
        out = tmp_path / f"out{len(extra)}"
        done = subprocess.run(cli("run", config, out, "--quiet"), capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr


def test_a_model_listed_twice_in_a_set_is_two_models_with_their_own_parameters(tiny_trio,
                                                                              tmp_path):
    run = load(write_config(tmp_path, tiny_trio, """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.3}}
  - model: {domain}
    parameters: {{weight: 0.2}}
"""))
    roles = ("model 1", "model 2", "model 3")
    assert resolve(run.method, "x", 0.0, (0.0,) * 3, roles).weights == (0.5, 0.3, 0.2)


def test_multislerp_and_nearswap_take_mergekit_s_model_counts_and_names(tiny_trio, tmp_path):
    """multislerp: any number of models without base_model (the base role only stands in for
    the first), or base_model and one or more; its `normalize_weights` is our normalize, and
    means nothing to another method (ignored with a warning, as mergekit ignores it).  nearswap:
    base_model and one."""
    two = load(write_config(tmp_path, tiny_trio, """
merge_method: multislerp
parameters: {{normalize_weights: false}}
models:
  - model: {domain}
    parameters: {{weight: 0.3}}
  - model: {aligned}
    parameters: {{weight: 0.6}}
"""))
    assert two.method.name == "multislerp_models" and two.aligned == tiny_trio["domain"]
    settings = resolve(two.method, "w", 0.0, (float("nan"),) * 2)
    assert settings.weights == (0.6, 0.3) and settings.normalize is False
    swap = load(write_config(tmp_path, tiny_trio, """
merge_method: nearswap
base_model: {base}
parameters: {{t: 0.001, normalize_weights: true}}
models:
  - model: {domain}
"""))
    assert swap.method.name == "nearswap" and swap.domain == tiny_trio["domain"]
    assert any("`normalize_weights` does not apply to nearswap" in w for w in swap.warnings)
    for method, models, message in (
            ("multislerp", "{base}", "multislerp takes at least one model besides base_model"),
            ("nearswap", "{domain}, {aligned}", "nearswap takes base_model and exactly one")):
        listed = "".join(f"  - model: {m.strip()}\n    parameters: {{{{weight: 1}}}}\n"
                         for m in models.split(","))
        base = "base_model: {base}\n"
        with pytest.raises(PlanError, match=message):
            load(write_config(tmp_path, tiny_trio, f"merge_method: {method}\n{base}"
                              f"models:\n{listed}"))


def test_karcher_weighs_each_model_it_merges_equally_as_mergekit(tiny_trio, tmp_path):
    """mergekit's karcher has no weights: every listed model, base_model too, counts 1/n (a
    `weight` is ignored with a warning); without base_model the first model stands in the base
    role once, not twice."""
    three = load(write_config(tmp_path, tiny_trio, """
merge_method: karcher
base_model: {base}
parameters: {{max_iter: 5, tol: 1.0e-6}}
models:
  - model: {domain}
    parameters: {{weight: 0.9}}
  - model: {aligned}
"""))
    settings = resolve(three.method, "w", 0.0, (float("nan"),) * 2)
    assert (settings.w_base, *settings.weights) == (1 / 3, 1 / 3, 1 / 3)
    assert (settings.max_iter, settings.tol) == (5, 1e-6)
    assert any("`weight` does not apply to karcher" in w for w in three.warnings)
    two = load(write_config(tmp_path, tiny_trio, """
merge_method: karcher
models:
  - model: {domain}
  - model: {aligned}
"""))
    settings = resolve(two.method, "w", 0.0, (float("nan"),) * 2)
    assert two.base == tiny_trio["domain"] and two.domain == tiny_trio["aligned"]
    assert (settings.w_base, *settings.weights) == (0.5, 0.5, 0.0)
