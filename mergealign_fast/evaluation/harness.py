"""lm-evaluation-harness, the one place this package talks to it: task look-up, a model opened
once as the harness's `hf` or `vllm` model (for its tasks and for generation), task scores, and
batched greedy generation through the model's own chat template."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import MergeError
from ..io.adapters import adapter_base

INSTALL_HINT = "pip install 'mergealign-fast[eval]'"
# Metrics in the order a task's headline number is chosen from (the first one it reports).
PREFERRED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc")


def _harness():
    try:
        import lm_eval
    except ImportError:
        raise MergeError(f"eval and tune need lm-evaluation-harness and transformers: "
                         f"{INSTALL_HINT}") from None
    # The harness logs every task's defaults at WARNING, transformers draws a bar per model
    # load: our report says what matters.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return lm_eval


def version() -> str:
    return _harness().__version__


def task_manager(tasks: Sequence[str], include_path: Optional[Path]):
    """A TaskManager that knows every name in `tasks`, or MergeError naming the unknown ones.
    Local tasks alone skip indexing the harness's ~15,000 built-in ones (10 s here)."""
    _harness()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise MergeError(f"--include-path {include_path}: not a folder")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        where = f" nor in --include-path {include_path}" if include_path else ""
        raise MergeError(f"--tasks: {', '.join(unknown)}: not a task of lm-evaluation-harness "
                         f"{version()}{where}")
    return manager


ENGINES = ("auto", "hf", "vllm")
# vllm's share of the GPU's memory: the rest stays free for a guard model or another process.
VLLM_GPU_MEMORY = 0.8


def resolve_engine(engine: str, device: str) -> str:
    """The harness model backend: `hf` (transformers, any device) or `vllm` (GPU only; much
    faster generation); auto takes vllm on a GPU when it is installed.  MergeError when vllm is
    asked for and cannot run."""
    import importlib.util

    if engine not in ENGINES:
        raise MergeError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    installed = importlib.util.find_spec("vllm") is not None
    if engine == "vllm":
        if device != "cuda":
            raise MergeError(f"--engine vllm runs on --device cuda (vllm picks its GPU from "
                             f"CUDA_VISIBLE_DEVICES), not {device}")
        if not installed:
            raise MergeError("--engine vllm: vllm is not installed (pip install vllm, on a "
                             "machine with a GPU)")
    if engine == "auto":
        return "vllm" if installed and device == "cuda" else "hf"
    return engine


def open_model(folder: Path, device: str, batch_size: int, engine: str = "hf"):
    """The harness's model (`hf` or `vllm`, resolve_engine) for a local folder, or an adapted
    one (io/adapters.AdaptedFolder); MergeError if it does not load."""
    _harness()
    adapter, folder = (folder, adapter_base(folder)) if adapter_base(folder) else (None, folder)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MergeError(f"{folder}: not a model folder (no config.json)")
    if adapter is not None and engine == "vllm":
        raise MergeError(f"{adapter}: a LoRA adapter is evaluated with --engine hf (or merge it "
                         "into its base first)")
    try:
        if engine == "vllm":
            from lm_eval.models.vllm_causallms import VLLM

            return VLLM(pretrained=str(folder), dtype="auto", batch_size=batch_size,
                        gpu_memory_utilization=VLLM_GPU_MEMORY)
        from lm_eval.models.huggingface import HFLM

        # An adapted model (BASE+ADAPTER): the harness applies the adapter through PEFT.
        return HFLM(pretrained=str(folder), device=device, batch_size=batch_size,
                    dtype="float32" if device == "cpu" else "auto",
                    **({"peft": str(adapter)} if adapter is not None else {}))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one line for each
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeError(f"{folder}: does not load as a transformers causal LM "
                         f"({type(exc).__name__}: {first})") from None


def _headline(metrics: Dict[str, Dict[str, float]]) -> str:
    return next((m for m in PREFERRED_METRICS if m in metrics), next(iter(metrics)))


def task_scores(model, tasks: Sequence[str], manager, limit: Optional[int]):
    """({task: {"metric", "value", "stderr", "samples", "metrics": {name: {value, stderr}}}},
    [one record per scored item: the task, the document, its metrics and, for multiple choice,
    each choice's log-likelihood]) - the items let a reader see what was scored, and let
    intervals be drawn over whatever the documents group (facts, topics)."""
    lm_eval = _harness()
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager,
                                      limit=limit, log_samples=True, bootstrap_iters=1000)
    scores, items = {}, []
    for task in tasks:
        metrics = _metrics(results["results"][task])
        if not metrics:
            raise MergeError(f"task {task}: the harness reported no metric")
        headline = _headline(metrics)
        scores[task] = {"metric": headline, **metrics[headline],
                        "samples": results.get("n-samples", {}).get(task, {}).get("effective"),
                        "metrics": metrics}
        items += [_item(task, sample, list(metrics)) for sample in results["samples"][task]]
    return scores, items


def _metrics(raw: Dict[str, object]) -> Dict[str, Dict[str, Optional[float]]]:
    """{"acc,none": .5, "acc_stderr,none": .1} -> {"acc": {"value": .5, "stderr": .1}}."""
    metrics = {}
    for key, value in raw.items():
        name, comma, filter_name = key.partition(",")
        if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = raw.get(f"{name}_stderr,{filter_name}")
        metrics[name] = {"value": float(value),
                         "stderr": float(stderr) if _is_number(stderr) else None}
    return metrics


def _item(task: str, sample: dict, metric_names: Sequence[str]) -> dict:
    record = {"set": f"task:{task}", "doc_id": sample.get("doc_id"), "doc": sample.get("doc"),
              "target": sample.get("target")}
    record.update({m: sample[m] for m in metric_names if _is_number(sample.get(m))})
    responses = sample.get("filtered_resps") or []
    if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
        record["loglikelihoods"] = [float(r[0]) for r in responses]
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def chat_prompts(model, prompts: Sequence[str]) -> List[str]:
    """Each prompt as a user turn of the model's chat template (the text the model sees); the
    bare prompt for a tokenizer without one (base models)."""
    if not getattr(model.tokenizer, "chat_template", None):
        return list(prompts)
    return [model.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def generate(model, contexts: Sequence[str], max_new_tokens: int) -> List[str]:
    """Greedy continuations of `contexts`, batched by the harness."""
    from lm_eval.api.instance import Instance

    settings = {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False}
    requests = [Instance("generate_until", {}, (context, dict(settings)), index)
                for index, context in enumerate(contexts)]
    return [text.strip() for text in model.generate_until(requests, disable_tqdm=True)]


def quiet_tokenizers() -> None:
    """The tokenizers library warns about fork-after-threads; the harness forks nothing here."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
