"""Hostile model folders for fuzzing: generated from a stream of choices, then checked.

`build_folder(choose, folder)` writes a model folder (a safetensors file, sometimes sharded with an
index) that is valid or broken in one of the ways real files break: truncated, a header length
past the end or absurdly large, invalid UTF-8 or JSON, unknown dtypes, shapes that disagree with
byte sizes, offsets out of range, overlapping or with holes, duplicate names, a huge header, an
index naming missing shards or tensors in the wrong shard, JSON (header, index, config) nested
deeper than Python's recursion limit, a name with a lone surrogate; or a PyTorch .bin (torch.save's zip or
legacy format) truncated or with a flipped byte.  `check_folder` then runs what a user
would run and enforces the rule: a clear one-line error, or a merge that verifies.

`choose(kind, *args)` is the only source of randomness: hypothesis's `draw` in the test suite,
atheris's FuzzedDataProvider in benches/fuzz_headers.py.
"""

import json
import math
import struct
from pathlib import Path

from mergealign_fast import MergeError, merge_checkpoints
from mergealign_fast.dtypes import SAFETENSORS_ITEMSIZE
from mergealign_fast.output.manifest import verify_output

DTYPES = ["BF16", "F16", "F32", "I64", "F8_E4M3", "BOGUS"]
CORRUPTIONS = ["none", "truncate", "length_past_end", "huge_length", "flip_byte", "bad_utf8",
               "duplicate_name", "trailing_bytes", "short_file", "deep_nesting",
               "lone_surrogate"]
# JSON nested deeper than Python's recursion limit (1,000) reads as a RecursionError.
DEEP = 20_000


def _tensors(choose):
    count = choose("int", 0, 4)
    tensors, offset = {}, 0
    for i in range(count):
        dtype = DTYPES[choose("int", 0, len(DTYPES) - 1)] if choose("bool") else "BF16"
        shape = [choose("int", 0, 5) for _ in range(choose("int", 0, 3))]
        size = math.prod(shape) * SAFETENSORS_ITEMSIZE.get(dtype, 2)
        begin = offset + (choose("int", -3, 3) if choose("int", 0, 9) == 0 else 0)
        end = begin + size + (choose("int", -3, 3) if choose("int", 0, 9) == 0 else 0)
        tensors[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        offset = max(offset, end)
    return tensors, offset


def _encode(tensors, data_size, corruption, choose) -> bytes:
    text = json.dumps({"__metadata__": {"format": "pt"}, **tensors}).encode()
    if corruption == "duplicate_name" and tensors:
        first = next(iter(tensors))
        text = text[:-1] + b"," + json.dumps({first: tensors[first]}).encode()[1:]
    if corruption == "bad_utf8":
        text = text[:2] + b"\xff\xfe" + text[2:]
    if corruption == "deep_nesting":
        text = b'{"__metadata__": ' + b"[" * DEEP + b"]" * DEEP + b", " + text[1:]
    if corruption == "lone_surrogate" and tensors:
        text = text.replace(b'"t0"', b'"t0\\udc80"', 1)
    if corruption == "flip_byte" and text:
        i = choose("int", 0, len(text) - 1)
        text = text[:i] + bytes([text[i] ^ (1 << choose("int", 0, 7))]) + text[i + 1:]
    length = len(text)
    if corruption == "length_past_end":
        length += choose("int", 1, 1 << 20)
    if corruption == "huge_length":
        length = choose("int", 1 << 27, 1 << 62)
    data = bytes(choose("int", 0, 255) for _ in range(min(data_size, 64))) + \
        b"\x3c" * max(0, data_size - 64)
    blob = struct.pack("<Q", length) + text + data
    if corruption == "trailing_bytes":
        blob += b"\0" * choose("int", 1, 16)
    if corruption == "truncate":
        blob = blob[:choose("int", 0, max(0, len(blob) - 1))]
    if corruption == "short_file":
        blob = blob[:choose("int", 0, 7)]
    return blob


# torch's dtypes for the .bin folders (torch is a test dependency).
BIN_DTYPES = ["bfloat16", "float16", "float32", "int64"]


def build_bin_folder(choose, folder: Path) -> None:
    """pytorch_model.bin of a few small tensors, maybe truncated or with one flipped byte."""
    import io

    import torch

    state = {}
    for i in range(choose("int", 0, 4)):
        shape = [choose("int", 0, 5) for _ in range(choose("int", 0, 3))]
        dtype = getattr(torch, BIN_DTYPES[choose("int", 0, len(BIN_DTYPES) - 1)])
        state[f"t{i}"] = (torch.arange(math.prod(shape)) % 7).reshape(shape).to(dtype)
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=choose("bool"))
    blob = buffer.getvalue()
    # Positions as a fraction of the length: the legacy format's storage keys are memory
    # addresses, so its length varies run to run, and the choices must not.
    corruption, where, bit = choose("int", 0, 2), choose("int", 0, 999), choose("int", 0, 7)
    i = where * (len(blob) - 1) // 999
    if corruption == 1:
        blob = blob[:i]
    elif corruption == 2:
        blob = blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1:]
    (folder / "pytorch_model.bin").write_bytes(blob)


def build_folder(choose, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if choose("int", 0, 4) == 0:
        build_bin_folder(choose, folder)
        return
    tensors, data_size = _tensors(choose)
    corruption = CORRUPTIONS[choose("int", 0, len(CORRUPTIONS) - 1)]
    blob = _encode(tensors, data_size, corruption, choose)
    sharded = choose("int", 0, 3) == 0
    name = "model-00001-of-00001.safetensors" if sharded else "model.safetensors"
    (folder / name).write_bytes(blob)
    if sharded:
        weight_map = {t: name for t in tensors}
        if choose("bool"):
            weight_map["ghost"] = name if choose("bool") else "model-00002-of-00002.safetensors"
        index = json.dumps({"metadata": {}, "weight_map": weight_map})
        if choose("int", 0, 5) == 0:  # an index nested too deeply to read
            index = '{"metadata": ' + "[" * DEEP + "]" * DEEP + index[len('{"metadata": {}'):]
        (folder / "model.safetensors.index.json").write_text(index)
    if choose("int", 0, 7) == 0:  # a config nested too deeply to read
        (folder / "config.json").write_text('{"a": ' + "[" * DEEP + "]" * DEEP + "}")


def check_folder(folder: Path, out: Path) -> str:
    """Merge the folder with itself; 'error' or 'merged', else an AssertionError explains."""
    try:
        merge_checkpoints(folder, folder, folder, out, fsync=False, force=True)
    except MergeError as exc:
        for line in str(exc).splitlines():
            assert line.strip(), "empty error line"
            assert str(folder) in line or "output" in line or "disk" in line, \
                f"error line does not name the folder: {line!r}"
        return "error"
    problems = verify_output(out)
    assert problems == [], problems
    return "merged"
