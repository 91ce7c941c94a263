"""`chat_template` in a mergekit config: a named format, "auto" or a literal Jinja template,
written where transformers reads it; the named formats render as mergekit 0.1.5's do."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio
from test_cli import assert_clean_error, run_cli

pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": " world "}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": " spaced  "}, {"role": "assistant", "content": "ok"}],
    [{"role": "system", "content": " sys "}, {"role": "user", "content": "q"}],
]
OFFLINE = {"HF_HUB_OFFLINE": "1"}  # every model is a local folder


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """The tiny trio with a real (tokenizers) tokenizer in each model."""
    import tokenizers
    from tokenizers.models import WordLevel

    trio = ensure_synthetic_trio(tmp_path_factory.mktemp("chat-trio"), LLAMA_TINY, seed=3)
    words = ["<unk>", "<s>", "</s>", "hello", "world"]
    tokenizer = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)},
                                               unk_token="<unk>"))
    for folder in trio.values():
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
             "eos_token": "</s>", "unk_token": "<unk>"}))
    return trio


def _config(tmp_path, trio, template: str):
    path = tmp_path / "chat.yml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {trio['base']}\nmodels:\n"
                    f"  - model: {trio['domain']}\n    parameters: {{weight: 0.5}}\n"
                    f"chat_template: {json.dumps(template)}\n")
    return path


def _rendered(folder) -> list:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=g)
            for c in CONVERSATIONS for g in (True, False)]


def _run(config, out) -> None:
    done = run_cli("run", config, out, "--quiet", env=OFFLINE)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # mergekit and transformers load for each format (~4 s each)
@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca"])
def test_named_formats_render_as_mergekit_s(trio, tmp_path, name):
    pytest.importorskip("mergekit")
    config = _config(tmp_path, trio, name)
    _run(config, tmp_path / "ours")
    mergekit = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    subprocess.run([mergekit, str(config), str(tmp_path / "theirs")], check=True,
                   capture_output=True, env={**os.environ, **OFFLINE})
    assert _rendered(tmp_path / "ours") == _rendered(tmp_path / "theirs")


@pytest.mark.slow  # loads transformers (~3 s)
def test_exaone_renders_its_format(trio, tmp_path):
    _run(_config(tmp_path, trio, "exaone"), tmp_path / "out")
    assert _rendered(tmp_path / "out")[0] == (
        "[|system|]Be brief.[|endofturn|]\n[|user|]hello\n[|assistant|] world [|endofturn|]\n"
        "[|user|]again\n[|assistant|]")


@pytest.mark.slow  # loads transformers (~3 s)
def test_a_literal_template_is_written_where_transformers_reads_it(trio, tmp_path):
    literal = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    _run(_config(tmp_path, trio, literal), tmp_path / "out")
    assert _rendered(tmp_path / "out")[1] == "<system>Be brief.<user>hello<assistant> world " \
        "<user>again"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == literal
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == literal and config["eos_token"] == "</s>"  # the rest kept
    assert run_cli("verify", tmp_path / "out").returncode == 0


@pytest.mark.slow  # loads transformers (~3 s)
def test_auto_takes_the_template_most_models_carry(trio, tmp_path):
    carried = {"base": "{{ 'base:' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
               "domain": "{{ 'dom:' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
               "aligned": "{{ 'dom:' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    models = {}
    for role, template in carried.items():
        models[role] = tmp_path / role
        shutil.copytree(trio[role], models[role])
        settings = json.loads((models[role] / "tokenizer_config.json").read_text())
        settings["chat_template"] = template
        (models[role] / "tokenizer_config.json").write_text(json.dumps(settings))
    config = tmp_path / "auto.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
                      f"  - model: {models['domain']}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {models['aligned']}\n    parameters: {{weight: 0.5}}\n"
                      "chat_template: auto\n")
    _run(config, tmp_path / "out")
    assert _rendered(tmp_path / "out")[0].startswith("dom:")


@pytest.mark.parametrize("template, message", [
    ("chatmlx", "chat_template 'chatmlx': neither auto, a name"),
    ("{{ short }}", "neither auto, a name"),
])
def test_a_template_that_is_none_of_the_forms_is_one_line_before_compute(trio, tmp_path,
                                                                         template, message):
    done = run_cli("run", _config(tmp_path, trio, template), tmp_path / "out", env=OFFLINE)
    assert_clean_error(done, message)
    assert not (tmp_path / "out").exists()


def test_a_template_without_a_tokenizer_to_carry_it_is_refused(tiny_trio, tmp_path):
    done = run_cli("run", _config(tmp_path, tiny_trio, "chatml"), tmp_path / "out")
    assert_clean_error(done, "chat_template: the output gets no tokenizer_config.json")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_config_that_is_no_json_is_one_line(trio, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trio["base"], broken)
    (broken / "tokenizer_config.json").write_text("{not json")
    done = run_cli("run", _config(tmp_path, {**trio, "base": broken}, "chatml"),
                   tmp_path / "out", env=OFFLINE)
    assert_clean_error(done, f"{broken / 'tokenizer_config.json'}: cannot read")
    assert not (tmp_path / "out").exists()
