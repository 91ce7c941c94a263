"""extract-lora (tools/extract_lora.py, tools/low_rank.py): a PEFT adapter from MODEL − BASE.

The oracle is numpy's float64 SVD of each τ: the rank kept is the number of singular values
above sv_epsilon, and the error of a rank-r truncation is sqrt(Σ_{i>r} s_i²) / ‖τ‖ (Eckart–
Young); PEFT itself loads every adapter written here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from mergealign_fast import Method, merge_checkpoints  # noqa: E402
from mergealign_fast.errors import MergeError, PlanError  # noqa: E402
from mergealign_fast.output.manifest import verify_output  # noqa: E402
from mergealign_fast.tools import extract_lora as extraction  # noqa: E402
from mergealign_fast.tools.extract_lora import ExtractOptions, extract, plan_extraction  # noqa: E402
from mergealign_fast.tools.low_rank import (EXACT_BELOW, factors,  # noqa: E402
                                             relative_error)

RANK = 3


def _tiny_llama(folder, seed=0, vocab=64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def _tuned(model, folder, noise=1e-4, seed=1, embeddings=False):
    """MODEL = BASE + a rank-RANK change of every projection (+ noise), norms nudged."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("embed" not in name and "lm_head" not in name or embeddings):
                low = torch.randn(p.shape[0], RANK) @ torch.randn(RANK, p.shape[1])
                p += 0.05 * low + noise * torch.randn_like(p)
            elif p.ndim == 1:
                p += 0.01
    model.save_pretrained(folder)
    return model


@pytest.fixture
def pair(tmp_path):
    base = _tiny_llama(tmp_path / "base")
    _tuned(base, tmp_path / "model")
    return tmp_path / "model", tmp_path / "base"


def _extract(model, base, out, **options):
    options.setdefault("fsync", False)
    return extract(plan_extraction(model, base, out, ExtractOptions(**options)))


def _taus(model, base):
    m = load_file(str(model / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    return {k: (m[k].double() - b[k].double()).numpy() for k in m}


def _predicted(tau, rank):
    s = np.linalg.svd(tau, compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2))), s


def test_kept_rank_and_error_are_what_the_singular_values_say(pair, tmp_path):
    model, base = pair
    result = _extract(model, base, tmp_path / "adapter", max_rank=8, sv_epsilon=0.01,
                      dtype="fp32")
    taus = _taus(model, base)
    decomposed = [r for r in result.report if r["kind"] == "lora"]
    assert len(decomposed) == 14  # 7 projections x 2 layers
    for r in decomposed:
        tau = taus[r["module"] + ".weight"]
        predicted, s = _predicted(tau, r["rank"])
        assert r["rank"] == int(np.count_nonzero(s > 0.01)) == RANK
        assert abs(r["error"] - predicted) <= 1e-4 + 1e-3 * predicted, r
    # Without the tolerance every module keeps max-rank, and the error falls with it.
    full = _extract(model, base, tmp_path / "full", max_rank=8, dtype="fp32")
    for r in (r for r in full.report if r["kind"] == "lora"):
        predicted, _ = _predicted(taus[r["module"] + ".weight"], 8)
        assert r["rank"] == 8 and abs(r["error"] - predicted) <= 1e-4 + 1e-3 * predicted


def test_peft_loads_it_and_its_forward_pass_is_base_plus_the_truncation(pair, tmp_path):
    model, base = pair
    _extract(model, base, tmp_path / "adapter", max_rank=RANK, dtype="fp32")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    base_weights = load_file(str(base / "model.safetensors"))
    model_weights = load_file(str(model / "model.safetensors"))
    # The oracle: BASE + B·A in float64 for decomposed modules, MODEL's tensor for saved ones.
    expected = {}
    for name, value in base_weights.items():
        module = name.rsplit(".", 1)[0]
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        whole = adapter.get(f"base_model.model.{name}")
        if a is not None and name.endswith(".weight"):
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            expected[name] = value.double() + b.double() @ a.double()
        elif whole is not None:
            expected[name] = whole.double()
            assert torch.equal(whole, model_weights[name])
        else:
            expected[name] = value.double()
    loaded = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter")
    merged = loaded.merge_and_unload().state_dict()
    for name, value in expected.items():
        assert torch.allclose(merged[name].double(), value, atol=1e-5, rtol=1e-5), name
    reference = transformers.LlamaForCausalLM.from_pretrained(base)
    reference.load_state_dict({k: v.float() for k, v in expected.items()})
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, reference(tokens).logits, atol=1e-4)
    assert verify_output(tmp_path / "adapter") == []


def test_randomized_svd_matches_the_exact_one_on_a_large_low_rank_matrix():
    rng = np.random.default_rng(0)
    m, n, true_rank = EXACT_BELOW + 40, EXACT_BELOW + 100, 12
    signal = rng.standard_normal((m, true_rank)) @ (rng.standard_normal((true_rank, n)) *
                                                     np.linspace(3, 1, true_rank)[:, None])
    tau = (signal + 0.01 * rng.standard_normal((m, n))).astype(np.float32)
    found = factors(tau, 16, "layers.0.q_proj.weight", sv_epsilon=0.5 * np.sqrt(n) * 0.05)
    assert not found.exact
    exact = np.linalg.svd(tau.astype(np.float64), compute_uv=False)
    assert found.a.shape[0] == int(np.count_nonzero(exact > 0.5 * np.sqrt(n) * 0.05)) == \
        true_rank
    assert np.allclose(found.singular_values, exact[:true_rank], rtol=1e-4)
    predicted = float(np.sqrt(np.sum(exact[true_rank:] ** 2) / np.sum(exact ** 2)))
    error = relative_error(tau, found.b, found.a)
    assert abs(error - predicted) <= 1e-3 * predicted
    # Seeded by the tensor's name: the same factors every time.
    again = factors(tau, 16, "layers.0.q_proj.weight", sv_epsilon=0.5 * np.sqrt(n) * 0.05)
    assert np.array_equal(found.a, again.a) and np.array_equal(found.b, again.b)


def test_the_torch_path_gives_the_numpy_path_s_factors():
    """--device cuda runs the same algorithm through torch; here torch on the CPU."""
    from mergealign_fast.tools.low_rank import Linalg

    rng = np.random.default_rng(1)
    tau = (rng.standard_normal((EXACT_BELOW + 8, 40)) @ rng.standard_normal((40, EXACT_BELOW + 8))
           ).astype(np.float32)
    ours = factors(tau, 8, "x", linalg=Linalg())
    theirs = factors(tau, 8, "x", linalg=Linalg("cpu", torch=True))
    assert np.allclose(ours.singular_values, theirs.singular_values, rtol=1e-4)
    assert abs(relative_error(tau, ours.b, ours.a) - relative_error(tau, theirs.b, theirs.a)) \
        < 1e-4


def test_no_distribute_scale_puts_the_singular_values_in_a(pair, tmp_path):
    model, base = pair
    _extract(model, base, tmp_path / "adapter", max_rank=RANK, dtype="fp32",
             distribute_scale=False)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    assert torch.allclose(b.T @ b, torch.eye(RANK, dtype=torch.float64), atol=1e-5)


def test_module_choices_follow_the_flags(pair, tmp_path):
    model, base = pair
    result = _extract(model, base, tmp_path / "adapter", max_rank=2,
                      include=(r"layers\.0\.",), exclude=(r"mlp",),
                      save_modules=("model.layers.0.self_attn.o_proj",), skip_undecomposable=True)
    kinds = {r["module"]: r["kind"] for r in result.report}
    assert kinds == {"model.layers.0.self_attn.q_proj": "lora",
                     "model.layers.0.self_attn.k_proj": "lora",
                     "model.layers.0.self_attn.v_proj": "lora",
                     "model.layers.0.self_attn.o_proj": "whole"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["o_proj"]
    assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == \
        torch.float32  # the model's dtype


def test_embeddings_with_embed_lora_and_added_tokens(tmp_path):
    base = _tiny_llama(tmp_path / "base")
    _tuned(base, tmp_path / "model", embeddings=True)
    result = _extract(tmp_path / "model", tmp_path / "base", tmp_path / "adapter", max_rank=RANK,
                      embed_lora=True, dtype="fp32")
    kinds = {r["module"]: r["kind"] for r in result.report}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "lora"
    loaded = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    merged = loaded.merge_and_unload().state_dict()
    tau = _taus(tmp_path / "model", tmp_path / "base")["model.embed_tokens.weight"]
    got = merged["model.embed_tokens.weight"].double().numpy() - load_file(
        str(tmp_path / "base" / "model.safetensors"))["model.embed_tokens.weight"].double().numpy()
    assert np.linalg.norm(got - tau) / np.linalg.norm(tau) < 0.01
    # A fine-tune with 8 added tokens: its embedding and head are saved whole, said so.
    bigger = _tiny_llama(tmp_path / "bigger", vocab=72)
    bigger.save_pretrained(tmp_path / "bigger")
    added = _extract(tmp_path / "bigger", tmp_path / "base", tmp_path / "adapter2",
                     max_rank=RANK, embed_lora=True)
    notes = {r["module"]: r.get("note", "") for r in added.report if r["kind"] == "whole"}
    assert "added tokens" in notes["model.embed_tokens"] and "added tokens" in notes["lm_head"]


def test_gpt2_conv1d_is_decomposed_transposed_with_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50,
                                     n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight")):
                p += 0.05 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1])
    model.save_pretrained(tmp_path / "model")
    _extract(tmp_path / "model", tmp_path / "base", tmp_path / "adapter", max_rank=2,
             dtype="fp32", skip_undecomposable=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    merged = loaded.merge_and_unload().state_dict()
    expected = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert torch.allclose(merged[name], expected[name], atol=1e-5), name


def test_round_trip_a_merge_extracted_and_applied_is_the_merge(tmp_path):
    """merge → extract-lora(merge, base) → BASE+ADAPTER equals the merge within the error the
    extraction reported, module by module."""
    base = _tiny_llama(tmp_path / "base")
    _tuned(_tiny_llama(tmp_path / "tmp1"), tmp_path / "domain", seed=3)
    _tuned(_tiny_llama(tmp_path / "tmp2"), tmp_path / "aligned", seed=4)
    del base
    merge_checkpoints(tmp_path / "base", tmp_path / "domain", tmp_path / "aligned",
                      tmp_path / "merged", method=Method("ties", domain_density=0.5,
                                                         align_density=0.5))
    result = _extract(tmp_path / "merged", tmp_path / "base", tmp_path / "adapter", max_rank=12,
                      dtype="fp32")
    merge_checkpoints(tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'adapter'}",
                      tmp_path / "base", tmp_path / "applied", domain_weight=1.0,
                      align_weight=0.0)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    applied = load_file(str(tmp_path / "applied" / "model.safetensors"))
    base_weights = load_file(str(tmp_path / "base" / "model.safetensors"))
    reported = {r["module"]: r for r in result.report}
    for name, value in merged.items():
        module = name.rsplit(".", 1)[0]
        tau = (value.double() - base_weights[name].double())
        gap = (applied[name].double() - value.double()).norm().item()
        if reported.get(module, {}).get("kind") == "lora":
            # fp32 roundings of W + B·A: a few ulps of each element.
            room = reported[module]["error"] * tau.norm().item() + \
                1e-6 * value.double().norm().item()
            assert gap <= room, name
        else:
            assert gap == 0, name


def test_a_killed_extraction_resumes_where_it_stopped(pair, tmp_path, monkeypatch):
    model, base = pair
    clean = _extract(model, base, tmp_path / "clean", max_rank=RANK)
    real, calls = extraction._decompose, []

    def dies_at_the_fifth(*args):
        calls.append(args[1].module)
        if len(calls) == 5:
            raise MergeError("simulated failure")
        return real(*args)

    monkeypatch.setattr(extraction, "_decompose", dies_at_the_fifth)
    out = tmp_path / "adapter"
    with pytest.raises(MergeError, match="finished modules are kept .* --resume"):
        _extract(model, base, out, max_rank=RANK)
    assert not out.exists()
    with pytest.raises(MergeError, match="interrupted extraction .* --resume"):
        _extract(model, base, out, max_rank=RANK)
    calls.clear()
    monkeypatch.setattr(extraction, "_decompose", lambda *a: calls.append(a[1].module) or real(*a))
    _extract(model, base, out, max_rank=RANK, resume=True)
    assert len(calls) == 14 - 4  # the four finished ones were kept
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "clean" / "adapter_model.safetensors").read_bytes()
    assert verify_output(out) == []
    again = _extract(model, base, out, max_rank=RANK, resume=True)
    assert again.already_complete and clean.report == again.report


def test_the_output_rules(pair, tmp_path):
    model, base = pair
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    with pytest.raises(PlanError, match="not an adapter written by mergealign-fast"):
        _extract(model, base, stranger, max_rank=2, force=True)
    assert (stranger / "keep.txt").read_text() == "mine"
    _extract(model, base, tmp_path / "adapter", max_rank=2)
    with pytest.raises(PlanError, match="--force"):
        _extract(model, base, tmp_path / "adapter", max_rank=2)
    _extract(model, base, tmp_path / "adapter", max_rank=1, force=True)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 1
    with pytest.raises(PlanError, match="overlaps MODEL"):
        _extract(model, base, model / "adapter", max_rank=2)


def test_bad_inputs_are_one_line_each_before_compute(tmp_path):
    base = _tiny_llama(tmp_path / "base")
    other = _tiny_llama(tmp_path / "other")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "wider")
    del base, other
    with pytest.raises(PlanError) as caught:
        _extract(tmp_path / "wider", tmp_path / "base", tmp_path / "out", max_rank=2)
    text = str(caught.value)
    assert "mlp.up_proj.weight: [40, 32] in MODEL, [48, 32] in BASE" in text
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(PlanError, match="--max-rank must be at least 1"):
        _extract(tmp_path / "other", tmp_path / "base", tmp_path / "o2", max_rank=0)
    with pytest.raises(PlanError, match="model: .*not a directory"):
        _extract(tmp_path / "missing", tmp_path / "base", tmp_path / "o3")


@pytest.mark.slow
def test_the_cli_and_mergekit_s_flags(pair, tmp_path):
    model, base = pair
    run = [sys.executable, "-m", "mergealign_fast"]
    done = subprocess.run(run + ["extract-lora", str(model), str(base), "-o",
                                 str(tmp_path / "a"), "--max-rank", "3", "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "extracted 14 LoRA modules" in done.stdout and "relative error" in done.stdout
    done = subprocess.run(run + ["mergekit-extract-lora", "--model", str(model), "--base-model",
                                 str(base), "--out-path", str(tmp_path / "b"), "--max-rank", "3",
                                 "--no-distribute-scale", "--lazy-unpickle", "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run(run + ["extract-lora", str(model), str(tmp_path / "nowhere"), "-o",
                                str(tmp_path / "c")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_beside_mergekit_extract_lora(pair, tmp_path):
    """mergekit 0.1.5's mergekit-extract-lora on the same pair: the same modules, and at the same
    rank an error no larger than its (both exact SVDs here)."""
    model, base = pair
    ours = _extract(model, base, tmp_path / "ours", max_rank=2, dtype="fp32")
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-extract-lora"),
                           "--model", str(model), "--base-model", str(base), "--out-path",
                           str(tmp_path / "theirs"), "--max-rank", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(theirs_config["target_modules"]) == sorted(ours_config["target_modules"])
    assert sorted(theirs_config["modules_to_save"]) == sorted(ours_config["modules_to_save"])
    theirs = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    taus = _taus(model, base)
    for r in (r for r in ours.report if r["kind"] == "lora"):
        key = f"base_model.model.{r['module']}"
        b, a = theirs[f"{key}.lora_B.weight"].double(), theirs[f"{key}.lora_A.weight"].double()
        tau = taus[r["module"] + ".weight"]
        their_error = np.linalg.norm(tau - (b @ a).numpy()) / np.linalg.norm(tau)
        assert r["error"] <= their_error + 1e-5, r["module"]


def test_an_adapted_model_is_extracted_back_to_its_rank(tmp_path):
    """MODEL = BASE+ADAPTER (a rank-2 LoRA): extraction at rank 2 finds it again, to fp32
    rounding, and leaves every other module unchanged."""
    base = _tiny_llama(tmp_path / "base")
    torch.manual_seed(7)
    peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                              init_lora_weights=False)
                        ).save_pretrained(tmp_path / "lora")
    adapted = f"{tmp_path / 'base'}+{tmp_path / 'lora'}"
    result = _extract(adapted, tmp_path / "base", tmp_path / "again", max_rank=4,
                      sv_epsilon=1e-4, skip_undecomposable=True, dtype="fp32")
    kinds = {r["module"]: (r["kind"], r.get("rank")) for r in result.report
             if r["kind"] != "whole"}
    for module, (kind, rank) in kinds.items():
        if module.endswith("q_proj"):
            assert (kind, rank) == ("lora", 2)
        else:
            assert kind == "unchanged", module
    assert max(r["error"] for r in result.report if r["kind"] == "lora") < 1e-5


def test_a_model_equal_to_its_base_has_no_adapter(tmp_path):
    _tiny_llama(tmp_path / "base")
    with pytest.raises(MergeError, match="there is no adapter to write; nothing was kept"):
        _extract(tmp_path / "base", tmp_path / "base", tmp_path / "out", max_rank=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
