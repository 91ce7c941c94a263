"""`mergealign-fast eval`: one model folder's domain scores and safety, in one results file.

An Evaluator checks everything it can before any model is loaded (task names, prompt files,
the judge), then evaluates any number of folders with the same settings (`tune` reuses it).
Results are written atomically: a results file that exists is complete.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import MergeError
from . import harness
from .judges import RefusalJudge, open_judge, read_phrases
from .prompts import read_prompts
from .stats import difference, wilson

DEFAULT_MAX_NEW_TOKENS = 64  # refusals show in the first sentence; longer costs time only
DEFAULT_BATCH_SIZE = 16


@dataclass
class EvalSettings:
    tasks: Sequence[str] = ()
    include_path: Optional[Path] = None
    harmful: Optional[Path] = None
    benign: Optional[Path] = None
    judge: str = "refusal"
    refusal_phrases: Optional[Path] = None
    limit: Optional[int] = None
    device: str = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    engine: str = "auto"  # the harness model for the evaluated models (harness.resolve_engine)

    def problems(self) -> List[str]:
        found = []
        if not self.tasks and self.harmful is None and self.benign is None:
            found.append("nothing to evaluate: give --tasks, --safety or --benign")
        if self.limit is not None and self.limit < 1:
            found.append(f"--limit must be at least 1 (got {self.limit})")
        if self.batch_size < 1:
            found.append(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.max_new_tokens < 1:
            found.append(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            found.append(f"--device {self.device!r}: choose cpu, cuda, cuda:N or mps")
        return found


def write_text_atomic(path: Path, text: str) -> None:
    """Write, flush, rename: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


class Evaluator:
    def __init__(self, settings: EvalSettings):
        problems = settings.problems()
        if problems:
            raise MergeError("\n".join(problems))
        self.settings = settings
        self.harmful = read_prompts(settings.harmful, "--safety") if settings.harmful else []
        self.benign = read_prompts(settings.benign, "--benign") if settings.benign else []
        phrases = read_phrases(settings.refusal_phrases) if settings.refusal_phrases else []
        self.refusal = RefusalJudge(phrases)
        harness.quiet_tokenizers()
        # The evaluated models may run on vllm; a guard model judges through transformers
        # (two vllm engines in one process would each claim most of the GPU).
        self.engine = harness.resolve_engine(settings.engine, settings.device)
        self.manager = (harness.task_manager(settings.tasks, settings.include_path)
                        if settings.tasks else None)
        self.judge = (self.refusal if settings.judge == "refusal" or not self.harmful else
                      open_judge(settings.judge, settings.device, settings.batch_size, phrases))

    def evaluate(self, folder: Path, answers_path: Optional[Path] = None) -> dict:
        """The results of one model; to `answers_path` (JSONL), every scored task item and
        every prompt with its answer and verdict."""
        started = time.perf_counter()
        model = harness.open_model(folder, self.settings.device, self.settings.batch_size,
                                   self.engine)
        result: dict = {"model": str(folder), "settings": self._settings_record(model)}
        records = []
        if self.settings.tasks:
            result["tasks"], records = harness.task_scores(model, self.settings.tasks,
                                                           self.manager, self.settings.limit)
            result["domain_score"] = domain_score(result["tasks"])
        if self.harmful or self.benign:
            answers, result["safety"] = self._safety(model)
            records += answers
        if answers_path is not None:
            _write_jsonl_atomic(answers_path, records)
            result["answers"] = str(answers_path)
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result

    def _settings_record(self, model) -> dict:
        s = self.settings
        return {"tasks": list(s.tasks), "limit": s.limit, "judge": self.judge.name,
                "chat_template": bool(getattr(model.tokenizer, "chat_template", None)),
                "device": s.device, "engine": self.engine, "harness": harness.version()}

    def _prompt_sets(self) -> Dict[str, List[str]]:
        limit = self.settings.limit
        return {name: prompts[:limit] if limit else prompts
                for name, prompts in (("harmful", self.harmful), ("benign", self.benign))
                if prompts}

    def _safety(self, model):
        sets = self._prompt_sets()
        records, summary = [], {"judge": self.judge.name,
                                "max_new_tokens": self.settings.max_new_tokens}
        refused = {}
        for name, prompts in sets.items():
            contexts = harness.chat_prompts(model, prompts)
            answers = harness.generate(model, contexts, self.settings.max_new_tokens)
            refusals = [self.refusal.refused(a) for a in answers]
            safe = (self.judge.safe(prompts, answers) if name == "harmful" else
                    [not r for r in refusals])
            refused[name] = wilson(sum(refusals), len(refusals))
            for prompt, answer, was_refused, was_safe in zip(prompts, answers, refusals, safe):
                records.append({"set": name, "prompt": prompt, "answer": answer,
                                "refused": was_refused,
                                "verdict": _verdict(name, was_safe)})
            if name == "harmful":
                summary["safe_rate"] = wilson(sum(safe), len(safe)).as_dict()
        if "harmful" in refused:
            summary["refusal_rate"] = refused["harmful"].as_dict()
        if "benign" in refused:
            summary["over_refusal"] = refused["benign"].as_dict()
        if len(refused) == 2:
            separation = difference(refused["harmful"], refused["benign"])
            summary["separation"] = separation.as_dict()
            summary["auc"] = separation.as_auc().as_dict()
        return records, summary


def _verdict(set_name: str, safe: bool) -> str:
    if set_name == "harmful":
        return "safe" if safe else "unsafe"
    return "answered" if safe else "over-refused"


def domain_score(tasks: Dict[str, dict]) -> dict:
    """The mean of the tasks' headline metrics, with the standard error of that mean (tasks
    independent): the number `tune` trades against safety."""
    values = [t["value"] for t in tasks.values()]
    errors = [t["stderr"] for t in tasks.values()]
    mean = sum(values) / len(values)
    stderr = (math.sqrt(sum(e * e for e in errors)) / len(errors)
              if all(e is not None for e in errors) else None)
    return {"value": mean, "stderr": stderr}


def _write_jsonl_atomic(path: Path, records: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def answers_path_for(results_path: Path) -> Path:
    """results.json -> results.answers.jsonl, beside it."""
    results_path = Path(results_path)
    return results_path.with_name(results_path.stem + ".answers.jsonl")
