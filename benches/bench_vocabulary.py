"""A union-vocabulary merge on the 1.1B-parameter bf16 trio: ours (`run`) beside mergekit 0.1.5
on the same config, and the floor of reading the three inputs.

The trio of the other benches, each given a 32000-token tokenizer; the domain expert added 512
tokens (its embedding and output head have 32512 rows, the others 32000), the case of a domain
expert that cannot be merged by index.  The config is task arithmetic with
`tokenizer_source: union`: both tools re-index the embedding and output rows by token.  Each
contender is a separate process from the same warm page cache; ours runs with --no-fsync
(mergekit does not fsync either).

    pytest benches/bench_vocabulary.py --benchmark-json=benches/results/vocabulary.json
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from bench_end_to_end import RESULTS, bench_command
from conftest import record

from mergealign_fast.tools.demo import default_cache_dir
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio

SECTION = ("union vocabulary, task arithmetic of the 1.1B-parameter bf16 trio, the domain "
           "expert with 512 added tokens, warm; ours --no-fsync (median of 3), mergekit one run")
ADDED_TOKENS = 512
ROUNDS_OURS = 3
ROUNDS_MERGEKIT = 1
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _tokenizer(folder: Path, words) -> None:
    import tokenizers
    import transformers
    from tokenizers.models import WordLevel

    model = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)},
                                           unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>",
                                         bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def _with_added_rows(source: Path, target: Path, rows: int) -> None:
    """`source` with `rows` more rows in its vocabulary tensors (small random values)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(7)
    for name in VOCABULARY_TENSORS:
        extra = torch.randn(rows, tensors[name].shape[1], generator=generator) * 0.02
        tensors[name] = torch.cat([tensors[name], extra.to(tensors[name].dtype)])
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["vocab_size"] += rows
    (target / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def models():
    """{role: folder}: the 1.1B trio with tokenizers, the domain expert's vocabulary extended;
    built once beside the trio (the base and aligned weights are linked, not copied)."""
    cache = Path(os.environ.get("MERGEALIGN_BENCH_CACHE", default_cache_dir()))
    trio = ensure_synthetic_trio(cache / "bench-llama-1.1b-v1", LLAMA_1B)
    root = cache / "bench-llama-1.1b-vocabulary-v1"
    folders = {role: root / role for role in trio}
    if not (root / "COMPLETE").exists():
        words = ["<unk>", "<s>", "</s>"] + [f"t{i:05d}" for i in range(32000 - 3)]
        for role, folder in folders.items():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            if role == "domain":
                _with_added_rows(trio[role], folder, ADDED_TOKENS)
                _tokenizer(folder, words + [f"<med{i}>" for i in range(ADDED_TOKENS)])
            else:
                os.link(trio[role] / "model.safetensors", folder / "model.safetensors")
                shutil.copy(trio[role] / "config.json", folder / "config.json")
                _tokenizer(folder, words)
        (root / "COMPLETE").write_text(f"{ADDED_TOKENS} added tokens\n")
    return folders


@pytest.fixture(scope="module")
def inputs(models):
    from mergealign_fast.io.checkpoint import open_checkpoint

    return [str(f) for folder in models.values() for f in open_checkpoint(folder).files]


@pytest.fixture(scope="module")
def config(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("vocabulary") / "union.yml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
                    f"  - model: {models['domain']}\n    parameters: {{weight: 0.8}}\n"
                    f"  - model: {models['aligned']}\n    parameters: {{weight: 0.5}}\n"
                    "tokenizer_source: union\ndtype: bfloat16\n")
    return path


def test_read_floor(benchmark, inputs):
    """cat of the three inputs from the page cache: what any merge of them must read."""
    cmd = ["sh", "-c", f"cat {' '.join(inputs)} > /dev/null"]
    wall, cpu, _, _ = bench_command(benchmark, "vocabulary cat floor", cmd,
                                    Path("/nonexistent-output"), ROUNDS_OURS, inputs)
    record(SECTION, "cat inputs > /dev/null (floor)", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s")


def test_ours(benchmark, inputs, config, tmp_path):
    cmd = [sys.executable, "-m", "mergealign_fast", "run", str(config), str(tmp_path / "out"),
           "--quiet", "--no-fsync"]
    wall, cpu, rss, _ = bench_command(benchmark, "vocabulary ours", cmd, tmp_path / "out",
                                      ROUNDS_OURS, inputs)
    floor = RESULTS.get("vocabulary cat floor")
    ratio = {"over_cat": f"{wall / floor:.2f}x"} if floor else {}
    record(SECTION, "ours union", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s",
           peak_rss=f"{rss / 1e6:.0f}MB", **ratio)


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
def test_mergekit(benchmark, inputs, config, tmp_path):
    cmd = ["mergekit-yaml", str(config), str(tmp_path / "out")]
    wall, cpu, rss, _ = bench_command(benchmark, "vocabulary mergekit", cmd, tmp_path / "out",
                                      ROUNDS_MERGEKIT, inputs, warmup_rounds=0,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ours = RESULTS.get("vocabulary ours")
    ratio = {"mergekit_over_ours": f"{wall / ours:.1f}x"} if ours else {}
    record(SECTION, "mergekit union", wall=f"{wall:.2f}s", cpu=f"{cpu:.2f}s",
           peak_rss=f"{rss / 1e6:.0f}MB", **ratio)
