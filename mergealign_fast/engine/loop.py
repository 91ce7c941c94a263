"""The merge loop: a checked plan streamed through a writer into its output folder.

For each output shard, each tensor's recipe is computed first (the reduction passes its method
needs, methods.py), then the tensor's chunks (stream.py) go to the writer (writers/), which
merges them into the shard file(s) of the partial output (output.py).  When every shard is
complete and the inputs are unchanged, the output is published as OUT.  Peak memory is a few
windows regardless of model or shard size.  A sweep runs several plans that share one layout in
the same loop: each chunk is read once and merged once per plan.
"""

from __future__ import annotations

import errno
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import MergeError, PlanError
from ..io.checkpoint import TensorLocation
from ..kernels import cpu
from ..kernels.cpu import default_threads
from ..output.manifest import nonfinite_counts, read_manifest, verify_output
from ..methods import (NUMPY_METHODS, SetPasses, TensorPasses, numpy_method, set_method, set_recipe,
                       tensor_recipe)
from ..output import (PartialOutput, ShardFile, copy_tensor, create_shard_file, partial_dir_for,
                      publish, settle_leftover_partial)
from ..plan import (SET_ROLE, MergeOptions, MergePlan, PlannedShard, PlannedTensor, plan_merge,
                    plan_set)
from ..progress import Progress
from ..io.stream import (Chunk, InputChanged, InputMaps, check_inputs_unchanged, input_identities,
                         pass_chunks, read_ahead_settings, tensor_chunks)
from .writers import Writer, make_writer
from .writers.f64 import write_f64_tensor

# Input bytes (all three models) of a tensor whose pages stay mapped between a merge method's
# passes over it (see tensor_recipes).
PASS_RESIDENT_BYTES = 128 << 20


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    seconds: float
    input_bytes: int
    output_bytes: int
    tensors: int
    shards: int
    # --resume found OUT complete from the same merge and verified it; nothing was computed.
    already_complete: bool = False
    # Per tensor, values of the merged model that are NaN or ±inf (from NaN/inf in the inputs,
    # or results beyond the output dtype's range): said, never silent.
    nonfinite: Dict[str, int] = field(default_factory=dict)
    # An interrupted merge of other inputs or options, left beside a complete OUT.
    kept_partial: Optional[Path] = None

    @property
    def gb_per_s(self) -> float:
        """Bytes moved (inputs read + output written) per second, in GB/s."""
        return (self.input_bytes + self.output_bytes) / max(self.seconds, 1e-9) / 1e9


def _keep() -> None:
    """Release callback that keeps a window's pages mapped."""


def tensor_recipes(plans: Sequence[MergePlan], tensor: PlannedTensor, maps: InputMaps,
                   threads: int) -> list:
    """Each plan's native Recipe (SetRecipe for a model set) for `tensor`, after the reduction
    passes its method needs (none for task arithmetic; shared between the plans of a sweep)."""
    native = cpu.native()
    # A method's passes read a tensor several times: a small tensor's pages stay mapped until
    # the merge pass releases them (re-faulting them cost ~1 s of 6 on a 1.1B TIES merge); a
    # large one is released window by window, keeping memory bounded.
    keep_mapped = sum(loc.entry.nbytes for loc in tensor.sources) <= PASS_RESIDENT_BYTES

    def windows(sources):
        for chunk in pass_chunks(sources, maps, plans[0].options.input_cast, tensor.rows):
            yield chunk.operands(), _keep if keep_mapped else chunk.release_inputs

    def pair_windows(i, j):
        base, models = tensor.sources[0], tensor.sources[1:]
        return windows((base, models[i], models[j]))

    try:
        if plans[0].is_set:
            passes = SetPasses(native, pair_windows, len(tensor.sources) - 1, threads)
            return [set_recipe(native, plan.settings[tensor.name], tensor.name, tensor.count,
                               passes) for plan in plans]
        passes = TensorPasses(native, lambda: windows(tensor.sources), threads)
        return [tensor_recipe(native, plan.settings[tensor.name], tensor.name, tensor.count,
                              passes) for plan in plans]
    except OSError as exc:
        if exc.errno == errno.EFAULT:
            raise InputChanged(f"an input of tensor {tensor.name} changed while it was being "
                               "read") from None
        raise


def _write_tensor(targets: Sequence[ShardFile], tensor: PlannedTensor, file_offset: int,
                  plans: Sequence[MergePlan], maps: InputMaps, writer: Writer,
                  progress: Progress) -> None:
    """One tensor into every target: merged chunk by chunk by the writer's kernel, or (a tensor
    the kernels cannot merge) copied, or merged in float64."""
    if not tensor.on_native_kernel:
        writer.drain()  # checksums are built in file order
        if tensor.is_copied:
            copy_tensor(targets, tensor.sources[0], file_offset)
        else:
            write_f64_tensor(targets, tensor, [p.settings[tensor.name] for p in plans],
                             file_offset)
        progress.advance(tensor.out_nbytes * len(targets))
        return
    if plans[0].settings[tensor.name].by_vectors(tensor.shape):
        _write_per_vector(targets, tensor, file_offset, plans, maps, writer, progress)
        return
    if plans[0].settings[tensor.name].name in NUMPY_METHODS:
        _write_numpy_method(targets, tensor, file_offset, plans, maps, writer, progress)
        return
    threads = plans[0].options.threads or default_threads()
    recipes = tensor_recipes(plans, tensor, maps, threads)
    chunks = tensor_chunks(tensor.sources, maps, writer.chunk_elements(tensor),
                           file_offset=file_offset, out_itemsize=tensor.out_itemsize,
                           input_cast=plans[0].options.input_cast, rows=tensor.rows)
    for chunk in chunks:
        writer.write(targets, tensor, chunk, recipes)
        progress.advance(chunk.count * tensor.out_itemsize * len(targets))


class _NumpyWindows:
    """The windows of a tensor merged in numpy (per_vector.py, NUMPY_METHODS): a fresh stream of
    them for each pass, placed in the output for the merge pass; an input changed under the
    reading is said with the tensor's name."""

    def __init__(self, tensor: PlannedTensor, file_offset: int, plans: Sequence[MergePlan],
                 maps: InputMaps, elements: int):
        self.tensor, self.file_offset, self.maps, self.elements = tensor, file_offset, maps, \
            elements
        self.input_cast = plans[0].options.input_cast

    def __call__(self, placed: bool = False) -> Iterator[Chunk]:
        t = self.tensor
        where = dict(file_offset=self.file_offset, out_itemsize=t.out_itemsize) if placed \
            else {}
        return tensor_chunks(t.sources, self.maps, self.elements, input_cast=self.input_cast,
                             rows=t.rows, **where)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None and issubclass(kind, InputChanged):
            raise InputChanged(f"an input of tensor {self.tensor.name} changed while it was "
                               "being read") from None
        return False


def _write_per_vector(targets: Sequence[ShardFile], tensor: PlannedTensor, file_offset: int,
                      plans: Sequence[MergePlan], maps: InputMaps, writer: Writer,
                      progress: Progress) -> None:
    """A tensor merged vector by vector (per_vector.py): a pass for each vector's statistics
    (the same for every plan of a sweep: one method), then window by window each plan's scaled
    inputs, summed by the writer's kernel into that plan's target."""
    from ..methods.windows import per_vector  # numpy: not loaded by merges that do not need it

    settings = [plan.settings[tensor.name] for plan in plans]
    elements = per_vector.window_elements(tensor.shape, settings[0].vectors)
    with _NumpyWindows(tensor, file_offset, plans, maps, elements) as windows:
        sums = per_vector.vector_sums(settings[0], tensor.shape, windows())
        coefficients = [per_vector.vector_coefficients(s, sums) for s in settings]
        recipe = per_vector.merge_recipe(cpu.native())
        for chunk in windows(placed=True):
            for target, s, found in zip(targets, settings, coefficients):
                scaled = per_vector.scaled_chunk(s, tensor.shape, found, chunk)
                writer.write([target], tensor, scaled, [recipe])
            progress.advance(chunk.count * tensor.out_itemsize * len(targets))


def _write_numpy_method(targets: Sequence[ShardFile], tensor: PlannedTensor, file_offset: int,
                        plans: Sequence[MergePlan], maps: InputMaps, writer: Writer,
                        progress: Progress) -> None:
    """A tensor merged window by window in numpy (methods.NUMPY_METHODS: sce.py, della.py,
    ram.py, fusion.py): the method's passes, then the merged windows, rounded and written by
    the writer's kernel.  The plans of a sweep that resolve to the same settings share them."""
    from ..methods.windows import per_vector  # numpy: not loaded by merges that do not need it

    alike: Dict[object, List[ShardFile]] = {}
    for target, plan in zip(targets, plans):
        alike.setdefault(plan.settings[tensor.name], []).append(target)
    recipe = per_vector.merge_recipe(cpu.native())
    for settings, group in alike.items():
        method = numpy_method(settings.name)
        elements = method.window_elements(tensor.shape)
        with _NumpyWindows(tensor, file_offset, plans, maps, elements) as windows:
            for chunk in method.merge_chunks(settings, tensor, windows):
                writer.write(group, tensor, chunk, [recipe] * len(group))
                progress.advance(chunk.count * tensor.out_itemsize * len(group))


def _write_shard(folders: Sequence[Path], shard: PlannedShard, plans: Sequence[MergePlan],
                 maps: InputMaps, writer: Writer, progress: Progress) -> List[ShardFile]:
    """Write one shard completely into each partial folder (one per plan); returns its file in
    each, closed, with its CRC-32C and NaN/inf counts."""
    options = plans[0].options
    paths = [folder / shard.filename for folder in folders]
    targets: List[ShardFile] = []
    try:
        for path in paths:
            targets.append(create_shard_file(path, shard.header, shard.size))
        for tensor, offset in zip(shard.tensors, shard.data_offsets):
            _write_tensor(targets, tensor, len(shard.header) + offset, plans, maps, writer,
                          progress)
        writer.drain()
        if options.fsync:
            for target in targets:
                os.fsync(target.fd)
        return targets
    except BaseException:
        for path in paths:  # an unfinished shard only takes space; --resume redoes it
            path.unlink(missing_ok=True)
        raise
    finally:
        for target in targets:
            os.close(target.fd)


def _read_sources(tensor: PlannedTensor) -> Sequence[TensorLocation]:
    """The inputs the merge reads for `tensor`: a copied tensor's first source only."""
    return tensor.sources[:1] if tensor.is_copied else tensor.sources


def write_shards(plans: Sequence[MergePlan], shards: Sequence[PlannedShard],
                 progress: Optional[Progress] = None, writer: Optional[Writer] = None,
                 folders: Optional[Sequence[Path]] = None
                 ) -> Iterator[Tuple[PlannedShard, List[ShardFile]]]:
    """Write `shards` of plans that share one layout into each plan's partial folder (or
    `folders`), reading each chunk once; yields each shard with its file in every folder as it
    completes.  The caller records them (PartialOutput.record_shard): this runs in the merging
    process or, for a merge split across a cluster, in a worker (cluster.py)."""
    folders = folders or [partial_dir_for(plan.out_dir) for plan in plans]
    progress = progress or Progress(0, "", enabled=False)
    read_ahead = read_ahead_settings()
    with ExitStack() as stack:
        maps = stack.enter_context(InputMaps(plans[0].inputs.values()))
        maps.check_unchanged()
        if read_ahead is not None:
            # (A vocabulary tensor gathered by token is read row by row, not in file order.)
            maps.read_ahead([_read_sources(t) for shard in shards for t in shard.tensors
                             if t.rows is None], read_ahead)
        writer = writer or make_writer(plans[0])
        stack.callback(writer.close)
        for shard in shards:
            yield shard, _write_shard(folders, shard, plans, maps, writer, progress)


def execute(plan: MergePlan, show_progress: bool = False,
            writer: Optional[Writer] = None,
            merge_shards: Optional[ShardMerger] = None) -> MergeResult:
    """Run a checked plan in OUT's hidden partial folder, then rename it to OUT.

    `writer` (default: from the plan's options, writers.make_writer) computes and writes each
    chunk.  On failure or interrupt the partial folder stays, with every completed shard
    recorded in its journal: the same merge with resume=True finishes it."""
    return execute_many([plan], show_progress, writer, merge_shards)[0]


def _same_layout(plans: Sequence[MergePlan]) -> None:
    first = plans[0]
    for plan in plans[1:]:
        if [s.header for s in plan.shards] != [s.header for s in first.shards]:
            raise MergeError("a sweep's outputs must share one layout (same inputs, dtype and "
                             "shard size)")


def pending_shards(plans: Sequence[MergePlan], partials: Sequence[PartialOutput]
                   ) -> List[PlannedShard]:
    """The shards not already complete in every partial folder (all of them on a fresh start)."""
    return [shard for shard in plans[0].shards
            if not all(p.shard_is_complete(shard.filename, shard.size) for p in partials)]


# Writes every pending shard of plans into their partial folders and records it; calls
# finish(partial) for an output whose shards are all recorded, or leaves that to its caller.
ShardMerger = Callable[[Sequence[MergePlan], Sequence[PartialOutput], bool,
                        Callable[[PartialOutput], None]], None]


def merge_here(writer: Optional[Writer] = None) -> ShardMerger:
    """The shard merger of this process: one pass over the inputs for all plans."""
    def merge(plans, partials, show_progress, finish) -> None:
        first = plans[0]
        progress = Progress(first.tensor_bytes * len(plans), "merging", enabled=show_progress)
        pending = pending_shards(plans, partials)
        pending_names = {shard.filename for shard in pending}
        progress.advance(sum(t.out_nbytes for shard in first.shards
                             if shard.filename not in pending_names
                             for t in shard.tensors) * len(plans))
        for shard, written in write_shards(plans, pending, progress, writer):
            for partial, shard_file in zip(partials, written):
                partial.record_shard(shard_file, shard.size, first.options.fsync)
        progress.close()
    return merge


def execute_many(plans: Sequence[MergePlan], show_progress: bool = False,
                 writer: Optional[Writer] = None,
                 merge_shards: Optional[ShardMerger] = None) -> List[MergeResult]:
    """Run plans that differ only in their weights and output folders in one pass over the
    inputs: each chunk is read once and merged once per plan (a λ sweep).  One plan is a plain
    merge.  Each output keeps every guarantee of a single merge (its own partial folder, lock,
    journal, manifest and atomic rename).  A plan whose OUT --resume found complete is verified
    instead of merged again.  `merge_shards` (default: merge_here(writer)) is who writes the
    shards: this process, or a cluster's workers (cluster.py)."""
    todo = [plan for plan in plans if not plan.complete]
    merged = iter(_execute(todo, show_progress, merge_shards or merge_here(writer))
                  if todo else [])
    return [_verified_complete(plan) if plan.complete else next(merged) for plan in plans]


def _verified_complete(plan: MergePlan) -> MergeResult:
    started = time.perf_counter()
    problems = verify_output(plan.out_dir)
    if problems:
        raise MergeError(f"{plan.out_dir} holds this merge but fails verification "
                         f"({problems[0]}): rerun with --force to merge it again")
    shards = read_manifest(plan.out_dir).get("shards", {})
    return MergeResult(plan.out_dir, time.perf_counter() - started, 0, plan.output_bytes,
                       plan.tensor_count, len(plan.shards), already_complete=True,
                       nonfinite=nonfinite_counts(shards),
                       kept_partial=settle_leftover_partial(plan))


def _execute(plans: Sequence[MergePlan], show_progress: bool,
             merge_shards: ShardMerger) -> List[MergeResult]:
    started = time.perf_counter()
    _same_layout(plans)
    read_ahead_settings()  # a setting it cannot use is refused before anything is created
    partials: List[PartialOutput] = []
    identities = input_identities(plans[0].inputs.values())

    def finish(partial: PartialOutput) -> None:
        check_inputs_unchanged(identities)
        publish(partial)

    try:
        for plan in plans:
            partials.append(PartialOutput(plan).open(resume=plan.options.resume,
                                                     force=plan.options.force))
        merge_shards(plans, partials, show_progress, finish)
        for partial in partials:
            if not partial.published:
                finish(partial)
    except InputChanged as exc:
        for partial in partials:
            partial.discard_if_empty()
        check_inputs_unchanged(identities)  # names the file that changed, when it can
        raise MergeError(f"{exc}; {plans[0].out_dir} was not created") from exc
    except BaseException as exc:
        kept = [p.folder for p in partials if not p.discard_if_empty()]
        if not isinstance(exc, (MergeError, OSError)):
            raise  # KeyboardInterrupt and bugs: the CLI says what was kept
        hint = (f"completed shards are kept in {', '.join(map(str, kept))}: fix the cause and "
                "rerun with --resume to finish" if kept
                else f"nothing was kept; {plans[0].out_dir} is unchanged")
        finished = [str(p.out_dir) for p in partials if p.published]
        if finished:  # a sweep on a cluster publishes each output as soon as it is done
            hint = f"{', '.join(finished)} finished; {hint}"
        raise MergeError(f"{exc}; {hint}") from exc
    finally:
        for partial in partials:
            partial.close()
    seconds = time.perf_counter() - started
    return [MergeResult(p.out_dir, seconds, p.input_bytes, p.output_bytes, p.tensor_count,
                        len(p.shards), nonfinite=nonfinite_counts(partial.shards))
            for p, partial in zip(plans, partials)]


PathLike = Union[str, os.PathLike]


def merge_checkpoints(base: PathLike, domain: PathLike, aligned: PathLike, out: PathLike, *,
                      options: Optional[MergeOptions] = None, progress: bool = False,
                      ray_address: Optional[str] = None, **changes) -> MergeResult:
    """Merge three Hugging Face model folders into `out` (see the README for the formula).

    The merge's settings are a MergeOptions (plan.py lists each with its default); give one as
    `options`, or change any of its fields by keyword: domain_weight=0.7, method=Method("ties"),
    device="cuda", resume=True, ...  Everything is checked first (PlanError lists every
    problem); then the merge streams through the native kernel in bounded memory and `out`
    appears only when complete.  progress=True shows a progress bar on stderr.  ray_address
    ("" for this machine's Ray instance) splits the merge by shard across a Ray cluster
    (cluster.py): the same files.
    """
    options = replace(options or MergeOptions(), **changes)
    return execute_on(plan_merge(base, domain, aligned, out, options), ray_address, progress)


ModelEntry = Union[PathLike, Tuple[PathLike, Dict[str, object]]]


def merge_models(base: ModelEntry, models: Sequence[ModelEntry], out: PathLike, *,
                 method: str = "task_arithmetic", parameters: Optional[Dict[str, object]] = None,
                 options: Optional[MergeOptions] = None, progress: bool = False,
                 ray_address: Optional[str] = None, **changes) -> MergeResult:
    """Merge any number of model folders into `base`, as a mergekit config does: `method` is
    one of methods.SET_METHODS (task_arithmetic, linear, ties, dare_linear, dare_ties,
    breadcrumbs, breadcrumbs_ties, multislerp, model_stock, karcher, sce).

    Each of `models` is a folder or (folder, {"weight": 0.4, "density": 0.5}); a value may be
    a list, a gradient over the layers.  `parameters` are the shared ones (lambda, normalize,
    rescale, seed; a weight or density there applies to every model); linear weighs the base
    too: give it as (folder, {"weight": w}).  One pass reads each input once, in bounded memory,
    bitwise the same on any thread count.  `options`, **changes, progress and ray_address as
    for merge_checkpoints (the trio's weights there are not used; the tokenizer is the base's
    unless tokenizer_from names "model N" or "none"; vocabulary="union" or "model N" merges
    the vocabulary tensors by token)."""
    entries = [_model_entry(e) for e in [base, *models]]
    per_model = {SET_ROLE.format(i): params for i, (_, params) in enumerate(entries) if i}
    per_model["base"] = entries[0][1]
    try:
        chosen = set_method(method, parameters, per_model)
    except ValueError as exc:
        raise PlanError([str(exc)]) from None
    if options is None:  # the tokenizer and config of the base, as in mergekit
        changes.setdefault("tokenizer_from", "base")
    options = replace(options or MergeOptions(), method=chosen, **changes)
    plan = plan_set(entries[0][0], [folder for folder, _ in entries[1:]], out, options)
    return execute_on(plan, ray_address, progress)


def _model_entry(entry: ModelEntry) -> Tuple[PathLike, Dict[str, object]]:
    if isinstance(entry, tuple):
        folder, parameters = entry
        return folder, dict(parameters or {})
    return entry, {}


def execute_on(plan: MergePlan, ray_address: Optional[str],
               show_progress: bool = False) -> MergeResult:
    """A checked plan run in this process (ray_address None), or split by shard across a Ray
    cluster (cluster.py; "" for this machine's Ray instance)."""
    if ray_address is not None:
        from .cluster import merge_on_ray

        return merge_on_ray(plan, ray_address, show_progress=show_progress)
    return execute(plan, show_progress=show_progress)
