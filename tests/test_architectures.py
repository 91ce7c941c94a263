"""Merging is by tensor name, so any architecture transformers saves merges: tiny real models of
each kind (Llama, Mistral, Qwen2, Phi-3, Gemma with tied embeddings, GPT-2 with Conv1D and
`transformer.h`, Mixtral and Qwen2-MoE with per-expert tensors), three of each, merged and
loaded back by transformers with no missing or unexpected key, each tensor bitwise what the
kernel gives for it alone."""

import pytest

from mergealign_fast import merge_tensors
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from test_cli import run_cli

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=8),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                            n_positions=64),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SMALL, num_experts=4,
                                                     num_experts_per_tok=2,
                                                     moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=32),
}


@pytest.mark.slow  # builds and loads 32 small transformers models (~1 s each)
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_any_architecture_merges_and_loads_back_with_every_key(tmp_path, architecture):
    folders = {}
    for seed, role in enumerate(("base", "domain", "aligned")):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[architecture]())
        folders[role] = tmp_path / role
        model.save_pretrained(folders[role])
    done = run_cli("merge", folders["base"], folders["domain"], folders["aligned"], "-o",
                   tmp_path / "out", "--domain-weight", "0.7", "--align-weight", "0.4",
                   "--quiet")
    assert done.returncode == 0, done.stderr
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = open_checkpoint(tmp_path / "out").tensors
    inputs = {role: open_checkpoint(folder).tensors for role, folder in folders.items()}
    assert set(merged) == set(inputs["base"])
    for name, location in merged.items():
        alone = merge_tensors(*(read_elements(inputs[r][name]) for r in inputs),
                              domain_weight=0.7, align_weight=0.4, name=name)
        assert (read_elements(location) == alone).all(), name
