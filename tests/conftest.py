import os
import subprocess
import tempfile

# No test reaches the internet: the Hub is a dead local port unless a test starts a local Hub
# server (hub_server.py), and the Hub cache a fresh folder (huggingface_hub reads both when it
# is imported, so they are set before any test imports it).
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_TOKEN", None)

import numpy as np
import pytest

from mergealign_fast.dtypes import DType, storage_numpy_dtype
from mergealign_fast.dtypes import f32_to_bf16_bits
from mergealign_fast.methods.core.oracle import decode_to_f64
from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio


def random_values(rng: np.random.Generator, count: int, dtype: DType,
                  scale: float = 1.0) -> np.ndarray:
    """Random finite values stored in `dtype` (bf16 as uint16 bits), with mixed magnitudes."""
    values = rng.standard_normal(count).astype(np.float32) * np.float32(scale)
    values *= np.exp2(rng.integers(-8, 8, count)).astype(np.float32)  # spread over 16 binades
    if dtype is DType.BF16:
        return f32_to_bf16_bits(values)
    return values.astype(storage_numpy_dtype(dtype))


def as_f64(raw: np.ndarray, dtype: DType) -> np.ndarray:
    return decode_to_f64(raw, dtype)


@pytest.fixture(scope="session")
def tiny_trio(tmp_path_factory):
    """A ~0.6M-parameter Llama trio in bf16, single-file models."""
    return ensure_synthetic_trio(tmp_path_factory.mktemp("tiny_trio"), LLAMA_TINY, seed=3)


@pytest.fixture(scope="session")
def tiny_trio_sharded(tmp_path_factory):
    """The same shape, each model split into several shards with an index."""
    return ensure_synthetic_trio(tmp_path_factory.mktemp("tiny_trio_sharded"), LLAMA_TINY,
                                 seed=3, max_shard_size=60_000)


def write_checkpoint(folder, tensors: dict, config: dict = None) -> None:
    """A single-file model folder from {name: numpy array} (uint16 arrays are bf16 bits)."""
    from mergealign_fast.dtypes import from_numpy
    from mergealign_fast.io.safetensors_format import EncodedTensor, encode_header

    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, value in tensors.items():
        other = {"int64": "I64", "int32": "I32", "bool": "BOOL", "float64": "F64"}
        dtype_name = other.get(value.dtype.name) or from_numpy(value.dtype).safetensors_name
        specs.append(EncodedTensor(name, dtype_name, value.shape, value.nbytes))
    header, _ = encode_header(specs, {"format": "pt"})
    with open(folder / "model.safetensors", "wb") as f:
        f.write(header)
        for value in tensors.values():
            f.write(np.ascontiguousarray(value).tobytes())
    if config is not None:
        import json

        (folder / "config.json").write_text(json.dumps(config))


def small_model(seed: int, vocab: int = 32, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {"embed.weight": rng.standard_normal((vocab, 8)).astype(dtype),
            "layer.weight": rng.standard_normal((8, 8)).astype(dtype),
            "norm.weight": rng.standard_normal(8).astype(dtype)}


@pytest.fixture
def optional_small_fs(tmp_path):
    """A 128 MiB tmpfs mounted for the test (root only): room for the ~52 MB output of the
    medium trio plus the 64 MiB headroom the checks ask for, and little more; None when it
    cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        yield None
        return
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_fs(optional_small_fs):
    """optional_small_fs, or the test is skipped."""
    if optional_small_fs is None:
        pytest.skip("needs root to mount a small tmpfs")
    return optional_small_fs
