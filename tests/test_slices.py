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
     "slices with merge_method 'ties' (merges per slice) are not supported yet"),
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
