"""Header parsing: byte-exact agreement with the safetensors package, and hostile files."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mergealign_fast.io.safetensors_format import (EncodedTensor, FormatError, encode_header,
                                                   read_header)


def write_raw(path, header_obj, data: bytes, length_override=None) -> None:
    text = header_obj if isinstance(header_obj, bytes) else json.dumps(header_obj).encode()
    length = len(text) if length_override is None else length_override
    path.write_bytes(struct.pack("<Q", length) + text + data)


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.ones(5, dtype=np.float16), "empty": np.zeros((0, 4), dtype=np.float32)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    raw = (tmp_path / "x.safetensors").read_bytes()
    for name, value in tensors.items():
        entry = header.tensors[name]
        assert entry.shape == value.shape
        assert raw[entry.begin:entry.end] == value.tobytes()


def test_encoded_header_is_read_back_by_safetensors(tmp_path):
    specs = [EncodedTensor("w", "F32", (3, 2), 24), EncodedTensor("v", "F16", (3,), 6)]
    header, offsets = encode_header(specs, {"format": "pt"})
    assert len(header) % 8 == 0 and offsets == [0, 24]
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    v = np.array([1, 2, 3], dtype=np.float16)
    (tmp_path / "y.safetensors").write_bytes(header + w.tobytes() + v.tobytes())
    loaded = load_file(tmp_path / "y.safetensors")
    np.testing.assert_array_equal(loaded["w"], w)
    np.testing.assert_array_equal(loaded["v"], v)


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

HOSTILE = {
    "too_short": (None, b"\x01\x02", "too short"),
    "length_past_end": ({"t": GOOD_ENTRY}, b"\0" * 8, "larger than the file"),
    "huge_length": ({"t": GOOD_ENTRY}, b"\0" * 8, "exceeds"),
    "not_utf8": (b"\xff\xfe{}", b"", "not valid UTF-8"),
    "not_json": (b"{nope", b"", "not valid JSON"),
    "not_object": (b"[1, 2]", b"", "must be a JSON object"),
    "duplicate_name": (b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                       b'"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', b"",
                       "appears twice"),
    "unknown_dtype": ({"t": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
                      "unknown dtype"),
    "negative_shape": ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                       b"\0" * 8, "non-negative"),
    "size_mismatch": ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
                      "needs 12 bytes"),
    "offsets_reversed": ({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}},
                         b"\0" * 8, "begin <= end"),
    "out_of_range": ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 8,
                     "unused space"),
    "truncated_data": ({"t": GOOD_ENTRY}, b"\0" * 4, "truncated"),
    "overlap": ({"t": GOOD_ENTRY, "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                b"\0" * 8, "overlaps"),
    "trailing_bytes": ({"t": GOOD_ENTRY}, b"\0" * 12, "after the last tensor"),
    "bad_metadata": ({"__metadata__": {"k": 1}, "t": GOOD_ENTRY}, b"\0" * 8, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_give_one_line_errors_naming_the_file(tmp_path, case):
    header, data, message = HOSTILE[case]
    path = tmp_path / f"{case}.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        override = 1 << 40 if case == "huge_length" else (
            10_000 if case == "length_past_end" else None)
        write_raw(path, header, data, override)
    with pytest.raises(FormatError) as info:
        read_header(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
