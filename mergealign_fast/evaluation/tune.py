"""`mergealign-fast tune`: which λ keeps the domain and the safety.

The one-pass sweep makes the merges, in batches that fit the disk (planned before anything is
written); each merge and the three parents are evaluated with one Evaluator; a merge is deleted
once evaluated unless --keep.  Every finished cell is a file under OUT/cells, so a rerun after an
interruption skips it; OUT/tune.json pins the settings a rerun must match.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import MergeError, PlanError
from ..engine.loop import execute
from ..sources import model_folder
from ..plan import MergeOptions, MergePlan, plan_merge
from ..progress import Progress
from ..units import human_bytes
from ..plan.sweep import lambda_folder, plan_sweep
from ..api import sweep_checkpoints
from .evaluate import EvalSettings, Evaluator, write_json_atomic
from .report import write_reports
from ..io import json_text

PARENTS = ("base", "domain", "aligned")
# Free space the batches leave untouched: the evaluation's own files and the rest of the system.
DISK_MARGIN = 0.05


@dataclass(frozen=True)
class Cell:
    name: str                 # "base", "domain", "aligned" or "lambda-<λ>"
    lam: Optional[float]      # None for a parent


def _cells(lambdas: Sequence[float]) -> List[Cell]:
    return ([Cell(p, None) for p in PARENTS]
            + [Cell(lambda_folder(Path(), lam).name, lam) for lam in lambdas])


def _settings_record(evaluator: Evaluator, inputs: Dict[str, Path], options: MergeOptions
                     ) -> dict:
    s = evaluator.settings
    return {"inputs": {role: str(Path(p).resolve()) for role, p in inputs.items()},
            "method": repr(options.method), "out_dtype": repr(options.out_dtype),
            "tasks": list(s.tasks), "include_path": str(s.include_path or ""),
            "harmful": evaluator.harmful, "benign": evaluator.benign, "judge": s.judge,
            "refusal_phrases": list(evaluator.refusal.phrases), "limit": s.limit,
            "max_new_tokens": s.max_new_tokens}


def _pin_settings(out_dir: Path, record: dict) -> None:
    """The first run writes tune.json; a rerun must match it (finished cells are reused)."""
    pinned = out_dir / "tune.json"
    if pinned.exists():
        if json_text.loads(pinned.read_text()) != record:
            raise MergeError(f"{out_dir} holds a tune with other inputs or settings "
                             f"({pinned}): give another -o folder, or delete it to start over")
        return
    write_json_atomic(pinned, record)


def _batch_size(first_plan, out_dir: Path, count: int) -> int:
    """How many merges fit on the disk at once (the sweep writes a batch in one pass)."""
    free = shutil.disk_usage(out_dir).free * (1 - DISK_MARGIN)
    per_merge = max(first_plan.output_bytes, 1)
    fits = int(free // per_merge)
    if fits < 1:
        raise PlanError([f"{out_dir}: {human_bytes(free)} free, one merge needs "
                         f"{human_bytes(per_merge)}"])
    return min(fits, count)


def tune(base: Path, domain: Path, aligned: Path, out_dir: Path, lambdas: Sequence[float],
         evaluator: Evaluator, options: Optional[MergeOptions] = None, keep: bool = False,
         progress: bool = True, log: Callable[[str], None] = print,
         ray_address: Optional[str] = None) -> dict:
    """Evaluate the parents and the merge at every λ; write the reports; the results.  With
    `ray_address` ("" for this machine's Ray instance) each cell is a task on a Ray cluster."""
    out_dir = Path(out_dir)
    # The parents are evaluated too: from their folders (a Hub model's snapshot in the cache,
    # downloaded by the sweep's merge).
    inputs = {"base": model_folder(base), "domain": model_folder(domain),
              "aligned": model_folder(aligned)}
    options = replace(options or MergeOptions(), resume=True, force=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges_dir = out_dir / "merges"
    cells = _cells(lambdas)
    # The whole plan before any evaluation: a shape mismatch is found now, not after the parents.
    first = plan_merge(base, domain, aligned, lambda_folder(merges_dir, lambdas[0]), options)
    _pin_settings(out_dir, _settings_record(evaluator, inputs, options))
    done = {c.name for c in cells if (out_dir / "cells" / f"{c.name}.json").exists()}
    if done:
        log(f"resuming {out_dir}: {len(done)} of {len(cells)} cells already evaluated")
    pending = [c for c in cells if c.name not in done]
    merges = [c for c in pending if c.lam is not None]
    # Disk for the merges is planned before the parents are evaluated (minutes on a real model).
    size = _batch_size(first, out_dir, len(merges)) if merges else 1
    if ray_address is not None:
        _tune_on_ray(ray_address, first, pending, inputs, out_dir, evaluator, keep, size,
                     progress)
    else:
        _tune_here(pending, len(cells), inputs, out_dir, evaluator, options, keep, size,
                   progress)
    if merges_dir.is_dir() and not any(merges_dir.iterdir()):
        merges_dir.rmdir()
    results = [json_text.loads((out_dir / "cells" / f"{c.name}.json").read_text()) for c in cells]
    return write_reports(out_dir, results)


def _record_cell(out_dir: Path, cell: Cell, result: dict) -> None:
    """A finished cell, as a file: a rerun skips it."""
    result.update(cell=cell.name, lam=cell.lam)
    write_json_atomic(out_dir / "cells" / f"{cell.name}.json", result)


def _answers_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "answers" / f"{cell.name}.jsonl"


def _tune_here(pending: List[Cell], total: int, inputs: Dict[str, Path], out_dir: Path,
               evaluator: Evaluator, options: MergeOptions, keep: bool, size: int,
               progress: bool) -> None:
    """The parents, then the merges in one-pass sweeps of `size` λ each, in this process."""
    bar = Progress(total, "tune", enabled=progress, unit="cells")
    bar.advance(total - len(pending))

    def finish(cell: Cell, folder: Path) -> None:
        _record_cell(out_dir, cell, evaluator.evaluate(folder, _answers_path(out_dir, cell)))
        bar.advance(1)

    for cell in pending:
        if cell.lam is None:
            finish(cell, inputs[cell.name])
    merges = [c for c in pending if c.lam is not None]
    merges_dir = out_dir / "merges"
    for start in range(0, len(merges), size):
        batch = merges[start:start + size]
        sweep_checkpoints(inputs["base"], inputs["domain"], inputs["aligned"], merges_dir,
                          [c.lam for c in batch], options=options, progress=False)
        for cell in batch:
            folder = lambda_folder(merges_dir, cell.lam)
            finish(cell, folder)
            if not keep:
                shutil.rmtree(folder)
    bar.close()


def _ray_cell(settings: EvalSettings, folder: Path, answers: Path, plan: Optional[MergePlan],
              keep: bool) -> dict:
    """Run in a Ray worker: one cell, merged (when it is a merge) and evaluated on this node.
    A retry after a dead worker starts the merge over (force): the journal of the attempt
    before may come from a node that sees the inputs under another device number."""
    if plan is not None:
        execute(replace(plan, options=replace(plan.options, resume=False, force=True)))
    result = Evaluator(settings).evaluate(folder, answers)
    if plan is not None and not keep:
        shutil.rmtree(folder)
    return result


def _evaluation_files(settings: EvalSettings) -> List[Path]:
    """The files every node's evaluations read besides the models: prompts, phrases, local
    tasks and their data, a guard model."""
    files = [p for p in (settings.harmful, settings.benign, settings.refusal_phrases) if p]
    guard = Path(settings.judge) if settings.judge != "refusal" else None
    for folder in (settings.include_path, guard):
        if folder is not None and folder.is_dir():
            files += sorted(p for p in folder.rglob("*") if p.is_file())
    return files


def _tune_on_ray(address: str, first: MergePlan, pending: List[Cell], inputs: Dict[str, Path],
                 out_dir: Path, evaluator: Evaluator, keep: bool, size: int,
                 progress: bool) -> None:
    """Each cell a Ray task that merges on the node that evaluates it (a GPU task where the
    evaluation is on a GPU); at most `size` cells at once, so the merges fit the disk."""
    from ..engine.cluster import Task, check_nodes, connect, input_files, run_tasks, task_resources

    cpus, gpus = task_resources(evaluator.settings.device, first.options.threads)
    ray = connect(address)
    check_nodes(ray, input_files(first) + _evaluation_files(evaluator.settings),
                [first.out_dir.parent, out_dir])
    tasks = []
    for cell in pending:
        if cell.lam is None:
            folder, plan = inputs[cell.name], None
        else:
            folder = lambda_folder(first.out_dir.parent, cell.lam)
            plan = plan_sweep(inputs["base"], inputs["domain"], inputs["aligned"],
                              first.out_dir.parent, [cell.lam],
                              replace(first.options, threads=cpus))[0]
        tasks.append(Task(cell.name, _ray_cell, (evaluator.settings, folder,
                                                 _answers_path(out_dir, cell), plan, keep),
                          cell, cpus, gpus))
    try:
        run_tasks(ray, tasks, lambda task, result: _record_cell(out_dir, task.key, result),
                  label="tune", unit="cells", show_progress=progress, max_in_flight=size)
    except MergeError as exc:
        raise MergeError(f"{exc}; the finished cells are kept in {out_dir / 'cells'}: fix the "
                         "cause and rerun the same command to finish") from None
