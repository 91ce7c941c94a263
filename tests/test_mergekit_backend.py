"""The engine's kernels registered inside mergekit 0.1.5 (skipped when mergekit is absent)."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mergekit")

import yaml  # noqa: E402

from mergealign_fast.mergekit import backend as mergekit_backend  # noqa: E402
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements  # noqa: E402

CONFIGS = {
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.7, density: [0.3, 0.6]}}
  - model: {aligned}
    parameters:
      weight: [{{filter: mlp, value: 0.2}}, {{value: 0.5}}]
      density: 0.5
dtype: float32
out_dtype: bfloat16
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {aligned}
    parameters: {{weight: 0.5, density: 0.7}}
parameters: {{seed: 3}}
""",
    "linear": """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {domain}
    parameters: {{weight: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.3}}
""",
    "ties-four-models": """
merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {aligned}
    parameters: {{weight: 0.5, density: 0.6}}
  - model: {extra1}
    parameters: {{weight: 0.2, density: 0.8}}
  - model: {extra2}
    parameters: {{weight: -0.3, density: 0.5}}
parameters: {{lambda: 0.9}}
""",
    "dare_linear-three-models": """
merge_method: dare_linear
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {aligned}
    parameters: {{weight: 0.5, density: 0.7}}
  - model: {extra1}
    parameters: {{weight: 0.2, density: 0.5}}
parameters: {{seed: 9}}
""",
    "linear-four-models": """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.1}}
  - model: {domain}
    parameters: {{weight: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.3}}
  - model: {extra1}
    parameters: {{weight: 0.2}}
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.7, gamma: 0.05}}
  - model: {aligned}
    parameters: {{weight: 0.5, density: 0.6, gamma: 0.02}}
""",
    "breadcrumbs_ties-three-models": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {aligned}
    parameters: {{weight: 0.5, density: 0.6}}
  - model: {extra1}
    parameters: {{weight: 0.4, density: 0.5}}
parameters: {{gamma: 0.03}}
""",
    "sce-three-models": """
merge_method: sce
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {extra1}
parameters: {{select_topk: 0.5}}
""",
    "della": """
merge_method: della
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}
  - model: {aligned}
    parameters: {{weight: 0.4, density: 0.7}}
parameters: {{lambda: 0.9}}
""",
    "ramplus_tl-three-models": """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {extra1}
parameters: {{r: 0.3, alpha: 0.5, epsilon: 0.0001}}
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {domain}
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {domain}
parameters: {{t: 0.001}}
""",
    "model_stock-filter-wise": """
merge_method: model_stock
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
parameters: {{filter_wise: true}}
""",
    "model_stock-three-models": """
merge_method: model_stock
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {extra1}
""",
    "nuslerp-rows": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.7}}
  - model: {aligned}
    parameters: {{weight: 0.3}}
parameters: {{nuslerp_flatten: false}}
""",
    "nuslerp-without-base": """
merge_method: nuslerp
models:
  - model: {domain}
    parameters: {{weight: 0.4}}
  - model: {aligned}
    parameters: {{weight: 0.6}}
""",
    "multislerp-three-models": """
merge_method: multislerp
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.3}}
  - model: {extra1}
    parameters: {{weight: 0.2}}
""",
    "karcher": """
merge_method: karcher
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
parameters: {{max_iter: 5, tol: 0.00001}}
""",
    "karcher-four-models": """
merge_method: karcher
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {extra1}
""",
    "slerp": """
merge_method: slerp
base_model: {aligned}
models:
  - model: {aligned}
  - model: {domain}
parameters: {{t: 0.4}}
""",
}


def test_register_adds_prefixed_methods_once():
    from mergekit.merge_methods import registry

    names = mergekit_backend.register()
    assert names == mergekit_backend.register()  # a second call changes nothing
    assert {"mergealign_ties", "mergealign_dare_ties", "mergealign_slerp"} <= set(names)
    assert registry.get("mergealign_ties").spec.name == "mergealign_ties"


@pytest.mark.slow  # runs mergekit's pipeline, whose import alone takes ~8 s
@pytest.mark.parametrize("name", CONFIGS)
def test_inside_mergekit_gives_the_model_of_the_run_command(tiny_trio, tmp_path_factory,
                                                           tmp_path, name):
    """mergekit plans, loads and writes; our kernel merges: the tensors are bit for bit those
    of `mergealign-fast run` on the same config (three to five models: a model set through
    the model-set kernel, as `run` merges it)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio

    extra = ensure_synthetic_trio(tmp_path_factory.mktemp("extra"), LLAMA_TINY, seed=4) \
        if "models" in name else {}  # two more fine-tunes of the same shapes
    text = CONFIGS[name].format(**tiny_trio, extra1=extra.get("domain"),
                                extra2=extra.get("aligned"))
    config = tmp_path / "config.yml"
    config.write_text(text)
    subprocess.run([sys.executable, "-m", "mergealign_fast", "run", config, tmp_path / "ours",
                    "--quiet"], check=True)
    mergekit_backend.register()
    raw = yaml.safe_load(text)
    raw["merge_method"] = "mergealign_" + raw["merge_method"]
    run_merge(MergeConfiguration.model_validate(raw), str(tmp_path / "mergekit"),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours, theirs = open_checkpoint(tmp_path / "ours"), open_checkpoint(tmp_path / "mergekit")
    assert set(ours.tensors) == set(theirs.tensors)
    for tensor, loc in ours.tensors.items():
        assert loc.entry.dtype == theirs.tensors[tensor].entry.dtype, tensor
        np.testing.assert_array_equal(read_elements(loc), read_elements(theirs.tensors[tensor]),
                                      tensor)
