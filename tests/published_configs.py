"""mergekit configs in the shapes model cards publish (written here, not copied): 3-5 models,
with and without base_model, gradients and filters, booleans in several spellings, keys
mergekit ignores.  Each is run through `run` and through mergekit 0.1.5's run_merge, and the two
outputs compared tensor by tensor: the share of elements that are bitwise equal, within one
step of the output dtype, and beyond, with the largest difference in steps.

Used by tests/test_published_configs.py (bounds per method) and benches/published_configs.py
(the measured table in docs/mergekit.md)."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergealign_fast.dtypes import DType
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements

SET = ("base", "domain", "aligned", "expert 3", "expert 4")

CONFIGS = {
    "ties, booleans as numbers": """
merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {aligned}
    parameters: {{density: 0.5, weight: 0.3}}
  - model: {expert_3}
    parameters: {{density: [0.3, 0.7], weight: 0.2}}
parameters: {{normalize: 1.0, int8_mask: 1.0}}
dtype: {dtype}
""",
    "breadcrumbs_ties, a name and a top-level int8_mask": """
name: my-breadcrumbs
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.8, gamma: 0.02}}
  - model: {aligned}
    parameters: {{weight: 0.4, density: 0.8, gamma: 0.02}}
parameters: {{normalize: "true"}}
int8_mask: true
dtype: {dtype}
""",
    "slerp by filters and gradients": """
slices: null
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {aligned}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: {dtype}
""",
    "task_arithmetic of four, lambda, normalize as text": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.4}}
  - model: {aligned}
    parameters: {{weight: 0.3}}
  - model: {expert_3}
    parameters: {{weight: [0.1, 0.3]}}
  - model: {expert_4}
    parameters: {{weight: 0.2}}
parameters: {{lambda: 0.9, normalize: "false"}}
dtype: {dtype}
""",
    "linear without base, normalize: yes": """
merge_method: linear
models:
  - model: {domain}
    parameters: {{weight: 1.0}}
  - model: {aligned}
    parameters: {{weight: 0.5}}
  - model: {expert_3}
    parameters: {{weight: 0.5}}
parameters: {{normalize: yes}}
dtype: {dtype}
""",
    "model_stock of four": """
merge_method: model_stock
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {expert_3}
  - model: {expert_4}
dtype: {dtype}
""",
    "multislerp of five, no base, eps": """
merge_method: multislerp
models:
  - model: {base}
    parameters: {{weight: 0.1}}
  - model: {domain}
    parameters: {{weight: 0.3}}
  - model: {aligned}
    parameters: {{weight: 0.2}}
  - model: {expert_3}
    parameters: {{weight: 0.25}}
  - model: {expert_4}
    parameters: {{weight: 0.15}}
parameters: {{eps: 1.0e-8, normalize_weights: 1}}
dtype: {dtype}
""",
    "nuslerp of two, no base": """
merge_method: nuslerp
models:
  - model: {domain}
    parameters: {{weight: 0.6}}
  - model: {expert_4}
    parameters: {{weight: 0.4}}
dtype: {dtype}
""",
    "karcher of three": """
merge_method: karcher
models:
  - model: {domain}
  - model: {aligned}
  - model: {expert_3}
parameters: {{max_iter: 20, tol: 1.0e-7}}
dtype: {dtype}
""",
    "sce of four, select_topk": """
merge_method: sce
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {expert_3}
  - model: {expert_4}
parameters: {{select_topk: 0.5}}
dtype: {dtype}
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {aligned}
parameters: {{t: 0.001}}
dtype: {dtype}
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {domain}
dtype: {dtype}
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
dtype: {dtype}
""",
}


# More shapes, run with --compute-dtype mergekit only (test_published_configs.py: bit for bit).
MERGEKIT_ARITHMETIC_CONFIGS = {
    "breadcrumbs, rescale and lambda": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.7, density: 0.6, gamma: 0.05}}
  - model: {aligned}
    parameters: {{weight: 0.5, density: [0.4, 0.9], gamma: 0.01}}
  - model: {expert_3}
    parameters: {{weight: 0.3, density: 0.5}}
parameters: {{rescale: true, lambda: 1.2}}
dtype: {dtype}
""",
    "ties of two, out_dtype float32": """
merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{density: 0.3, weight: 0.6}}
  - model: {aligned}
    parameters: {{density: 0.6, weight: 0.4}}
dtype: {dtype}
out_dtype: float32
""",
    "task_arithmetic of one model": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.8}}
dtype: {dtype}
""",
    "ram of four": """
merge_method: ram
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {expert_3}
  - model: {expert_4}
parameters: {{epsilon: 1.0e-3}}
dtype: {dtype}
""",
    "nuslerp with a base, row-wise": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.3}}
  - model: {aligned}
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: {dtype}
""",
    "multislerp with a base, three": """
merge_method: multislerp
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.3}}
  - model: {expert_3}
    parameters: {{weight: 0.2}}
dtype: {dtype}
""",
    "model_stock filter_wise": """
merge_method: model_stock
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
parameters: {{filter_wise: true}}
dtype: {dtype}
""",
    "linear with base_model listed last": """
merge_method: linear
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.2}}
  - model: {aligned}
    parameters: {{weight: 0.5}}
  - model: {base}
    parameters: {{weight: 0.3}}
dtype: {dtype}
""",
    "karcher with base_model": """
merge_method: karcher
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
dtype: {dtype}
""",
    "slerp, t by layer": """
merge_method: slerp
base_model: {base}
models:
  - model: {domain}
parameters:
  t: [0.1, 0.9]
dtype: {dtype}
""",
    "slices with their own t": """
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {domain}
        layer_range: [0, 2]
    parameters: {{t: 0.3}}
  - sources:
      - model: {base}
        layer_range: [1, 2]
      - model: {domain}
        layer_range: [1, 2]
    parameters: {{t: [0.6, 0.2]}}
dtype: {dtype}
""",
    "linear of two, no base": """
merge_method: linear
models:
  - model: {expert_3}
    parameters: {{weight: 0.35}}
  - model: {aligned}
    parameters: {{weight: 0.65}}
dtype: {dtype}
""",
    "karcher of two": """
merge_method: karcher
models:
  - model: {aligned}
  - model: {expert_4}
dtype: {dtype}
""",
    "multislerp of two, no base": """
merge_method: multislerp
models:
  - model: {expert_3}
    parameters: {{weight: 0.7}}
  - model: {domain}
    parameters: {{weight: 0.3}}
dtype: {dtype}
""",
    "sce of three, top half": """
merge_method: sce
base_model: {base}
models:
  - model: {domain}
  - model: {aligned}
  - model: {expert_3}
parameters: {{select_topk: 0.3}}
dtype: {dtype}
""",
}

@dataclass
class Agreement:
    """How one output agrees with mergekit's, over every element of every tensor: bitwise,
    within one step of the output dtype at the element's magnitude, and the largest
    difference in steps at the tensor's largest magnitude (its ulp: what a difference means
    beside the tensor's values)."""

    elements: int = 0
    bitwise: int = 0
    one_step: int = 0  # differ by at most one step at their own magnitude
    most_steps: float = 0.0  # the largest difference, in steps at the tensor's largest value
    dtypes: tuple = ()  # (ours, theirs) where the tensors' dtypes differ

    @property
    def beyond(self) -> float:
        """The share of elements more than one step apart."""
        return 1.0 - (self.bitwise + self.one_step) / self.elements

    @property
    def shares(self) -> str:
        return (f"{self.bitwise / self.elements:.2%} bitwise, {self.one_step / self.elements:.2%}"
                f" one step, {self.beyond:.2%} beyond; at most {self.most_steps:.1f} steps of "
                "the tensor's largest value")


def write_config(folder: Path, models: dict, name: str, dtype: str) -> Path:
    path = folder / "config.yml"
    text = CONFIGS.get(name) or MERGEKIT_ARITHMETIC_CONFIGS[name]
    path.write_text(text.format(dtype=dtype, **{r.replace(" ", "_"): models[r]
                                                        for r in models}))
    return path


def run_ours(config: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergealign_fast", "run", str(config),
                           str(out), "--quiet", *flags], capture_output=True, text=True)


def run_mergekit(config: Path, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


def _as_float(raw: np.ndarray, dtype: str) -> np.ndarray:
    from mergealign_fast.dtypes import bf16_bits_to_f32

    values = bf16_bits_to_f32(raw) if dtype == "BF16" else raw
    return values.astype(np.float64).ravel()


def agreement(ours: Path, theirs: Path) -> Agreement:
    """Every tensor of `ours` against the same tensor of `theirs`, in steps of ours' dtype."""
    from mergealign_fast.methods.core.oracle import spacing

    mine, other = open_checkpoint(ours), open_checkpoint(theirs)
    assert set(mine.tensors) == set(other.tensors), "the outputs hold different tensors"
    found = Agreement()
    for name, loc in mine.tensors.items():
        their = other.tensors[name]
        if loc.entry.dtype != their.entry.dtype:
            found.dtypes = (loc.entry.dtype, their.entry.dtype)
        dtype = DType[loc.entry.dtype]
        a, b = _as_float(read_elements(loc), loc.entry.dtype), \
            _as_float(read_elements(their), their.entry.dtype)
        difference = np.abs(a - b)
        found.elements += a.size
        found.bitwise += int(np.sum(a == b))
        found.one_step += int(np.sum((a != b) & (difference <= spacing(
            np.maximum(np.abs(a), np.abs(b)), dtype))))
        largest = spacing(np.asarray([np.abs(b).max(initial=0.0)]), dtype)[0]
        found.most_steps = max(found.most_steps,
                               float(difference.max(initial=0.0) / largest) if largest else 0.0)
    return found


def tensors_differing_in_bytes(ours: Path, theirs: Path) -> list:
    """The tensors whose stored bytes (dtype and shape included) differ between the outputs."""
    mine, other = open_checkpoint(ours), open_checkpoint(theirs)
    assert set(mine.tensors) == set(other.tensors), "the outputs hold different tensors"
    return [name for name, loc in sorted(mine.tensors.items())
            if (loc.entry.dtype, loc.entry.shape) != (other.tensors[name].entry.dtype,
                                                      other.tensors[name].entry.shape)
            or read_elements(loc).tobytes() != read_elements(other.tensors[name]).tobytes()]
