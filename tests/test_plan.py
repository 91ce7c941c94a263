"""Everything is checked before compute, and every problem is reported in one line."""

import json

import numpy as np
import pytest

from mergealign_fast.errors import PlanError
from mergealign_fast.plan import MergeOptions, plan_merge
from mergealign_fast.units import parse_size

from conftest import small_model, write_checkpoint


@pytest.fixture
def trio(tmp_path):
    for seed, role in enumerate(("base", "domain", "aligned")):
        write_checkpoint(tmp_path / role, small_model(seed), config={"torch_dtype": "float32"})
    return tmp_path


def problems(trio, out=None, **options):
    with pytest.raises(PlanError) as info:
        plan_merge(trio / "base", trio / "domain", trio / "aligned", out or trio / "out",
                   MergeOptions(**options))
    return info.value.problems


def test_a_clean_trio_plans(trio):
    plan = plan_merge(trio / "base", trio / "domain", trio / "aligned", trio / "out")
    assert plan.tensor_count == 3 and len(plan.shards) == 1
    assert plan.shards[0].filename == "model.safetensors"


def test_missing_and_extra_tensors_name_the_model_and_tensor(trio):
    model = small_model(1)
    del model["norm.weight"]
    model["adapter.weight"] = np.zeros(3, dtype=np.float32)
    write_checkpoint(trio / "domain", model)
    found = problems(trio)
    assert any("norm.weight" in p and "missing from domain" in p for p in found)
    assert any("adapter.weight" in p and "in domain" in p and "not in base" in p for p in found)


def test_extra_vocabulary_rows_are_explained(trio):
    write_checkpoint(trio / "aligned", small_model(2, vocab=35))
    [line] = problems(trio)
    assert "embed.weight" in line and "base [32, 8] vs aligned [35, 8]" in line
    assert "aligned has 3 extra rows: added vocabulary?" in line


def test_unsupported_dtype_that_differs(trio):
    """An integer tensor cannot be merged; it is copied only when the models agree on it."""
    model = small_model(0)
    for start, role in enumerate(("base", "domain", "aligned")):
        model["position_ids"] = np.arange(start, start + 4, dtype=np.int64)
        write_checkpoint(trio / role, model)
    found = problems(trio)
    assert len(found) == 3 and all("dtype I64 cannot be merged" in p for p in found)


def test_all_problems_are_reported_together(trio):
    write_checkpoint(trio / "aligned", small_model(2, vocab=35))
    (trio / "out").mkdir()
    (trio / "out" / "keep.txt").write_text("precious")
    found = problems(trio, domain_weight=float("nan"))
    assert len(found) == 3
    assert any("not empty" in p and "--force" in p for p in found)
    assert any("domain weight must be a finite" in p for p in found)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_may_not_overlap_an_input(trio, where):
    out = trio / "base" if where == "same" else trio / "base" / "merged"
    found = problems(trio, out=out, force=True)
    assert any("overlaps the base model folder" in p for p in found)


def test_not_enough_disk_is_refused_up_front(trio, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    [line] = problems(trio)
    assert "not enough free disk" in line and "1,000 bytes are free" in line


def test_index_naming_a_missing_shard(trio):
    index = {"metadata": {}, "weight_map": {"embed.weight": "model-00001-of-00002.safetensors"}}
    (trio / "domain" / "model.safetensors.index.json").write_text(json.dumps(index))
    (trio / "domain" / "model.safetensors").unlink()  # else transformers (and we) load that
    [line] = problems(trio)
    assert "domain" in line and "model-00001-of-00002.safetensors which does not exist" in line


def test_index_naming_a_tensor_the_shard_lacks(trio):
    shard = "model-00001-of-00001.safetensors"
    (trio / "domain" / "model.safetensors").rename(trio / "domain" / shard)
    index = {"metadata": {}, "weight_map": {"embed.weight": shard, "ghost.weight": shard}}
    (trio / "domain" / "model.safetensors.index.json").write_text(json.dumps(index))
    found = problems(trio)
    assert any(f"'ghost.weight' is listed in {shard} but that file does not contain it"
               in p for p in found)


def test_folder_with_a_broken_pytorch_bin(trio, tmp_path):
    (trio / "domain" / "model.safetensors").unlink()
    (trio / "domain" / "pytorch_model.bin").write_bytes(b"x")
    [line] = problems(trio)
    assert "pytorch_model.bin: not a PyTorch checkpoint" in line and line.startswith("domain:")


def test_corrupt_header_is_reported_with_the_role(trio):
    path = trio / "aligned" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    [line] = problems(trio)
    assert line.startswith("aligned: ") and str(path) in line


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8),
                                           ("2GiB", 2 * 2**30), ("1024", 1024),
                                           ("1.5KB", 1500)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("five gigs")


# ---- vocabularies numbered alike ---------------------------------------------------------------

def _bpe(vocab: dict, added=()) -> str:
    return json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
                       "added_tokens": [{"id": i, "content": c, "special": True}
                                        for i, c in added]})


BASE_VOCAB = {"<s>": 0, "a": 1, "b": 2, "ab": 3}


@pytest.mark.parametrize("domain_file, other, conflict", [
    # the same numbering, written otherwise (key order, spacing): agreed
    ("tokenizer.json", json.dumps({"model": {"vocab": dict(reversed(BASE_VOCAB.items()))}}),
     None),
    # a reserved slot renamed by the fine-tune keeps its id: agreed
    ("tokenizer.json", _bpe(BASE_VOCAB, added=[(4, "<|im_start|>")]), None),
    # two tokens swapped: refused, naming the token and both ids
    ("tokenizer.json", _bpe({"<s>": 0, "a": 2, "b": 1, "ab": 3}), "'a' is id 2 there, 1 in"),
    # an added token at another id than the base's
    ("tokenizer.json", _bpe(BASE_VOCAB, added=[(3, "<pad>")]), "'<pad>' is id 3 there, 4 in"),
    ("tokenizer.json", _bpe({"<s>": 0, "a": 1, "b": 2, "ab": 3}, added=[(0, "ab")]),
     "'ab' is id 0 there, 3 in"),
])
def test_models_that_number_tokens_otherwise_are_refused(trio, domain_file, other, conflict):
    (trio / "base" / "tokenizer.json").write_text(_bpe(BASE_VOCAB, added=[(4, "<pad>")]))
    (trio / "aligned" / "tokenizer.json").write_text(_bpe(BASE_VOCAB, added=[(4, "<pad>")]))
    (trio / "domain" / domain_file).write_text(other)
    if conflict is None:
        plan_merge(trio / "base", trio / "domain", trio / "aligned", trio / "out")
        return
    [line] = problems(trio)
    assert line.startswith(f"domain: {trio / 'domain' / domain_file} numbers its tokens "
                           "otherwise than the base model")
    assert conflict in line and "merge by token (merge --vocab" in line


def test_unigram_and_gpt2_vocabularies_are_compared_too(trio):
    unigram = [["<unk>", 0.0], ["▁a", -1.0], ["▁b", -2.0]]
    (trio / "base" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": unigram}}))
    swapped = [unigram[0], unigram[2], unigram[1]]
    (trio / "aligned" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": swapped}}))
    [line] = problems(trio)
    assert line.startswith("aligned: ") and "'▁b' is id 1 there, 2 in" in line
    for role, vocab in (("base", {"a": 0, "b": 1}), ("domain", {"a": 1, "b": 0}),
                        ("aligned", {"a": 0, "b": 1})):
        (trio / role / "tokenizer.json").unlink(missing_ok=True)
        (trio / role / "vocab.json").write_text(json.dumps(vocab))
    [line] = problems(trio)
    assert line.startswith("domain: ") and "vocab.json" in line


def test_real_tokenizers_saved_by_transformers_agree_and_a_permuted_one_does_not(trio):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel

    words = {"[UNK]": 0, "hello": 1, "world": 2, "merge": 3}
    tokenizers.Tokenizer(WordLevel(words, unk_token="[UNK]")).save(
        str(trio / "base" / "tokenizer.json"))
    tokenizers.Tokenizer(WordLevel(words, unk_token="[UNK]")).save(
        str(trio / "aligned" / "tokenizer.json"))
    permuted = {"[UNK]": 0, "hello": 3, "world": 2, "merge": 1}
    tokenizers.Tokenizer(WordLevel(permuted, unk_token="[UNK]")).save(
        str(trio / "domain" / "tokenizer.json"))
    [line] = problems(trio)
    assert line.startswith("domain: ")
    assert "'hello' is id 3 there, 1 in" in line or "'merge' is id 1 there, 3 in" in line
