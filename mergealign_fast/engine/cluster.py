"""Past one machine on Ray: grids of merges (sweep, tune) and one merge split by shard.

Ray (the `ray` extra) is imported here only, and only when a command is given --ray.  The driver
(the process the user started) plans and checks everything before any work, as a single-process
merge does, and keeps every output's partial folder, lock and journal.  Ray tasks write shard
files into those folders and return each one's size and CRC-32C; the driver records them as
they arrive and publishes each output exactly as a single-process merge does.  So the files are
bitwise the single-process merge's, a rerun with --resume keeps what was recorded, and `verify`
reads the same manifest.  A task whose worker or node dies is run again by Ray (TASK_RETRIES);
it rewrites its shards from the start.

Every node must see the inputs and the output folder at the same paths (a shared or parallel
file system).  check_nodes proves it before any work: a task on each node reads every input file
(the same size and modification time as here), reads a token file this process wrote beside OUT
and writes a file of its own there.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._version import __version__
from .loop import MergeResult, ShardMerger, execute, execute_many, pending_shards, write_shards
from ..errors import MergeError, PlanError
from ..kernels import cpu
from ..output import partial_dir_for
from ..plan import MergePlan, PlannedShard
from ..progress import Progress

RAY_MISSING = "--ray needs Ray, which is not installed: pip install 'mergealign-fast[ray]'"
# A task whose worker process or node died is run again this many times (Ray's own default for
# tasks); an error the task itself raises (a bad input, a full disk) is not retried.
TASK_RETRIES = 3
# A node whose check has not answered in this long is named as not answering (a node that is
# starting up answers in seconds; one whose workers cannot start never does).
PROBE_TIMEOUT_S = 120.0
# Shard groups per task slot of the cluster: more than one, so that a node that finishes early
# takes another group, and few enough that a task (milliseconds of Ray overhead) stays seconds
# of merging.
GROUPS_PER_SLOT = 2
# A Ray head answers a TCP connection at once; a wrong host is given this long.
CONNECT_TIMEOUT_S = 10.0
PROBE_PREFIX = ".mergealign-node-check-"
STAGING = ".tasks"  # in the partial folder: each task attempt writes in a folder of its own


def connect(address: Optional[str]):
    """The ray module, connected: `address` "" (plain --ray) joins the Ray instance this machine
    runs (RAY_ADDRESS, or the latest `ray start`) or starts a local one; an address joins that
    cluster.  A process that is already connected (tests) stays connected."""
    try:
        import ray
    except ImportError:
        raise MergeError(RAY_MISSING) from None
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise MergeError(f"--ray: cannot connect to {where}: {exc}") from None
    return ray


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers on is one line within CONNECT_TIMEOUT_S: Ray itself
    retries such an address without end (seen: over 10 minutes)."""
    host, _, port = address.rpartition("//")[2].rpartition(":")
    if not host or not port.isdigit():
        return  # "", "auto" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MergeError(f"--ray {address}: nothing answers there ({reason}): start the head "
                         "with `ray start --head` and give its address") from None


# ---- every node sees the same files ----------------------------------------------------------

def _probe_node(files: Dict[str, Tuple[int, int]], folders: Dict[str, str], token: str,
                version: str) -> List[str]:
    """Run on one node: what stops it from taking part, one line each ([] when nothing)."""
    problems = []
    if version != __version__:
        problems.append(f"runs mergealign-fast {__version__}, this machine {version}: install "
                        "the same version on every node")
    if cpu.unavailable_reason() is not None:
        problems.append(f"mergealign-fast's native kernel does not load there: "
                        f"{cpu.unavailable_reason()}")
    for path, (size, mtime_ns) in files.items():
        try:
            with open(path, "rb") as f:
                stat = os.fstat(f.fileno())
                f.read(1)
        except OSError as exc:
            problems.append(f"cannot read {path} ({exc.strerror})")
            continue
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
            problems.append(f"{path} there is another file than here ({stat.st_size:,} bytes, "
                            f"here {size:,}; or another modification time)")
    for folder, token_file in folders.items():
        try:
            seen = Path(token_file).read_text()
        except OSError:
            seen = None
        if seen != token:
            problems.append(f"{folder} there is not the folder of this machine (a file written "
                            "here is not seen there): inputs and output must be on storage "
                            "every node mounts at the same path")
            continue
        own = Path(folder) / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            own.write_bytes(b"")
            own.unlink()
        except OSError as exc:
            problems.append(f"cannot write in {folder} ({exc.strerror})")
    return problems


def _node_label(node: dict) -> str:
    return f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def check_nodes(ray, input_files: Sequence[Path], out_folders: Sequence[Path]) -> None:
    """PlanError naming each node that cannot read every input file, or cannot write in every
    folder of `out_folders` (created here if missing), or does not answer; before any work."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    files = {}
    for path in input_files:
        stat = os.stat(path)
        files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    token = uuid.uuid4().hex
    token_files = {}
    for folder in dict.fromkeys(Path(f) for f in out_folders):
        folder.mkdir(parents=True, exist_ok=True)
        token_files[str(folder)] = str(folder / f"{PROBE_PREFIX}{token}")
        Path(token_files[str(folder)]).write_text(token)
    probe = ray.remote(_probe_node)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote(files, token_files, token,
                                               __version__): node
            for node in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        problems = [f"{_node_label(refs[ref])}: did not answer within {PROBE_TIMEOUT_S:.0f} s"
                    for ref in late]
        for ref in ready:
            try:
                found = ray.get(ref)
            except ray.exceptions.RayError as exc:
                found = [f"the check failed: {_cause(exc)}"]
            problems += [f"{_node_label(refs[ref])}: {line}" for line in found]
    finally:
        for token_file in token_files.values():
            Path(token_file).unlink(missing_ok=True)
    if problems:
        raise PlanError(problems)


# ---- tasks, with progress and failures -------------------------------------------------------

@dataclass
class Task:
    """One unit of work for the cluster: `function(*args)` in a worker, with its resources."""
    name: str
    function: Callable
    args: Tuple
    key: Any = None          # what the caller needs to record the result
    num_cpus: float = 1
    num_gpus: float = 0


def _cause(exc: BaseException) -> str:
    """The one line a failed task comes down to: its own error, or how its worker died."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}" if not isinstance(cause, MergeError) \
            else str(cause)
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


def run_tasks(ray, tasks: Sequence[Task], record: Callable[[Task, Any], None], *,
              label: str, unit: str, show_progress: bool,
              max_in_flight: Optional[int] = None) -> None:
    """Run every task on the cluster, at most `max_in_flight` at once; record(task, result) in
    this process as each one finishes.  A task that fails (after Ray's retries of a dead
    worker) does not stop the others: at the end, MergeError names every failed task."""
    remotes: Dict[Callable, Any] = {}
    waiting = list(tasks)
    running: Dict[Any, Task] = {}
    failed: List[str] = []
    bar = Progress(len(tasks), label, enabled=show_progress, unit=unit)
    limit = max_in_flight or len(tasks)
    while waiting or running:
        submitted = bool(waiting) and len(running) < limit
        while waiting and len(running) < limit:
            task = waiting.pop(0)
            remote = remotes.setdefault(task.function, ray.remote(task.function))
            ref = remote.options(num_cpus=task.num_cpus, num_gpus=task.num_gpus,
                                 max_retries=TASK_RETRIES, retry_exceptions=False,
                                 name=task.name).remote(*task.args)
            running[ref] = task
        if submitted:
            bar.status = f"({len(running)} running, {len(failed)} failed)"
            bar.advance(0)
        (ref,), _ = ray.wait(list(running), num_returns=1)
        task = running.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            failed.append(f"{task.name}: {_cause(exc)}")
        else:
            record(task, result)
        bar.status = f"({len(running)} running, {len(failed)} failed)"
        bar.advance(1)
    bar.close()
    if failed:
        raise MergeError(f"{len(failed)} of {len(tasks)} {unit} failed: " + "; ".join(failed))


# ---- merges: the driver records, workers write -------------------------------------------------

def _staging(plan: MergePlan) -> Path:
    """Where tasks write, inside the partial folder: a task's shards reach their own names only
    when this process records them, so a worker left running by a killed command can never put
    a file where a later merge's shard is."""
    return partial_dir_for(plan.out_dir) / STAGING


def _write_shard_group(plan: MergePlan, names: Sequence[str]) -> List[Tuple[str, int, int, dict]]:
    """Run in a worker: the named shards of `plan` written into a folder of this attempt's own
    under the partial folder; each one's (file, size, CRC-32C, NaN/inf counts) for the driver."""
    wanted = set(names)
    shards = [shard for shard in plan.shards if shard.filename in wanted]
    folder = _staging(plan) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return [(str(files[0].path), shard.size, files[0].checksum.crc, files[0].nonfinite)
            for shard, files in write_shards([plan], shards, folders=[folder])]


def task_resources(device: str, threads: Optional[int]) -> Tuple[int, int]:
    """(CPUs, GPUs) a task asks Ray for: its threads (default one: Ray runs as many tasks on a
    node as it has CPUs), and one GPU where it merges or evaluates on one."""
    if device.startswith("cuda:"):
        raise MergeError(f"--device {device} with --ray: Ray gives each task its GPU; give "
                         "--device cuda")
    return threads or 1, 1 if device == "cuda" else 0


def _groups(shards: Sequence[PlannedShard], count: int) -> List[List[PlannedShard]]:
    """Contiguous runs of `shards` of about equal bytes, `count` of them at most."""
    count = max(1, min(count, len(shards)))
    target = sum(s.size for s in shards) / count
    groups: List[List[PlannedShard]] = [[]]
    done = 0
    for shard in shards:
        if groups[-1] and done >= target * len(groups) and len(groups) < count:
            groups.append([])
        groups[-1].append(shard)
        done += shard.size
    return [g for g in groups if g]


def _ray_merger(ray, groups_of: Callable[[List[PlannedShard]], List[List[PlannedShard]]],
                unit: str, resources: Tuple[int, int]) -> ShardMerger:
    """A ShardMerger (engine.py) whose shards are written by Ray tasks, `groups_of` a plan's
    pending shards to a task each; an output is published as soon as its last shard is
    recorded."""
    def merge(plans, partials, show_progress, finish) -> None:
        tasks = []
        cpus, gpus = resources
        for index, (plan, partial) in enumerate(zip(plans, partials)):
            # What attempts of an earlier, killed run left (this process holds the lock now).
            shutil.rmtree(_staging(plan), ignore_errors=True)
            pending = pending_shards([plan], [partial])
            if not pending:
                finish(partial)
                continue
            # The worker merges with this task's share of threads, not every CPU of its node.
            shared = ray.put(replace(plan, options=replace(plan.options, threads=cpus)))
            for group in groups_of(pending):
                names = [s.filename for s in group]
                tasks.append(Task(f"{plan.out_dir.name}[{names[0]}..]" if len(names) > 1
                                  else f"{plan.out_dir.name}[{names[0]}]", _write_shard_group,
                                  (shared, names), index, cpus, gpus))
        left = Counter(task.key for task in tasks)

        def record(task: Task, written) -> None:
            partial = partials[task.key]
            for staged, size, crc, nonfinite in written:
                name = Path(staged).name
                os.replace(staged, partial.inside / name)
                partial.record_written(name, size, crc, nonfinite, partial.plan.options.fsync)
            left[task.key] -= 1
            if not left[task.key]:
                shutil.rmtree(_staging(partial.plan), ignore_errors=True)
                finish(partial)

        run_tasks(ray, tasks, record, label="merging", unit=unit, show_progress=show_progress)
    return merge


def input_files(plan: MergePlan) -> List[Path]:
    """Every file a merge reads: the models' shards, and the files copied into OUT."""
    return [f for c in plan.inputs.values() for f in c.files] + list(plan.copied_files)


def _check_plans(ray, plans: Sequence[MergePlan]) -> None:
    todo = [plan for plan in plans if not plan.complete]
    check_nodes(ray, input_files(todo[0]), [plan.out_dir.parent for plan in todo])


def merge_on_ray(plan: MergePlan, address: str, show_progress: bool = False) -> MergeResult:
    """One merge, its shards written by tasks on a Ray cluster (GROUPS_PER_SLOT groups of
    contiguous shards per task slot); bitwise the single-process merge."""
    if plan.complete:
        return execute(plan)  # verified, nothing to merge
    cpus, gpus = task_resources(plan.options.device, plan.options.threads)
    ray = connect(address)
    _check_plans(ray, [plan])
    resources = ray.cluster_resources()
    slots = int(resources.get("GPU", 0) // gpus if gpus else resources.get("CPU", 1) // cpus)

    def groups_of(pending):
        return _groups(pending, GROUPS_PER_SLOT * max(slots, 1))

    return execute(plan, show_progress,
                   merge_shards=_ray_merger(ray, groups_of, "shard groups", (cpus, gpus)))


def sweep_on_ray(plans: Sequence[MergePlan], address: str, show_progress: bool = False
                 ) -> List[MergeResult]:
    """A sweep with each λ one task on a Ray cluster (it reads the inputs once per λ, where
    the single-process sweep reads them once in all: the cluster trades bytes for nodes)."""
    if all(plan.complete for plan in plans):
        return execute_many(plans)  # each verified, nothing to merge
    resources = task_resources(plans[0].options.device, plans[0].options.threads)
    ray = connect(address)
    _check_plans(ray, plans)
    return execute_many(plans, show_progress, merge_shards=_ray_merger(
        ray, lambda pending: [pending], "cells", resources))
