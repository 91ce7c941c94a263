"""Deterministic Llama-shaped base/domain/aligned trios, written streaming (never held in RAM).

Used by `mergealign-fast demo`, the tests and the benchmarks.  The values are pseudo-random but
reproducible: base weights are uniform with Llama-like scale, and the two fine-tuned models are the
base plus small independent deltas, as real fine-tunes are.  Files are real Hugging Face folders
(config.json, safetensors, an index when sharded) that transformers loads.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import DType, f32_to_bf16_bits
from ..errors import MergeError
from ..io.checkpoint import CONFIG_FILE, INDEX_FILE, group_by_size, index_json, shard_file_name
from ..io.safetensors_format import EncodedTensor, encode_header

ROLE_SEEDS = {"base": 0, "domain": 1, "aligned": 2}


def _role_seed(role: str) -> int:
    """The trio's seeds; any other fine-tune (the experts of a model set) its name's CRC."""
    return ROLE_SEEDS[role] if role in ROLE_SEEDS else zlib.crc32(role.encode())

# Elements generated per step: 4 Mi float32 = 16 MiB of scratch, whatever the tensor size.
CHUNK_ELEMENTS = 1 << 22
BASE_SCALE = 0.02  # typical std of Llama linear weights
DELTA_SCALE = 0.002  # fine-tuning moves weights by about a tenth of their size


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, shape) in the order transformers writes a LlamaForCausalLM."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors())

    def config(self, dtype: DType) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": dtype.torch_name,
        }


# A 1.1B-parameter Llama (TinyLlama's shape): 3 x 2.2 GB in bf16, the benchmark trio.
LLAMA_1B = LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
# Llama-3.2-3B's shape (untied output layer): ~3.6B parameters, ~7.2 GB per model in bf16, so a
# trio and its output (~29 GB) outgrow a 24 GiB machine's page cache: the cold benchmarks.
LLAMA_3B = LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8,
                      vocab=128256)
# ~156M parameters, ~311 MB per model in bf16: the demo trio.
LLAMA_DEMO = LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4,
                        vocab=32000)
# A few hundred thousand parameters: for tests.
LLAMA_TINY = LlamaShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=384)


def _chunk_values(seed: int, role: str, tensor_index: int, chunk: int, n: int,
                  is_norm: bool) -> np.ndarray:
    """float32 values of one chunk; the same for every call with the same arguments."""
    base_rng = np.random.default_rng([seed, tensor_index, chunk])
    values = base_rng.random(n, dtype=np.float32)
    values = (values - np.float32(0.5)) * np.float32(2 * BASE_SCALE)
    if is_norm:
        values += np.float32(1.0)  # RMSNorm gains sit around 1
    if role != "base":
        delta_rng = np.random.default_rng([seed, tensor_index, chunk, _role_seed(role)])
        delta = delta_rng.random(n, dtype=np.float32) - np.float32(0.5)
        values += delta * np.float32(2 * DELTA_SCALE)
    return values


def _encode(values: np.ndarray, dtype: DType) -> bytes:
    if dtype is DType.BF16:
        return f32_to_bf16_bits(values).tobytes()
    return values.astype(np.float16 if dtype is DType.F16 else np.float32).tobytes()


def _tensor_bytes(seed: int, role: str, index: int, name: str, count: int,
                  dtype: DType) -> Iterator[bytes]:
    for chunk, start in enumerate(range(0, count, CHUNK_ELEMENTS)):
        n = min(CHUNK_ELEMENTS, count - start)
        yield _encode(_chunk_values(seed, role, index, chunk, n, name.endswith("norm.weight")),
                      dtype)


def write_synthetic_model(folder: os.PathLike, shape: LlamaShape, role: str, *, seed: int = 0,
                          dtype: DType = DType.BF16,
                          max_shard_size: Optional[int] = None) -> Path:
    """Write one model of the trio as a Hugging Face folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = [(i, name, shp) for i, (name, shp) in enumerate(shape.tensors())]

    def nbytes(spec) -> int:
        return int(np.prod(spec[2])) * dtype.itemsize

    groups = group_by_size(specs, nbytes, max_shard_size or 1 << 62)
    weight_map = {}
    for g, group in enumerate(groups):
        filename = shard_file_name(g, len(groups))
        header, _ = encode_header([EncodedTensor(n, dtype.safetensors_name, s, nbytes((i, n, s)))
                                   for i, n, s in group], {"format": "pt"})
        with open(folder / filename, "wb") as f:
            f.write(header)
            for i, name, shp in group:
                weight_map[name] = filename
                for piece in _tensor_bytes(seed, role, i, name, int(np.prod(shp)), dtype):
                    f.write(piece)
    if len(groups) > 1:
        (folder / INDEX_FILE).write_bytes(index_json(weight_map, sum(map(nbytes, specs))))
    (folder / CONFIG_FILE).write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    if role == "aligned":  # an instruct model ships its chat generation defaults
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": [2], "do_sample": False}, indent=2) + "\n")
    return folder


def ensure_synthetic_trio(root: os.PathLike, shape: LlamaShape, *, seed: int = 0,
                          dtype: DType = DType.BF16, max_shard_size: Optional[int] = None,
                          roles: Sequence[str] = tuple(ROLE_SEEDS)) -> dict:
    """{role: folder} under root, built once; a marker file records a finished build, so a build
    interrupted halfway is redone rather than used.  `roles` beyond the trio's are more
    fine-tunes of the same base (a model set), each with its own marker: asking for them
    later adds them beside the trio."""
    root = Path(root)
    folder = {role: root / role.replace(" ", "-") for role in [*ROLE_SEEDS, *roles]}
    groups = [(root / "COMPLETE", list(ROLE_SEEDS))]  # the trio is always built whole
    groups += [(root / f"COMPLETE-{folder[r].name}", [r]) for r in roles if r not in ROLE_SEEDS]
    for marker, group in groups:
        if marker.exists():
            continue
        # Built in a folder of its own and renamed into place: a folder already at a model's
        # name that no finished build made is the user's, and is refused, never written into.
        for role in group:
            if folder[role].exists() and not (folder[role].is_dir()
                                              and not any(folder[role].iterdir())):
                _refuse_occupied(folder[role])
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=".synthetic-build-", dir=root))
        try:
            for role in group:
                write_synthetic_model(building / folder[role].name, shape, role, seed=seed,
                                      dtype=dtype, max_shard_size=max_shard_size)
            for role in group:
                _move_built(building / folder[role].name, folder[role])
            marker.write_text(f"{shape} seed={seed} dtype={dtype.short_name}\n")
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return {role: folder[role] for role in roles}


def _move_built(built: Path, target: Path) -> None:
    """A freshly built model renamed to its place; an empty folder there is replaced, anything
    else refused."""
    try:
        os.rename(built, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        _refuse_occupied(target)


def _refuse_occupied(target: Path) -> None:
    raise MergeError(f"{target} exists and was not made by a finished build of this synthetic "
                     "model: move it away or choose another folder")
