"""`mergealign-fast mergekit-yaml CONFIG OUT [mergekit's flags]`: mergekit 0.1.5's command line
on this engine, and the model card it leaves in OUT."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from test_cli import assert_clean_error, run_cli

DARE = """merge_method: dare_ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: bfloat16
"""


@pytest.fixture
def config(tiny_trio, tmp_path):
    path = tmp_path / "dare.yml"
    path.write_text(DARE.format(**tiny_trio))
    return path


def _tensors(folder) -> dict:
    checkpoint = open_checkpoint(folder)
    return {name: read_elements(loc) for name, loc in checkpoint.tensors.items()}


def test_the_same_merge_as_run_with_mergekit_s_flags_honoured(config, tmp_path):
    ran = run_cli("run", config, tmp_path / "run", "--quiet")
    assert ran.returncode == 0, ran.stderr
    done = run_cli("mergekit-yaml", config, tmp_path / "mk", "--out-shard-size", "100K",
                   "--quiet", "-v", "-v")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # nothing to say: every flag given has its meaning here
    ours = _tensors(tmp_path / "mk")
    assert {k: v.tobytes() for k, v in ours.items()} == \
        {k: v.tobytes() for k, v in _tensors(tmp_path / "run").items()}
    shards = sorted(p.name for p in (tmp_path / "mk").glob("*.safetensors"))
    assert len(shards) == 3 and all((tmp_path / "mk" / s).stat().st_size <= 100_000 + 4096
                                    for s in shards)  # 100K is 100,000 bytes, as in mergekit
    assert run_cli("verify", tmp_path / "mk").returncode == 0  # the card is in the manifest


def test_the_model_card_names_the_models_and_carries_the_recipe(config, tiny_trio, tmp_path):
    assert run_cli("mergekit-yaml", config, tmp_path / "out", "--quiet").returncode == 0
    card = (tmp_path / "out" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == [str(tiny_trio[r]) for r in ("base", "domain", "aligned")]
    assert meta["library_name"] == "transformers" and "merge" in meta["tags"]
    assert "Method: `dare_ties`" in body and f"`{tiny_trio['domain']}`" in body
    assert "mergealign-fast 0.1.0" in body
    recipe = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert recipe == config.read_text()
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == config.read_text()
    # off, as in mergekit
    assert run_cli("mergekit-yaml", config, tmp_path / "bare", "--no-write-model-card",
                   "--quiet").returncode == 0
    assert not (tmp_path / "bare" / "README.md").exists()
    assert not (tmp_path / "bare" / "mergekit_config.yml").exists()


def test_flags_that_only_tune_mergekit_s_memory_are_named_as_no_ops_in_one_line(config,
                                                                                tmp_path):
    done = run_cli("mergekit-yaml", config, tmp_path / "out", "--lazy-unpickle",
                   "--low-cpu-memory", "--write-threads", "4", "--clone-tensors", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "mergealign-fast: note: --lazy-unpickle, --low-cpu-memory, --clone-tensors, "
        "--write-threads only tune mergekit's own memory, threads or storage: nothing to do "
        "here"]


@pytest.mark.parametrize("flags, message", [
    (["--no-safe-serialization"], "writes safetensors only"),
    (["--out-shard-size", "5GB"], "--out-shard-size '5GB': expected a whole number"),
])
def test_flags_without_a_meaning_here_are_one_line_errors(config, tmp_path, flags, message):
    done = run_cli("mergekit-yaml", config, tmp_path / "out", *flags)
    assert_clean_error(done, message)
    assert not (tmp_path / "out").exists()


def test_unsafe_truncate_embeddings_cuts_vocabulary_tensors_to_the_fewest_rows(tmp_path):
    """mergekit's flag: the embedding, the head and its bias of models whose vocabularies
    differ in size are cut to the fewest rows (each independently), the config keeps the
    base's vocab_size, and the user is warned; without it, the merge is refused."""
    from conftest import write_checkpoint

    rng = np.random.default_rng(3)
    rows = {"large": (10, 9, 10), "small": (8, 8, 7)}  # embed, head, bias rows
    models = {}
    for label, (embed, head, bias) in rows.items():
        models[label] = {"model.embed_tokens.weight": rng.standard_normal((embed, 4)),
                         "lm_head.weight": rng.standard_normal((head, 4)),
                         "lm_head.bias": rng.standard_normal(bias),
                         "model.norm.weight": rng.standard_normal(4)}
        models[label] = {k: v.astype(np.float32) for k, v in models[label].items()}
        write_checkpoint(tmp_path / label, models[label],
                         {"architectures": ["LlamaForCausalLM"], "vocab_size": embed})
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: linear\nbase_model: {tmp_path / 'large'}\nmodels:\n"
                      f"  - model: {tmp_path / 'large'}\n  - model: {tmp_path / 'small'}\n"
                      "parameters: {weight: 0.5}\n")
    refused = run_cli("mergekit-yaml", config, tmp_path / "refused")
    assert_clean_error(refused, "tensor lm_head.bias: shape differs: base [10] vs domain [7]")
    done = run_cli("mergekit-yaml", config, tmp_path / "out", "--unsafe-truncate-embeddings")
    assert done.returncode == 0, done.stderr
    assert "UNSAFE vocabulary truncation" in done.stderr and "lm_head.bias to 7 rows" in \
        done.stderr
    merged = _tensors(tmp_path / "out")
    for name, kept in (("model.embed_tokens.weight", 8), ("lm_head.weight", 8),
                       ("lm_head.bias", 7)):
        expected = (models["large"][name][:kept] + models["small"][name][:kept]) / 2
        np.testing.assert_allclose(merged[name], expected.ravel(), rtol=1e-6, err_msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 10


def test_an_unknown_flag_is_an_error_not_ignored(config, tmp_path):
    done = run_cli("mergekit-yaml", config, tmp_path / "out", "--turbo")
    assert done.returncode == 2 and "unrecognized arguments: --turbo" in done.stderr
    assert not (tmp_path / "out").exists()


def test_models_of_other_architectures_need_allow_crimes(config, tiny_trio, tmp_path):
    mistral = tmp_path / "mistral"
    shutil.copytree(tiny_trio["aligned"], mistral)
    settings = json.loads((mistral / "config.json").read_text())
    settings["architectures"] = ["MistralForCausalLM"]
    (mistral / "config.json").write_text(json.dumps(settings))
    crimes = tmp_path / "crimes.yml"
    crimes.write_text(config.read_text().replace(str(tiny_trio["aligned"]), str(mistral)))
    done = run_cli("mergekit-yaml", crimes, tmp_path / "out")
    assert_clean_error(done, "different architectures", "MistralForCausalLM",
                       "add --allow-crimes")
    done = run_cli("mergekit-yaml", crimes, tmp_path / "out", "--allow-crimes", "--quiet")
    assert done.returncode == 0, done.stderr


def test_random_seed_seeds_dare_where_the_config_sets_none(config, tmp_path):
    outs = {}
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        assert run_cli("mergekit-yaml", config, out, "--random-seed", seed,
                       "--quiet").returncode == 0
        outs[seed] = _tensors(out)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.array_equal(outs["1"][name], outs["2"][name])  # other masks
    seeded = tmp_path / "seeded.yml"
    seeded.write_text(config.read_text() + "parameters: {seed: 2}\n")
    assert run_cli("mergekit-yaml", seeded, tmp_path / "own", "--random-seed", "1",
                   "--quiet").returncode == 0
    assert np.array_equal(_tensors(tmp_path / "own")[name], outs["2"][name])  # the config's


def test_the_console_script_is_mergekit_yaml_s_command_line(config, tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from mergealign_fast.cli.entry "
                           "import mergekit_yaml; sys.exit(mergekit_yaml())", str(config),
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "README.md").exists()
