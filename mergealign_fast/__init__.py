"""mergealign-fast: fused, streaming, bounded-memory merges of LLM checkpoints.

    theta = base + domain_weight * (domain - base) + align_weight * (aligned - base)

`merge_tensors` merges in-memory arrays/tensors; `merge_checkpoints` merges Hugging Face model
folders (its settings: `MergeOptions`); `merge_models` merges any number of models into a base
(task arithmetic, linear, TIES, DARE, as mergekit configs do) and `merge_set_tensors` one
tensor of them in memory; `sweep_checkpoints` writes one model per λ in one pass;
`run_config` runs a mergekit YAML config (mergekit's run_merge); `Method` picks another merge
method (the registry: mergealign_fast.methods).  Importing
this package loads neither numpy, torch nor any GPU runtime.

The names below are loaded on first use: the command line (entry.py) starts with nothing
imported, so even a Ctrl-C or SIGTERM in its first moments ends with a message, not a traceback.
"""

from importlib import import_module

from ._version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "DType": "dtypes", "MergeError": "errors", "PlanError": "errors",
    "MergeOptions": "plan", "MergeResult": "engine.loop", "merge_checkpoints": "api",
    "merge_models": "api", "run_config": "api", "sweep_checkpoints": "api",
    "Method": "methods.core.parameters", "Rule": "methods.core.parameters",
    "merge_tensors": "engine.in_memory",  # pulls in numpy; the merge command does not need it
    "merge_set_tensors": "engine.in_memory",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergealign_fast' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = ["DType", "MergeError", "MergeOptions", "MergeResult", "Method", "PlanError", "Rule",
           "merge_checkpoints", "merge_models", "merge_set_tensors", "merge_tensors",
           "run_config", "sweep_checkpoints", "__version__"]
