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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import MergeError
from ..io.checkpoint import TensorLocation
from ..kernels import cpu
from ..kernels.cpu import default_threads
from ..output.manifest import nonfinite_counts, read_manifest, verify_output
from ..methods.core.passes import SetPasses, TensorPasses
from ..methods.core.recipes import set_recipe, tensor_recipe
from ..output import (PartialOutput, ShardFile, copy_tensor, create_shard_file, partial_dir_for,
                      publish, settle_leftover_partial)
from ..plan import MergePlan, PlannedShard, PlannedTensor
from ..progress import Progress
from ..sources import download_inputs
from ..io.stream import (Chunk, InputChanged, InputMaps, check_inputs_unchanged, input_identities,
                         pass_chunks, read_ahead_settings, tensor_chunks)
from .routes import (BY_VECTORS, COPY, IN_MERGEKIT, IN_WINDOWS, RECIPE, planned_route,
                     window_elements)
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
    route = planned_route(tensor, plans[0].settings.get(tensor.name), plans[0].options)
    if route not in (BY_VECTORS, IN_WINDOWS, RECIPE):
        writer.drain()  # checksums are built in file order
        if route == COPY:
            copy_tensor(targets, tensor.sources[0], file_offset)
        elif route == IN_MERGEKIT:
            from .writers.mergekit_arithmetic import write_mergekit_tensor  # torch

            write_mergekit_tensor(targets, tensor, plans, maps, file_offset)
        else:
            write_f64_tensor(targets, tensor, [p.settings[tensor.name] for p in plans],
                             file_offset)
        progress.advance(tensor.out_nbytes * len(targets))
        return
    if route == BY_VECTORS:
        _write_per_vector(targets, tensor, file_offset, plans, maps, writer, progress)
        return
    if route == IN_WINDOWS:
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
    """The windows of a tensor merged in numpy (engine/routes.py: vectors, windows): a fresh stream of
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
    elements = window_elements(settings[0], tensor.shape)
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
    """A tensor merged window by window in numpy (its method's merge_windows: SCE, DELLA,
    RAM, Arcee Fusion): the method's passes, then the merged windows, rounded and written by
    the writer's kernel.  The plans of a sweep that resolve to the same settings share them."""
    from ..methods.windows import per_vector  # numpy: not loaded by merges that do not need it

    alike: Dict[object, List[ShardFile]] = {}
    for target, plan in zip(targets, plans):
        alike.setdefault(plan.settings[tensor.name], []).append(target)
    recipe = per_vector.merge_recipe(cpu.native())
    for settings, group in alike.items():
        elements = window_elements(settings, tensor.shape)
        with _NumpyWindows(tensor, file_offset, plans, maps, elements) as windows:
            for chunk in settings.spec.merge_windows(settings, tensor, windows):
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
        for shard, written in write_shards(plans, pending, progress, writer,
                                           [partial.inside for partial in partials]):
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
    download_inputs(plans[0].files_read(), show_progress)  # Hub models: what the plan reads
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
