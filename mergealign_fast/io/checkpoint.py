"""Hugging Face model folders: one model.safetensors, or shards listed by an index; or the same
as PyTorch .bin files (torch_bin.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

from ..errors import MergeError
from . import readers
from .safetensors_format import FormatError, TensorEntry, read_header
from .torch_bin import WEIGHTS_FILE, WEIGHTS_INDEX, read_bin
from . import json_text

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Files that travel with the weights: tokenizer, generation defaults and chat template.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
)
CONFIG_FILE = "config.json"
# What marks a folder as a PEFT (LoRA) adapter rather than a model.
ADAPTER_CONFIG = "adapter_config.json"

T = TypeVar("T")

# The layer of a tensor named like transformers names them ("model.layers.12.mlp...",
# "transformer.h" models have no layer index here: they are outside every layer gradient).
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def layer_index(tensor_name: str) -> Optional[int]:
    """12 for "model.layers.12.mlp.up_proj.weight"; None for a tensor outside the layers."""
    match = _LAYER_INDEX.search(tensor_name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TensorLocation:
    file: Path
    entry: TensorEntry
    # What a LoRA adapter adds to the stored tensor (adapters.LowRankDelta), None: as stored.
    delta: Optional[object] = None

    @property
    def files(self) -> List[Path]:
        """The files its values are read from."""
        return [self.file] + (self.delta.files if self.delta is not None else [])

    @property
    def streamed_dtype(self) -> str:
        """The dtype its windows reach the kernels in (an adapted tensor's: its delta's)."""
        if self.delta is None:
            return self.entry.dtype
        return self.delta.held or "F32"


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of one model folder, with the file it lives in."""

    folder: Path
    files: List[Path]
    tensors: Dict[str, TensorLocation]


def first_roles(folders: Dict[str, Path]) -> Dict[tuple, str]:
    """{(resolved folder, its adapter's base): the first role naming it}: a folder given in
    two roles (a base that stands in for an absent base_model, the trio's aligned role
    repeating the base) is one model, where models are counted; one adapter on two bases is
    two."""
    found: Dict[tuple, str] = {}
    for role, folder in folders.items():
        base = getattr(folder, "base", None)  # an adapters.AdaptedFolder's
        found.setdefault((Path(folder).resolve(), base and Path(base).resolve()), role)
    return found


def shard_file_name(index: int, total: int) -> str:
    """transformers' names: model.safetensors alone, else model-00001-of-00003.safetensors."""
    if total == 1:
        return SINGLE_FILE
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def group_by_size(items: Sequence[T], size_of: Callable[[T], int], max_bytes: int) -> List[List[T]]:
    """Consecutive items, at most max_bytes per group; a bigger item gets a group of its own.
    Always at least one group, so an empty model still gets one (empty) file."""
    groups: List[List[T]] = [[]]
    used = 0
    for item in items:
        if groups[-1] and used + size_of(item) > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += size_of(item)
    return groups


def index_json(weight_map: Dict[str, str], total_size: int) -> bytes:
    """The bytes of a model.safetensors.index.json in the layout transformers writes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2).encode() + b"\n"


def read_elements(location: TensorLocation, start: int = 0, count: Optional[int] = None):
    """Elements [start, start+count) of a tensor as a numpy array of its storage dtype (bf16 as
    uint16 bits).  A plain read, for checks and tests; the merge itself maps the files."""
    import numpy as np

    from ..dtypes import stored_numpy_dtype

    dtype = stored_numpy_dtype(location.entry.dtype)
    count = location.entry.count - start if count is None else count
    with open(location.file, "rb") as f:
        f.seek(location.entry.begin + start * dtype.itemsize)
        raw = f.read(count * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype).copy()


# Bytes compared per read when checking that tensors are identical: bounded memory.
COMPARE_WINDOW = 16 << 20


def same_bytes(locations: Sequence[TensorLocation]) -> bool:
    """Whether the tensors at `locations` hold the same bytes (read in windows, not mapped: a
    file truncated meanwhile gives a short read, not a crash; a file still on the Hub is read
    by range requests)."""
    sizes = {loc.entry.nbytes for loc in locations}
    if len(sizes) != 1:
        return False
    size = sizes.pop()
    files = [readers.open_reader(loc.file) for loc in locations]
    try:
        for start in range(0, size, COMPARE_WINDOW):
            length = min(COMPARE_WINDOW, size - start)
            chunks = [f.read_at(loc.entry.begin + start, length)
                      for f, loc in zip(files, locations)]
            if any(len(c) != length or c != chunks[0] for c in chunks):
                return False
        return True
    finally:
        for f in files:
            f.close()


def index_weight_map(folder: Path, index_file: str = INDEX_FILE) -> Dict[str, str]:
    """An index file's {tensor: shard}; FormatError naming the index when it is not one."""
    path = folder / index_file
    try:
        index = json_text.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read the shard index: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise FormatError(f"{path}: 'weight_map' must map tensor names to shard file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise FormatError(f"{path}: shard name {shard!r} must be a plain file name")
    return weight_map


def _bin_locations(path: Path) -> Dict[str, TensorLocation]:
    return {n: TensorLocation(path, e) for n, e in read_bin(path).items()}


def _safetensors_locations(path: Path) -> Dict[str, TensorLocation]:
    return {n: TensorLocation(path, e) for n, e in read_header(path).tensors.items()}


def _locate_sharded(folder: Path, index_file: str,
                    locations_of: Callable[[Path], Dict[str, TensorLocation]]
                    ) -> Dict[str, TensorLocation]:
    weight_map = index_weight_map(folder, index_file)
    in_shard: Dict[str, Dict[str, TensorLocation]] = {}
    for shard in sorted(set(weight_map.values())):
        if not readers.is_file(folder / shard):
            raise FormatError(f"{folder / index_file}: lists shard {shard} which does not exist")
        in_shard[shard] = locations_of(folder / shard)
    tensors = {}
    for name, shard in weight_map.items():
        location = in_shard[shard].get(name)
        if location is None:
            raise FormatError(f"{folder / index_file}: tensor {name!r} is listed in {shard} "
                              f"but that file does not contain it")
        tensors[name] = location
    return tensors


# Where a folder's weights are, in the order transformers looks for them: (the file or index,
# whether it is an index, how one file's tensors are located).
WEIGHT_LAYOUTS = (
    (SINGLE_FILE, False, _safetensors_locations),
    (INDEX_FILE, True, _safetensors_locations),
    (WEIGHTS_FILE, False, _bin_locations),
    (WEIGHTS_INDEX, True, _bin_locations),
)


# A PEFT adapter's weights (adapters.py), in the order PEFT looks for them.
ADAPTER_LAYOUTS = (
    ("adapter_model.safetensors", False, _safetensors_locations),
    ("adapter_model.bin", False, _bin_locations),
)


def weight_layout(has: Callable[[str], bool]):
    """The first of WEIGHT_LAYOUTS whose file a folder (or a Hub repo's listing) `has`, None
    when it has none."""
    return next((layout for layout in WEIGHT_LAYOUTS if has(layout[0])), None)


def open_checkpoint(folder) -> Checkpoint:
    """Read every header of a model folder; MergeError with the folder and problem otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: not a directory")
    # transformers loads model.safetensors when a folder has it, even beside an index or .bin
    # files: so do we, or the merge would combine other weights than the ones the user runs.
    layout = weight_layout(lambda name: readers.is_file(folder / name))
    if layout is None:
        if readers.is_file(folder / ADAPTER_CONFIG):
            raise MergeError(f"{folder}: a PEFT adapter ({ADAPTER_CONFIG}), not a full model: "
                             f"give it with its base model as BASE+{folder}")
        raise MergeError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE}, {WEIGHTS_FILE} or "
                         f"{WEIGHTS_INDEX}")
    file, is_index, locations_of = layout
    if is_index:
        tensors = _locate_sharded(folder, file, locations_of)
        files = sorted({folder / shard for shard in index_weight_map(folder, file).values()})
    else:
        tensors = locations_of(folder / file)
        files = [folder / file]  # listed even when it holds no tensor
    return Checkpoint(folder, files, tensors)
