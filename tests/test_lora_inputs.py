"""PEFT LoRA adapters as merge inputs (io/adapters.py): BASE+ADAPTER is the model PEFT's
merge_and_unload makes, computed in the streaming pass.

The oracle is the definition in float64, W + scale·B·A per adapted module (PEFT's LoraConfig:
scale = alpha/r, alpha/sqrt(r) with rsLoRA, per-module r and alpha from the patterns), written
here from PEFT's documented semantics, not from the product code; PEFT's own merge_and_unload
is compared too.  The bound: the product in fp32 (r products and sums, each within half an ulp
of fp32: r·2⁻²³·s·Σ|B||A|), then W + Δ and the merge formula's own roundings (a few fp32 ulps
of the result), then one rounding at the store (half an ulp of the output dtype)."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from mergealign_fast import Method, merge_checkpoints  # noqa: E402
from mergealign_fast.errors import MergeError, PlanError  # noqa: E402
from mergealign_fast.io import stream  # noqa: E402

FP32_EPS = 2.0 ** -23


def _llama(folder, dtype=torch.float32, seed=0, vocab=64, bias=False):
    torch.manual_seed(seed)
    if bias:
        config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=3, num_attention_heads=2,
                                          num_key_value_heads=1)
        model = transformers.LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(folder)
    return model


def _gpt2(folder):
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return model


def _adapter(model, folder, seed=2, **lora):
    torch.manual_seed(seed)
    lora.setdefault("init_lora_weights", False)  # random B: every adapted tensor changes
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    wrapped.save_pretrained(folder)
    return wrapped


def _peft_merged(base_folder, adapter_folder, model_class, out):
    model = model_class.from_pretrained(base_folder)
    merged = peft.PeftModel.from_pretrained(model, adapter_folder).merge_and_unload()
    merged.save_pretrained(out)
    return load_file(str(out / "model.safetensors"))


def _oracle(base_folder, adapter_folder):
    """{tensor: (float64 value, bound of the fp32 product)} of BASE+ADAPTER, from the files."""
    base = {k: v.double() for k, v in load_file(str(base_folder / "model.safetensors")).items()}
    config = json.loads((adapter_folder / "adapter_config.json").read_text())
    saved = {k[len("base_model.model."):]: v.double() for k, v in
             load_file(str(adapter_folder / "adapter_model.safetensors")).items()}
    bounds = {k: torch.zeros_like(v) for k, v in base.items()}
    for key, value in saved.items():
        if ".lora_" in key:
            continue
        base[key.replace(".base_layer", "")] = value
    for key in [k for k in saved if k.endswith(("lora_A.weight", "lora_embedding_A"))]:
        embedding = key.endswith("lora_embedding_A")
        module = key.rsplit(".lora_", 1)[0]
        a = saved[key]
        b = saved[key.replace("_A", "_B")]
        r = _pattern(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        product, magnitude = b @ a, b.abs() @ a.abs()
        if embedding or config.get("fan_in_fan_out"):
            product, magnitude = product.T, magnitude.T
        weight = module + ".weight"
        base[weight] = base[weight] + scale * product
        bounds[weight] = r * FP32_EPS * scale * magnitude
        bias = saved.get(module + ".lora_B.bias")
        if bias is not None:
            base[module + ".bias"] = base[module + ".bias"] + scale * bias
    return base, bounds


def _pattern(patterns, module, default):
    import re

    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _ulp(values, dtype):
    bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    exponent = torch.floor(torch.log2(values.abs().clamp_min(2.0 ** -126)))
    return 2.0 ** (exponent - bits)


def _merge_alone(tmp_path, base, adapter, out_name="ours", **options):
    """BASE+ADAPTER alone: task arithmetic with the adapted model at weight 1."""
    out = tmp_path / out_name
    merge_checkpoints(base, f"{base}+{adapter}", base, out, domain_weight=1.0, align_weight=0.0,
                      **options)
    return load_file(str(out / "model.safetensors"))


def _check_against(ours, oracle, bounds, dtype=torch.float32):
    for name, expected in oracle.items():
        got = ours[name].double()
        # The merge's fp32 roundings (W + Δ, then b + 1·(d − b)): 4 ulps of the larger of W and
        # the result; the store: half an ulp of the output dtype.
        room = 4 * _ulp(expected.abs().maximum(got.abs()), torch.float32) \
            + 0.5 * _ulp(expected, dtype) + bounds[name]
        excess = (got - expected).abs() - room
        assert excess.max().item() <= 0, f"{name}: {excess.max().item()} beyond the bound"


LLAMA_OPTIONS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj",
                                                              "gate_proj", "down_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
         alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    dict(r=2, lora_alpha=4, target_modules=r".*\.(up|down)_proj"),
    dict(r=3, lora_alpha=6, target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    dict(r=2, lora_alpha=2, target_modules=["v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
]


@pytest.mark.parametrize("lora", LLAMA_OPTIONS, ids=lambda o: "-".join(sorted(o)))
def test_llama_adapter_equals_peft_merge_and_unload(tmp_path, lora):
    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", **lora)
    oracle, bounds = _oracle(tmp_path / "base", tmp_path / "adapter")
    ours = _merge_alone(tmp_path, tmp_path / "base", tmp_path / "adapter")
    _check_against(ours, oracle, bounds)
    theirs = _peft_merged(tmp_path / "base", tmp_path / "adapter",
                          transformers.LlamaForCausalLM, tmp_path / "peft")
    changed = 0
    for name, value in theirs.items():
        room = 8 * _ulp(value.double(), torch.float32) + 2 * bounds[name]
        assert ((ours[name].double() - value.double()).abs() - room).max() <= 0, name
        changed += not torch.equal(value, load_file(
            str(tmp_path / "base" / "model.safetensors"))[name])
    assert changed >= 2  # the adapter did change the model


def _ours_within_bound_and_peft(tmp_path, model_class):
    """BASE+ADAPTER of tmp_path's base and adapter merged alone, checked against the oracle;
    (ours, PEFT's merge_and_unload) tensors."""
    oracle, bounds = _oracle(tmp_path / "base", tmp_path / "adapter")
    ours = _merge_alone(tmp_path, tmp_path / "base", tmp_path / "adapter")
    _check_against(ours, oracle, bounds)
    return ours, _peft_merged(tmp_path / "base", tmp_path / "adapter", model_class,
                              tmp_path / "peft")


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base_model = _gpt2(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
             fan_in_fan_out=True)
    ours, theirs = _ours_within_bound_and_peft(tmp_path, transformers.GPT2LMHeadModel)
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(ours[name], theirs[name], atol=1e-6)


def test_qwen2_lora_bias(tmp_path):
    base_model = _llama(tmp_path / "base", bias=True)
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=4,
             target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    # PEFT initialises lora_B.bias to zero even without init_lora_weights: make it count.
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    saved = load_file(str(path))
    for key in [k for k in saved if k.endswith("lora_B.bias")]:
        saved[key] = torch.randn_like(saved[key])
    save_file(saved, str(path))
    ours, theirs = _ours_within_bound_and_peft(tmp_path, transformers.Qwen2ForCausalLM)
    name = "model.layers.0.self_attn.q_proj.bias"
    assert torch.allclose(ours[name], theirs[name], atol=1e-6)
    assert not torch.allclose(ours[name], load_file(str(tmp_path / "base" / "model.safetensors"))[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_rounds_once(tmp_path, dtype):
    base_model = _llama(tmp_path / "base", dtype=dtype)
    _adapter(base_model, tmp_path / "adapter", r=4, lora_alpha=8,
             target_modules=["q_proj", "down_proj", "embed_tokens"])
    oracle, bounds = _oracle(tmp_path / "base", tmp_path / "adapter")
    ours = _merge_alone(tmp_path, tmp_path / "base", tmp_path / "adapter")
    assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == dtype
    _check_against(ours, oracle, bounds, dtype)


def test_mergealign_with_a_lora_expert_equals_the_materialised_expert(tmp_path):
    """The ordinary case: merge BASE BASE+EXPERT ALIGNED, under TIES (sign election and top-k
    see the adapted values), equals the merge of the expert PEFT materialises and saves in the
    base's dtype (W + ΔW rounded once to bf16: what the adapted input is held in)."""
    base_model = _llama(tmp_path / "base", dtype=torch.bfloat16)
    _llama(tmp_path / "aligned", dtype=torch.bfloat16, seed=5)
    _adapter(base_model, tmp_path / "expert", r=4, lora_alpha=8,
             target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    fp32_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base",
                                                              dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(fp32_base, tmp_path / "expert").merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(tmp_path / "materialised")
    method = Method("ties", domain_density=0.5, align_density=0.5)
    merge_checkpoints(tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'expert'}",
                      tmp_path / "aligned", tmp_path / "ours", method=method)
    merge_checkpoints(tmp_path / "base", tmp_path / "materialised", tmp_path / "aligned",
                      tmp_path / "reference", method=method)
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    differing = 0
    for name, value in reference.items():
        differing += int((ours[name].float() != value.float()).sum())
    # Only where the fp32 products, summed in another order (ours vs BLAS), round to another
    # bf16 value: about one element in 2^16 of the adapted ones.
    total = sum(v.numel() for v in reference.values())
    assert differing <= max(2, total >> 12), differing


def test_windows_and_threads_do_not_change_a_bit(tmp_path, monkeypatch):
    base_model = _llama(tmp_path / "base", dtype=torch.bfloat16)
    _adapter(base_model, tmp_path / "adapter", r=4, lora_alpha=8,
             target_modules=["q_proj", "gate_proj", "embed_tokens"])
    whole = _merge_alone(tmp_path, tmp_path / "base", tmp_path / "adapter", out_name="whole")
    # 40-byte windows: 20 bf16 outputs, cutting rows of 16 and 24 at every position.
    monkeypatch.setattr(stream, "WINDOW_BYTES", 40)
    from mergealign_fast.engine.writers import cpu as cpu_writer

    monkeypatch.setattr(cpu_writer.stream, "WINDOW_BYTES", 40)
    cut = _merge_alone(tmp_path, tmp_path / "base", tmp_path / "adapter", out_name="cut",
                       threads=1)
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name


def test_adapter_alone_stands_on_its_named_base_and_a_wrong_base_is_named(tmp_path):
    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    config_path.write_text(json.dumps(config))
    out = tmp_path / "alone"
    merge_checkpoints(tmp_path / "base", tmp_path / "adapter", tmp_path / "base", out,
                      domain_weight=1.0, align_weight=0.0)
    assert load_file(str(out / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "base" / "model.safetensors")).keys()
    # The same weights under another name: applied, with a warning naming both.
    shutil.copytree(tmp_path / "base", tmp_path / "other-name")
    from mergealign_fast.plan import MergeOptions, plan_merge

    plan = plan_merge(tmp_path / "base", f"{tmp_path / 'other-name'}+{tmp_path / 'adapter'}",
                      tmp_path / "base", tmp_path / "o2", MergeOptions())
    assert any("other-name" in note and str(tmp_path / "base") in note for note in plan.notes)


def _broken(tmp_path, change):
    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    change(tmp_path / "adapter")
    with pytest.raises((MergeError, PlanError)) as caught:
        merge_checkpoints(tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'adapter'}",
                          tmp_path / "base", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    text = str(caught.value)
    assert "Traceback" not in text
    return text


def _edit_config(**changes):
    def change(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return change


def _edit_tensors(edit):
    def change(folder):
        path = folder / "adapter_model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
    return change


def _rename_module(tensors):
    for key in list(tensors):
        tensors[key.replace("q_proj", "qq_proj")] = tensors.pop(key)


BAD_ADAPTERS = {
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "without weights"),
    "module the base lacks": (_edit_tensors(_rename_module), "has no tensor"),
    "rank that does not match": (_edit_config(r=8), "r=8"),
    "corrupt file": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10" * 64),
                     "adapter_model.safetensors"),
    "dora": (_edit_config(use_dora=True), "use_dora"),
    "not lora": (_edit_config(peft_type="IA3"), "peft_type IA3"),
    "unreadable config": (lambda f: (f / "adapter_config.json").write_text("{"), "cannot read"),
    "factor missing": (_edit_tensors(lambda t: t.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")), "lora_B is missing"),
    "untargeted module": (_edit_config(target_modules=["v_proj"]), "not a module the adapter"),
    "factor shape": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(7, 4)})),
        "lora_B·lora_A"),
    "key without a module": (_edit_tensors(lambda t: t.update({
        "base_model.model.x": torch.ones(2)})), "not a PEFT adapter key"),
    "key of another tool": (_edit_tensors(lambda t: t.update({
        "unet.down.lora.up": torch.ones(2)})), "not a PEFT adapter key"),
    "1-D factor": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(16)})),
        "only 2-D weights"),
    "integer factor": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            torch.ones(4, 16, dtype=torch.int8)})), "dtype I8"),
    "stray whole tensor": (_edit_tensors(lambda t: t.update({
        "base_model.model.model.norm.weight": torch.ones(16)})), "not in modules_to_save"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_one_line_before_compute(tmp_path, case):
    change, expected = BAD_ADAPTERS[case]
    text = _broken(tmp_path, change)
    assert expected in text
    assert all(len(line) < 400 for line in text.splitlines())


@pytest.mark.slow
def test_cli_merge_base_plus_adapter_and_plus_syntax_errors(tmp_path):
    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    run = [sys.executable, "-m", "mergealign_fast", "merge"]
    done = subprocess.run(run + [str(tmp_path / "base"), f"{tmp_path / 'base'}+{tmp_path / 'adapter'}",
                                 str(tmp_path / "base"), "-o", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run(run + [str(tmp_path / "base"), f"{tmp_path / 'base'}+{tmp_path / 'base'}",
                                str(tmp_path / "base"), "-o", str(tmp_path / "o2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a PEFT adapter folder" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_mergekit_yaml_base_plus_lora(tmp_path):
    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: linear\nmodels:\n"
                      f"  - model: {tmp_path / 'base'}+{tmp_path / 'adapter'}\n"
                      f"    parameters: {{weight: 1.0}}\ndtype: float32\n")
    done = subprocess.run([sys.executable, "-m", "mergealign_fast", "run", str(config),
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    oracle, bounds = _oracle(tmp_path / "base", tmp_path / "adapter")
    _check_against(load_file(str(tmp_path / "out" / "model.safetensors")), oracle, bounds)


def test_the_adapter_tokenizer_goes_to_the_output(tmp_path):
    """mergekit's #548: an adapted model's tokenizer was dropped."""
    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    (tmp_path / "adapter" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    merge_checkpoints(tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'adapter'}",
                      tmp_path / "base", tmp_path / "out", tokenizer_from="domain")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == \
        {"model_max_length": 77}
    assert (tmp_path / "out" / "config.json").is_file()


def test_numpy_factors_bitwise_like_the_kernel_block_cuts():
    """The native product is the same whatever rows and columns a window cuts (sgemm's is
    not): a whole-tensor call against one-row, partial-row calls."""
    from mergealign_fast.kernels import cpu

    native = cpu.native()
    rng = np.random.default_rng(3)
    rows, rank, width = 37, 5, 29
    left = rng.standard_normal((rows, rank), dtype=np.float32)
    right = rng.standard_normal((rank, width), dtype=np.float32)
    weight = rng.standard_normal((rows, width), dtype=np.float32)
    whole = np.empty(rows * width, np.float32)
    assert native.low_rank_add(whole.ctypes.data, 0, weight.ctypes.data, 0, left.ctypes.data,
                               right.ctypes.data, rows, rank, width, 0, width, 0.75, 2) == 0
    expected = weight.astype(np.float64) + 0.75 * (left.astype(np.float64) @ right)
    assert np.abs(whole - expected.ravel()).max() <= 8 * FP32_EPS * np.abs(expected).max()
    for row in range(rows):
        for first, last in ((0, 3), (3, width), (7, 8)):
            part = np.empty(last - first, np.float32)
            native.low_rank_add(part.ctypes.data, 0, weight[row, first:].ctypes.data, 0,
                                left[row].ctypes.data, right.ctypes.data, 1, rank, width,
                                first, last, 0.75, 1)
            assert np.array_equal(part, whole[row * width + first: row * width + last])


@pytest.mark.slow
def test_a_hub_adapter_on_a_hub_base(tmp_path, monkeypatch):
    """BASE+ADAPTER as repo ids: the adapter's weights come down with the base's, after the
    plan; the same model as the local folders give."""
    pytest.importorskip("huggingface_hub")
    import test_hub

    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    local = _merge_alone(tmp_path, tmp_path / "base", tmp_path / "adapter", out_name="local")
    hub = next(test_hub.local_hub.__wrapped__(tmp_path, monkeypatch))
    try:
        hub.add_repo("test/base", tmp_path / "base")
        hub.add_repo("test/adapter", tmp_path / "adapter")
        merge_checkpoints("test/base", "test/base+test/adapter", "test/base", tmp_path / "hub",
                          domain_weight=1.0, align_weight=0.0, fsync=False)
        remote = load_file(str(tmp_path / "hub" / "model.safetensors"))
        assert all(torch.equal(remote[k], local[k]) for k in local)
    finally:
        test_hub.forget_resolved()
        hub.stop()


def test_the_gpu_writer_streams_adapted_inputs_like_the_cpu(tmp_path):
    """--device cuda's streaming writer, run on the CPU: adapted windows (held in the weight's
    dtype, computed on the host) fill its slots like stored ones; the same bytes."""
    from mergealign_fast.engine.loop import execute
    from mergealign_fast.engine.writers.gpu import GpuWriter
    from mergealign_fast.plan import MergeOptions, plan_merge

    base_model = _llama(tmp_path / "base", dtype=torch.bfloat16)
    _llama(tmp_path / "aligned", dtype=torch.bfloat16, seed=5)
    _adapter(base_model, tmp_path / "expert", r=4, lora_alpha=8,
             target_modules=["q_proj", "up_proj", "embed_tokens"])
    expert = f"{tmp_path / 'base'}+{tmp_path / 'expert'}"
    merge_checkpoints(tmp_path / "base", expert, tmp_path / "aligned", tmp_path / "cpu",
                      domain_weight=0.3, align_weight=0.9)
    plan = plan_merge(tmp_path / "base", expert, tmp_path / "aligned", tmp_path / "gpu",
                      MergeOptions(domain_weight=0.3, align_weight=0.9))
    execute(plan, writer=GpuWriter(plan, 4 * 8 * 4096 + 2048, backend="torch", device="cpu"))
    cpu = load_file(str(tmp_path / "cpu" / "model.safetensors"))
    gpu = load_file(str(tmp_path / "gpu" / "model.safetensors"))
    assert all(torch.equal(cpu[k], gpu[k]) for k in cpu)


def _mutated_configs():
    """adapter_config.json values of the wrong kind, one setting at a time."""
    odd = [None, "x", "(", 0, -1, 1.5, True, [], {}, [1], ["q_proj", 3], {"a": "b"},
           {"(": 2}, float("nan"), 10 ** 30]
    keys = ["r", "lora_alpha", "target_modules", "exclude_modules", "modules_to_save",
            "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
            "use_rslora", "fan_in_fan_out", "lora_bias", "base_model_name_or_path", "peft_type",
            "use_dora"]
    return [(k, v) for k in keys for v in odd]


@pytest.mark.slow
def test_hostile_adapter_configs_are_one_line_or_a_merge(tmp_path):
    """Every setting of adapter_config.json replaced by values of the wrong kind: each is a
    merge or one clear line, never a traceback."""
    base_model = _llama(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    path = tmp_path / "adapter" / "adapter_config.json"
    original = json.loads(path.read_text())
    outcomes = {"merged": 0, "refused": 0}
    for i, (key, value) in enumerate(_mutated_configs()):
        path.write_text(json.dumps({**original, key: value}))
        try:
            merge_checkpoints(tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'adapter'}",
                              tmp_path / "base", tmp_path / f"out{i}", fsync=False)
            outcomes["merged"] += 1
        except (MergeError, PlanError) as exc:
            assert all(len(line) < 500 for line in str(exc).splitlines()), (key, value)
            assert not (tmp_path / f"out{i}").exists()
            outcomes["refused"] += 1
    assert outcomes["merged"] > 10 and outcomes["refused"] > 100, outcomes


@pytest.mark.slow
def test_eval_takes_an_adapted_model_through_peft(tmp_path):
    """`eval BASE+ADAPTER`: the harness loads the base with the adapter applied by PEFT."""
    pytest.importorskip("lm_eval")
    from eval_world import tiny_model, tokenizer

    from mergealign_fast.evaluation import harness
    from mergealign_fast.sources import model_folder

    words = tokenizer()
    base_model = tiny_model(len(words), seed=0)
    base_model.save_pretrained(tmp_path / "base")
    words.save_pretrained(tmp_path / "base")
    _adapter(base_model, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    adapted = model_folder(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}")
    model = harness.open_model(adapted, "cpu", 1)
    assert isinstance(model.model, peft.PeftModel)
    with pytest.raises(MergeError, match="--engine hf"):
        harness.open_model(adapted, "cpu", 1, engine="vllm")
