"""Vocabularies that differ, merged by token (vocabularies.py): mergekit's `tokenizer_source` /
`tokenizer:` and `merge --vocab`.  A float64 oracle of the row rules, tensors against mergekit
0.1.5 token by token, the merged model loaded back by transformers, and the errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mergealign_fast.io import stream
from mergealign_fast.dtypes import DType, bf16_bits_to_f32
from mergealign_fast.engine.loop import execute
from mergealign_fast.api import merge_models
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.plan import MergeOptions, plan_merge
from mergealign_fast.methods.core.oracle import spacing
from mergealign_fast.cli.main import main
from test_cli import assert_clean_error, run_cli

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

WORDS = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(13)]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
ROLES = ("base", "domain", "aligned")


def _save_model(folder, words, special=(), seed=0, template=None):
    """A tiny Llama (bf16) whose vocabulary is `words` then the `special` added tokens."""
    import tokenizers
    from tokenizers.models import WordLevel

    tokenizer = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)},
                                               unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    if template:
        fast.chat_template = template
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      vocab_size=len(fast), tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base; a domain expert that added two plain tokens; an aligned model that numbers the
    base's tokens in another order and added a special token, with a chat template."""
    root = tmp_path_factory.mktemp("vocabularies")
    # Each of mergekit's rules has a token: "<med1>" only the domain has (its row for all),
    # "<|im_start|>" only the aligned model; "<b>" the base and the aligned model (the base's
    # row for the domain), "<med2>" the domain and the aligned model (their mean for the base).
    return {"base": _save_model(root / "base", WORDS + ["<b>"], seed=0),
            "domain": _save_model(root / "domain", WORDS + ["<med1>", "<med2>"], seed=1),
            "aligned": _save_model(root / "aligned", WORDS[:3] + WORDS[3:][::-1] +
                                   ["<b>", "<med2>"], special=["<|im_start|>"], seed=2,
                                   template=TEMPLATE),
            # A tokenizer no merged model has (a config's tokenizer_source may name it).
            "outside": _save_model(root / "outside", WORDS[:3] + ["<med1>", "<x>"] + WORDS[3:],
                                   special=["<|im_start|>"], seed=3)}


@pytest.fixture
def cli(capsys):
    """The command line in this process (transformers is imported once, not per run): an
    object with returncode and stderr, as run_cli's."""
    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


def _model(folder):
    """({tensor: float64 array}, {token: id}) of a model folder."""
    tensors = {}
    for name, loc in open_checkpoint(folder).tensors.items():
        raw = read_elements(loc)
        values = bf16_bits_to_f32(raw) if loc.entry.dtype == "BF16" else raw
        tensors[name] = values.astype(np.float64).reshape(loc.entry.shape)
    return tensors, transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def _bf16(values):
    """float64 -> the bf16 value the kernels store (one round to nearest even of the fp32)."""
    from mergealign_fast.dtypes import f32_to_bf16_bits

    return bf16_bits_to_f32(f32_to_bf16_bits(values.astype(np.float32))).astype(np.float64)


def _oracle_rows(models, out_vocab, name, base_role="base"):
    """Each model's rows of `name` re-indexed by the output vocabulary with mergekit's default
    rules (only model with the token, else the base, else the mean; zero when none), in
    float64, written from the rules' statement, not from the engine's tables."""
    gathered = {}
    for role, (tensors, vocab) in models.items():
        rows = np.zeros((len(out_vocab), tensors[name].shape[1]))
        for token, index in out_vocab.items():
            if token in vocab:
                rows[index] = tensors[name][vocab[token]]
                continue
            having = [r for r, (_, v) in models.items() if token in v]
            if len(having) == 1:
                rows[index] = models[having[0]][0][name][models[having[0]][1][token]]
            elif base_role in having:
                rows[index] = models[base_role][0][name][models[base_role][1][token]]
            elif having:
                rows[index] = _bf16(np.mean([models[r][0][name][models[r][1][token]]
                                             for r in having], axis=0))
        gathered[role] = rows
    return gathered


def test_a_union_is_the_oracle_s_rows_token_by_token(world, tmp_path):
    """Task arithmetic over a union: every output row is the formula over the models' rows of
    its token, the rows a model lacks taken by mergekit's rules; the other tensors as by
    index; the tokenizer has every model's tokens; vocab_size follows."""
    options = MergeOptions(domain_weight=0.7, align_weight=0.4, vocabulary="union",
                           tokenizer_from="aligned")
    execute(plan_merge(world["base"], world["domain"], world["aligned"], tmp_path / "out",
                       options))
    out, out_vocab = _model(tmp_path / "out")
    assert set(out_vocab) == set(WORDS) | {"<b>", "<med1>", "<med2>", "<|im_start|>"}
    models = {role: _model(world[role]) for role in ROLES}

    def within_an_ulp(name, base, domain, aligned):
        # fp32 arithmetic, one rounding to bf16: within one bf16 step of the exact value.
        exact = base + 0.7 * (domain - base) + 0.4 * (aligned - base)
        assert np.all(np.abs(out[name] - exact) <= spacing(exact, DType.BF16)), name

    for name in VOCABULARY_TENSORS:
        rows = _oracle_rows(models, out_vocab, name)
        within_an_ulp(name, rows["base"], rows["domain"], rows["aligned"])
    name = "model.layers.1.mlp.up_proj.weight"
    within_an_ulp(name, *(models[r][0][name] for r in ("base", "domain", "aligned")))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == len(out_vocab) == out["lm_head.weight"].shape[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == TEMPLATE  # the union is the base's: the template is not
    assert run_cli("verify", tmp_path / "out").returncode == 0


def test_an_input_truncated_while_rows_are_gathered_is_input_changed(world, tmp_path,
                                                                     monkeypatch):
    """Rows gathered by token are copied out of the mapping under the kernel's SIGBUS guard:
    a model truncated under the merge is a one-line error and nothing is published."""
    from mergealign_fast.errors import MergeError
    from mergealign_fast.kernels import cpu

    trio = {r: tmp_path / r for r in ROLES}
    for role in ROLES:
        shutil.copytree(world[role], trio[role])
    victim = next(trio["aligned"].glob("*.safetensors"))
    real = cpu.native()

    class TruncateBeforeGather:
        def __getattr__(self, name):
            return getattr(real, name)

        def gather_rows_guarded(self, *args):
            os.truncate(victim, 4096)
            return real.gather_rows_guarded(*args)

    monkeypatch.setattr(cpu, "native", lambda: TruncateBeforeGather())
    with pytest.raises(MergeError, match="changed while it was being read|was modified"):
        execute(plan_merge(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out",
                           MergeOptions(vocabulary="union")))
    assert not (tmp_path / "out").exists()


def test_rows_gathered_in_small_windows_are_the_same_bits(world, tmp_path, monkeypatch):
    """The gather runs window by window (a few rows each here): no matrix is taken whole, and
    the output does not depend on where the windows fall.  TIES: the statistics passes read
    the gathered rows too."""
    def merged(out, window):
        monkeypatch.setattr(stream, "WINDOW_BYTES", window)
        merge_models(world["base"], [(world["domain"], {"weight": 0.6, "density": 0.5}),
                                     (world["aligned"], {"weight": 0.5, "density": 0.7})],
                     out, method="ties", vocabulary="union")
        return _model(out)[0]

    whole, windowed = merged(tmp_path / "whole", 32 << 20), merged(tmp_path / "small", 96)
    for name in whole:
        assert np.array_equal(whole[name], windowed[name]), name


def test_merge_by_the_domain_vocabulary_keeps_its_tokens(world, tmp_path, cli):
    done = cli("merge", world["base"], world["domain"], world["aligned"], "-o",
                   tmp_path / "out", "--vocab", "domain", "--quiet")
    assert done.returncode == 0, done.stderr
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.vocab_size == len(WORDS) + 2
    # The domain's tokenizer files, as they are: its vocabulary is the output's.
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (world["domain"] / "tokenizer.json").read_bytes()


def test_a_sweep_by_token_is_the_merge_of_each_lambda_and_resumes_only_itself(world, tmp_path,
                                                                              cli):
    models = [world[r] for r in ("base", "domain", "aligned")]
    assert cli("sweep", *models, "-o", tmp_path / "sweep", "--lambdas", "0.25,0.75",
               "--vocab", "union", "--quiet").returncode == 0
    merge = ("merge", *models, "-o", tmp_path / "one", "--domain-weight", "0.75",
             "--align-weight", "0.25", "--quiet")
    assert cli(*merge, "--vocab", "union").returncode == 0
    assert (tmp_path / "sweep" / "lambda-0.75" / "model.safetensors").read_bytes() == \
        (tmp_path / "one" / "model.safetensors").read_bytes()
    assert "already complete" in cli(*merge, "--vocab", "union", "--resume").stdout
    assert_clean_error(cli(*merge, "--vocab", "domain", "--resume"),
                       "holds another merge (option vocabulary")


@pytest.mark.slow  # transformers builds six more models
@pytest.mark.parametrize("kind", ["gpt2", "tied llama"])
def test_architectures_with_their_own_vocabulary_tensors(tmp_path, kind, cli):
    """GPT-2 (`transformer.wte`, Conv1D weights) and a Llama whose output head is its
    embedding (no lm_head tensor): a union loads back whole, and a token only the expert has
    keeps the expert's row."""
    def save(folder, words, seed):
        if kind == "gpt2":
            config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                             vocab_size=len(words))
            model_class = transformers.GPT2LMHeadModel
        else:
            config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1, vocab_size=len(words),
                                              tie_word_embeddings=True)
            model_class = transformers.LlamaForCausalLM
        _save_model(folder, words, seed=seed)  # the tokenizer (its Llama is replaced below)
        for stale in folder.glob("*.safetensors"):
            stale.unlink()
        torch.manual_seed(seed)
        model_class(config).save_pretrained(folder)
        return folder

    models = [save(tmp_path / "base", WORDS, 0), save(tmp_path / "domain", WORDS + ["<med1>"], 1),
              save(tmp_path / "aligned", WORDS, 2)]
    done = cli("merge", *models, "-o", tmp_path / "out", "--vocab", "union", "--quiet")
    assert done.returncode == 0, done.stderr
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    embedding = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    (out, out_vocab), (domain, domain_vocab) = _model(tmp_path / "out"), _model(models[1])
    assert out[embedding].shape[0] == len(WORDS) + 1
    assert np.array_equal(out[embedding][out_vocab["<med1>"]],
                          domain[embedding][domain_vocab["<med1>"]])


@pytest.mark.parametrize("args, message", [
    (["--vocab", "union", "--device", "cuda"], "gathered on the CPU path"),
    ([], "merge by token (merge --vocab"),
])
def test_vocabularies_that_cannot_merge_are_one_line(world, tmp_path, args, message, cli):
    done = cli("merge", world["base"], world["domain"], world["aligned"], "-o",
                   tmp_path / "out", *args)
    assert_clean_error(done, message)
    assert not (tmp_path / "out").exists()


CONFIG = """merge_method: {method}
{base_model}models:
  - model: {domain}
    parameters: {{weight: 0.7{density}}}
  - model: {aligned}
    parameters: {{weight: 0.5{density}}}
dtype: float32
out_dtype: bfloat16
{tokenizer}
"""


def _config(tmp_path, world, tokenizer, method="task_arithmetic", base=True):
    text = CONFIG.format(method=method, density=", density: 0.6" if method == "ties" else "",
                         base_model=f"base_model: {world['base']}\n" if base else "",
                         tokenizer=tokenizer.format(**world), **world)
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("tokenizer, message", [
    ("tokenizer:\n  tokens:\n    x: {{source: {{kind: model_token, model: {base}, token: zz}}}}",
     "tokenizer.tokens.x: base has no token 'zz'"),
    ("tokenizer_source: union\ntokenizer: {{source: base}}",
     "give tokenizer_source or a tokenizer section, not both"),
    ("tokenizer:\n  source: /nowhere", "tokenizer_source: /nowhere: no such local folder"),
    ("tokenizer_source: {base}/..", "no tokenizer there"),
    ("tokenizer:\n  sauce: union", "tokenizer: expected a mapping of pad_to_multiple_of"),
    ("tokenizer:\n  pad_to_multiple_of: 0", "pad_to_multiple_of must be a whole number of at"),
    ("tokenizer:\n  tokens:\n    x: {{source: {{kind: model_token, model: {base}, token_id: 99}}}}",
     "tokenizer.tokens.x: base has no token id 99"),
])
def test_a_tokenizer_section_that_cannot_work_is_one_line(world, tmp_path, tokenizer, message,
                                                         cli):
    done = cli("run", _config(tmp_path, world, tokenizer), tmp_path / "out")
    assert_clean_error(done, message)
    assert not (tmp_path / "out").exists()


def test_a_chat_template_is_written_into_the_merged_tokenizer(world, tmp_path, cli):
    config = _config(tmp_path, world, "tokenizer_source: union\nchat_template: chatml")
    done = cli("run", config, tmp_path / "out", "--quiet")
    assert done.returncode == 0, done.stderr
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.chat_template != TEMPLATE
    assert "<med1>" in tokenizer.get_vocab()


@pytest.mark.slow  # transformers' tokenizer loading: 4 s
def test_a_model_whose_tokenizer_does_not_load_is_named(world, tmp_path):
    """(A fresh process: the tokenizers are read in a child, whose problems come back as the
    same one line.)"""
    broken = tmp_path / "broken"
    shutil.copytree(world["domain"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    config = _config(tmp_path, {**world, "domain": broken}, "tokenizer_source: union")
    assert_clean_error(run_cli("run", config, tmp_path / "out"),
                       f"{broken}: its tokenizer does not load")


# ---- against mergekit 0.1.5 ----------------------------------------------------------------

SOURCES = {
    "union": "tokenizer_source: union",
    "base": "tokenizer_source: base",
    "a model": "tokenizer_source: {domain}",
    "a model not merged": "tokenizer_source: {outside}",
    "tokens": ("tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
               "    <med1>: {{source: {domain}, force: true}}\n"
               "    <|im_start|>: {{source: {{kind: model_token, model: {base}, token: <s>}}}}\n"
               "    <new>: {{source: {{kind: zero}}}}\n"
               "    a: {{source: {{kind: model_token, model: {aligned}, token_id: 3}}, "
               "force: true}}"),
}


def _by_token(folder):
    """{tensor: rows} with the vocabulary tensors' token rows keyed by token (the ids of
    tokens a union adds follow mergekit's hash-map order there, the models' id order here),
    their padding rows by position."""
    tensors, vocab = _model(folder)
    for name in VOCABULARY_TENSORS:
        rows = tensors[name]
        tensors[name] = {**{t: rows[i] for t, i in vocab.items()},
                         **{f"padding {i}": rows[i] for i in range(len(vocab), len(rows))}}
    return tensors


@pytest.mark.slow  # mergekit runs each merge
@pytest.mark.parametrize("method, base, source", [
    ("task_arithmetic", True, "union"), ("task_arithmetic", True, "base"),
    ("task_arithmetic", True, "a model"), ("task_arithmetic", True, "tokens"),
    ("linear", False, "union"), ("task_arithmetic", True, "a model not merged"),
    ("linear", False, "a model not merged"),
])
def test_the_same_rows_as_mergekit_for_each_token(world, tmp_path, method, base, source):
    _assert_rows_as_mergekit(_config(tmp_path, world, SOURCES[source], method, base), tmp_path)


@pytest.mark.slow  # mergekit runs the merge
def test_multislerp_of_three_without_a_base_onto_a_tokenizer_not_merged(world, tmp_path):
    """A published shape that was a traceback: multislerp over several models, no base_model,
    tokenizer_source naming a model the config does not merge."""
    config = tmp_path / "config.yml"
    config.write_text("merge_method: multislerp\nmodels:\n" + "".join(
        f"  - model: {world[role]}\n    parameters: {{weight: {w}}}\n"
        for role, w in (("base", 0.2), ("domain", 0.5), ("aligned", 0.3)))
        + f"dtype: float32\nout_dtype: bfloat16\ntokenizer_source: {world['outside']}\n")
    _assert_rows_as_mergekit(config, tmp_path)
    vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    assert vocab == transformers.AutoTokenizer.from_pretrained(world["outside"]).get_vocab()


@pytest.mark.slow  # mergekit runs each merge
@pytest.mark.parametrize("method, base, source", [
    ("task_arithmetic", True, "union"), ("task_arithmetic", True, "tokens"),
    ("linear", False, "a model not merged"), ("ties", True, "base"),
])
def test_mergekit_arithmetic_gives_mergekits_rows_bit_for_bit(world, tmp_path, method, base,
                                                              source):
    """--compute-dtype mergekit through the vocabulary's rows too (the default rows of the
    tokens a model lacks included)."""
    _assert_rows_as_mergekit(_config(tmp_path, world, SOURCES[source], method, base), tmp_path,
                             exact=True)


def _assert_rows_as_mergekit(config, tmp_path, exact: bool = False):
    """The config through `run` and mergekit-yaml: every row of every tensor (vocabulary rows
    by token) within one bf16 step (`exact`: with --compute-dtype mergekit, bit for bit); both
    outputs load in transformers with every key."""
    flags = ("--compute-dtype", "mergekit") if exact else ()
    done = run_cli("run", config, tmp_path / "ours", "--quiet", *flags)
    assert done.returncode == 0, done.stderr
    mergekit = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    subprocess.run([mergekit, str(config), str(tmp_path / "theirs")], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ours, theirs = _by_token(tmp_path / "ours"), _by_token(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()

    def one_step_apart(a, b):
        if exact:
            return a.dtype == b.dtype and a.tobytes() == b.tobytes()
        # Our fp32 arithmetic rounds once, mergekit's after each operation: the bf16 results
        # differ by at most one step (a row of another token would differ by far more).
        return np.all(np.abs(a - b) <= spacing(np.maximum(np.abs(a), np.abs(b)), DType.BF16))

    for name, values in ours.items():
        if name not in VOCABULARY_TENSORS:
            assert one_step_apart(values, theirs[name]), name
            continue
        assert values.keys() == theirs[name].keys(), name
        for token, row in values.items():
            assert one_step_apart(row, theirs[name][token]), (name, token)
    for folder in ("ours", "theirs"):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], folder
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == \
        json.loads((tmp_path / "theirs" / "config.json").read_text())["vocab_size"]


@pytest.mark.slow  # starts a Ray instance (~5 s) and Ray workers
def test_a_union_split_across_ray_is_the_union_merged_here(world, tmp_path):
    """Ray's workers gather the rows by token from the plan they are sent."""
    pytest.importorskip("ray")
    import ray_cluster

    env = ray_cluster.cluster_env()
    try:
        address = ray_cluster.start_head(2, env)
        merge = ["merge", world["base"], world["domain"], world["aligned"], "--vocab", "union",
                 "--max-shard-size", "4KB", "--quiet", "-o"]
        assert ray_cluster.run_cli([*merge, tmp_path / "here"], env).returncode == 0
        done = ray_cluster.run_cli([*merge, tmp_path / "ray", "--ray", address], env)
        assert done.returncode == 0, done.stderr
    finally:
        ray_cluster.stop(env)
    files = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    for name in files:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), \
            name


@pytest.mark.parametrize("source", ["union", "base", "aligned", "outside", "tokens"])
def test_tokenizers_read_without_transformers_as_transformers_reads_them(world, tmp_path,
                                                                         source):
    """The tokenizers library's reading (fast_tables) against transformers' (tokenizer_tables):
    the same output vocabulary, each model's ids and sizes; the files it writes load in
    transformers as the tokenizer transformers builds (vocabulary, added tokens with their
    settings, chat template, the same ids for a text)."""
    from mergealign_fast.vocabulary import OUTSIDE, TokenSource, VocabularySpec
    from mergealign_fast.vocabulary.fast_tables import fast_tables
    from mergealign_fast.vocabulary.tokens import model_vocabulary_size, tokenizer_tables

    folders = {r: world[r] for r in ROLES}
    spec = VocabularySpec(OUTSIDE if source == "outside" else
                          "union" if source == "tokens" else source,
                          (("<new>", TokenSource("zero")), ("a", TokenSource("auto")))
                          if source == "tokens" else (),
                          source_folder=world["outside"] if source == "outside" else None)
    fast = fast_tables(folders, spec, "aligned", model_vocabulary_size)
    slow = tokenizer_tables(folders, spec, "aligned")
    assert fast is not None
    assert (fast.out_vocab, fast.vocabs, fast.sizes, fast.rebuilt) == \
        (slow.out_vocab, slow.vocabs, slow.sizes, slow.rebuilt)
    loaded = {}
    for kind, tables in (("fast", fast), ("slow", slow)):
        (tmp_path / kind).mkdir()
        for name, data in tables.files.items():
            (tmp_path / kind / name).write_bytes(data)
        loaded[kind] = transformers.AutoTokenizer.from_pretrained(tmp_path / kind)
    text = "a b <med1> <|im_start|> <med2> zz <new> </s>"
    assert loaded["fast"].get_vocab() == loaded["slow"].get_vocab() == fast.out_vocab
    assert loaded["fast"](text)["input_ids"] == loaded["slow"](text)["input_ids"]
    assert {i: str(t) for i, t in loaded["fast"].added_tokens_decoder.items()} == \
        {i: str(t) for i, t in loaded["slow"].added_tokens_decoder.items()}
    assert loaded["fast"].chat_template == loaded["slow"].chat_template


def test_a_tokenizer_that_only_transformers_reads_alike_goes_to_transformers(world, tmp_path):
    """A tokenizer_config.json naming a special token tokenizer.json lacks: transformers adds it
    on load, so the fast reading steps aside."""
    from mergealign_fast.vocabulary import VocabularySpec
    from mergealign_fast.vocabulary.fast_tables import fast_tables
    from mergealign_fast.vocabulary.tokens import model_vocabulary_size

    odd = tmp_path / "odd"
    shutil.copytree(world["domain"], odd)
    config = json.loads((odd / "tokenizer_config.json").read_text())
    config["pad_token"] = "<pad-not-in-vocab>"
    (odd / "tokenizer_config.json").write_text(json.dumps(config))
    folders = {"base": world["base"], "domain": odd, "aligned": world["aligned"]}
    assert fast_tables(folders, VocabularySpec("union"), None, model_vocabulary_size) is None
    assert fast_tables({**folders, "domain": world["domain"]}, VocabularySpec("union"), None,
                       model_vocabulary_size) is not None
