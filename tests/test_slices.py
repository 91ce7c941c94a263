"""mergekit `slices` with passthrough: a stack of layer ranges from several models, loaded back
by transformers with every key, bitwise the source layers, the same tensors mergekit writes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from test_cli import assert_clean_error, run_cli

STACK = """slices:
  - sources:
      - model: {first}
        layer_range: [0, 2]
  - sources:
      - model: {second}
        layer_range: [1, 3]
merge_method: passthrough
{extra}"""


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Two tiny random Llama models of 3 layers, saved by transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64, tie_word_embeddings=False)
    folders = {}
    for seed, name in enumerate(("first", "second")):
        torch.manual_seed(seed)
        folders[name] = root / name
        transformers.LlamaForCausalLM(config).save_pretrained(folders[name])
    return folders


def _stack(tmp_path, llamas, extra=""):
    path = tmp_path / "stack.yml"
    path.write_text(STACK.format(extra=extra, **llamas))
    return path


def _tensors(folder) -> dict:
    return {n: read_elements(loc) for n, loc in open_checkpoint(folder).tensors.items()}


@pytest.mark.slow  # transformers saves and loads the models
def test_a_stack_loads_with_every_key_and_copies_each_source_layer(llamas, tmp_path):
    import transformers

    done = run_cli("run", _stack(tmp_path, llamas), tmp_path / "out", "--quiet")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    out, first, second = (_tensors(f) for f in (tmp_path / "out", llamas["first"],
                                                llamas["second"]))
    name = "model.layers.{}.self_attn.q_proj.weight"
    for index, (source, layer) in enumerate([(first, 0), (first, 1), (second, 1),
                                             (second, 2)]):
        assert np.array_equal(out[name.format(index)], source[name.format(layer)])
    assert np.array_equal(out["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert np.array_equal(out["lm_head.weight"], second["lm_head.weight"])
    assert np.array_equal(out["model.norm.weight"], second["model.norm.weight"])
    assert run_cli("verify", tmp_path / "out").returncode == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Method: `passthrough`" in card
    assert f"- `{llamas['first']}`" in card and f"- `{llamas['second']}`" in card


@pytest.mark.slow  # mergekit runs the same stack
def test_the_same_tensors_as_mergekit_writes(llamas, tmp_path):
    pytest.importorskip("mergekit")
    config = _stack(tmp_path, llamas, "dtype: bfloat16\n")
    assert run_cli("run", config, tmp_path / "ours", "--quiet").returncode == 0
    mergekit = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    subprocess.run([mergekit, str(config), str(tmp_path / "theirs"), "--no-copy-tokenizer"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ours, theirs = open_checkpoint(tmp_path / "ours"), open_checkpoint(tmp_path / "theirs")
    assert set(ours.tensors) == set(theirs.tensors)
    for name, location in ours.tensors.items():  # fp32 sources to bf16: one rounding, both
        assert location.entry.dtype == theirs.tensors[name].entry.dtype == "BF16", name
        assert np.array_equal(read_elements(location),
                              read_elements(theirs.tensors[name])), name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == \
        json.loads((tmp_path / "theirs" / "config.json").read_text())["num_hidden_layers"]


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace("[1, 3]", "[1, 9]"), "layer_range [1, 9] is not within its 2 layers"),
    (lambda t: t.replace("[1, 3]", "[2, 1]"), "layer_range must be [first, end)"),
    (lambda t: t.replace("merge_method: passthrough", "merge_method: ties"),
     "every slice must merge the same models in the same order"),
    (lambda t: t.replace("      - model: {second}\n",
                         "      - model: {second}\n        layer_range: [0, 1]\n"
                         "      - model: {second}\n"),
     "exactly one entry under `sources`"),
])
def test_a_stack_that_cannot_be_built_is_one_line_before_any_work(tiny_trio, tmp_path, change,
                                                                  message):
    text = change(STACK).format(first=tiny_trio["domain"], second=tiny_trio["aligned"],
                                extra="")
    (tmp_path / "bad.yml").write_text(text)
    done = run_cli("run", tmp_path / "bad.yml", tmp_path / "out")
    assert_clean_error(done, message)
    assert not (tmp_path / "out").exists()


# ---- merges by slices ----------------------------------------------------------------------------

WHOLE = """merge_method: slerp
base_model: {aligned}
parameters:
  t: [{{filter: self_attn, value: [0, 0.7]}}, {{filter: mlp, value: [1, 0.3]}}, {{value: 0.5}}]
dtype: float32
"""


def test_one_slice_over_every_layer_is_the_merge_of_the_models(tiny_trio, tmp_path):
    """The classic slerp config of model cards, as slices and as models: the same bits."""
    sliced = WHOLE + ("slices:\n  - sources:\n      - model: {aligned}\n        layer_range: "
                      "[0, 2]\n      - model: {domain}\n        layer_range: [0, 2]\n")
    listed = WHOLE + "models:\n  - model: {aligned}\n  - model: {domain}\n"
    for name, text in (("sliced", sliced), ("listed", listed)):
        (tmp_path / f"{name}.yml").write_text(text.format(**tiny_trio))
        done = run_cli("run", tmp_path / f"{name}.yml", tmp_path / name, "--quiet")
        assert done.returncode == 0, done.stderr
    assert _tensors(tmp_path / "sliced").keys() == _tensors(tmp_path / "listed").keys()
    for name, values in _tensors(tmp_path / "sliced").items():
        assert np.array_equal(values, _tensors(tmp_path / "listed")[name]), name


def test_slices_of_a_merge_stack_their_layers_with_their_own_parameters(tiny_trio, tmp_path):
    """Two slices of the same pair: output layer k of a slice merges layer start + k of each
    source, with the slice's t; the layer count is the stack's."""
    text = """merge_method: slerp
base_model: {aligned}
slices:
  - sources:
      - model: {aligned}
        layer_range: [0, 2]
      - model: {domain}
        layer_range: [0, 2]
    parameters: {{t: 0.25}}
  - sources:
      - model: {aligned}
        layer_range: [1, 2]
      - model: {domain}
        layer_range: [0, 1]
parameters: {{t: 0.9}}
dtype: float32
""".format(**tiny_trio)
    (tmp_path / "s.yml").write_text(text)
    done = run_cli("run", tmp_path / "s.yml", tmp_path / "out", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    from mergealign_fast import merge_tensors
    from mergealign_fast.methods.core.parameters import Method

    out = _tensors(tmp_path / "out")
    aligned, domain = _tensors(tiny_trio["aligned"]), _tensors(tiny_trio["domain"])
    name = "model.layers.{}.mlp.up_proj.weight"
    for index, (layer_a, layer_d, t) in enumerate([(0, 0, 0.25), (1, 1, 0.25), (1, 0, 0.9)]):
        expected = merge_tensors(aligned[name.format(layer_a)], domain[name.format(layer_d)],
                                 aligned[name.format(layer_a)], method=Method("slerp", t=t),
                                 out_dtype="float32")
        assert np.array_equal(out[name.format(index)], expected), index


SLICED_MERGES = {
    "slerp, t gradients over one slice": """merge_method: slerp
base_model: {first}
slices:
  - sources:
      - model: {first}
        layer_range: [0, 3]
      - model: {second}
        layer_range: [0, 3]
parameters:
  t: [{{filter: self_attn, value: [0, 0.5, 1]}}, {{filter: mlp, value: [1, 0.5, 0]}},
      {{value: 0.5}}]
dtype: float32
""",
    "ties of three, two slices, per-source parameters": """merge_method: ties
base_model: {first}
slices:
  - sources:
      - model: {first}
        layer_range: [0, 2]
      - model: {second}
        layer_range: [0, 2]
        parameters: {{weight: 0.6, density: 0.5}}
      - model: {third}
        layer_range: [1, 3]
        parameters: {{weight: 0.3, density: 0.7}}
  - sources:
      - model: {first}
        layer_range: [1, 3]
      - model: {second}
        layer_range: [1, 3]
      - model: {third}
        layer_range: [0, 2]
    parameters: {{weight: [0.2, 0.8], density: 0.4}}
dtype: float32
""",
}


@pytest.fixture(scope="module")
def three_llamas(llamas, tmp_path_factory):
    torch = pytest.importorskip("torch")
    import transformers

    third = tmp_path_factory.mktemp("third") / "third"
    torch.manual_seed(2)
    config = transformers.AutoConfig.from_pretrained(llamas["first"])
    transformers.LlamaForCausalLM(config).save_pretrained(third)
    return {**llamas, "third": third}


@pytest.mark.slow  # transformers saves the models, mergekit runs the same configs
@pytest.mark.parametrize("text", SLICED_MERGES.values(), ids=list(SLICED_MERGES))
def test_a_merge_by_slices_is_mergekit_s_merge(three_llamas, tmp_path, text):
    """Every tensor within twice the fp32 oracle bound of mergekit 0.1.5's, the oracle taking
    each output tensor's sources and settings from our plan (so the layer mapping is checked
    against mergekit's)."""
    pytest.importorskip("mergekit")
    from mergealign_fast.dtypes import DType
    from mergealign_fast.mergekit.config import load
    from mergealign_fast.plan import MergeOptions
    from mergealign_fast.methods.core.oracle import decode_to_f64, method_error_bound, method_ref
    from mergealign_fast.plan.slices import plan_sliced_merge

    config = tmp_path / "config.yml"
    config.write_text(text.format(**three_llamas))
    assert run_cli("run", config, tmp_path / "ours", "--quiet").returncode == 0
    mergekit = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    subprocess.run([mergekit, str(config), str(tmp_path / "theirs"), "--no-copy-tokenizer"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run = load(config)
    nan = float("nan")
    plan = plan_sliced_merge(run.folders, run.merged_slices, tmp_path / "plan", MergeOptions(
        domain_weight=nan, align_weight=nan, out_dtype=run.out_dtype, method=run.method))
    ours, theirs = open_checkpoint(tmp_path / "ours"), open_checkpoint(tmp_path / "theirs")
    assert set(ours.tensors) == set(theirs.tensors)
    for tensor in (t for shard in plan.shards for t in shard.tensors):
        inputs = [decode_to_f64(read_elements(loc), DType[loc.entry.dtype]).ravel()
                  for loc in tensor.sources]
        settings = plan.settings[tensor.name]
        exact, scale = method_ref(settings, tensor.name, *inputs)
        bound = method_error_bound(exact, scale, DType.F32, len(settings.roles))
        mine = read_elements(ours.tensors[tensor.name]).astype(np.float64).ravel()
        reference = read_elements(theirs.tensors[tensor.name]).astype(np.float64).ravel()
        assert np.all(np.abs(mine - exact) <= bound), tensor.name
        assert np.all(np.abs(mine - reference) <= 2 * bound), tensor.name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == \
        json.loads((tmp_path / "theirs" / "config.json").read_text())["num_hidden_layers"]
