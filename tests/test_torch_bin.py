"""PyTorch .bin checkpoints: every form torch.save writes read as torch itself reads it, merged
bitwise like the same weights in safetensors, and hostile or broken files refused in one line
without running their pickle."""

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mergealign_fast import MergeError, merge_checkpoints  # noqa: E402
from mergealign_fast.io.checkpoint import (TensorLocation, open_checkpoint,  # noqa: E402
                                           read_elements)
from mergealign_fast.io.safetensors_format import FormatError  # noqa: E402
from mergealign_fast.io.torch_bin import read_bin  # noqa: E402
from mergealign_fast.output.manifest import verify_output  # noqa: E402

FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                torch.int32, torch.int8, torch.uint8, torch.bool]


def stored_bytes(tensor) -> bytes:
    """The tensor's elements in row-major order, as torch holds them (the oracle)."""
    t = tensor.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_reads_as_torch(path: Path, state_dict: dict) -> None:
    found = read_bin(path)
    assert list(found) == list(state_dict)
    for name, tensor in state_dict.items():
        entry = found[name]
        assert entry.shape == tuple(tensor.shape), name
        assert read_elements(TensorLocation(path, entry)).tobytes() == stored_bytes(tensor), name


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_dtype_reads_as_torch_wrote_it(tmp_path, form, dtype):
    generator = torch.Generator().manual_seed(7)
    values = (torch.randn(5, 7, generator=generator) * 50)
    state = {"odd": values.to(dtype), "scalar": values[0, 0].to(dtype),
             "empty": torch.zeros(0, 3, dtype=dtype), "one": values[:1, :1].to(dtype).clone()}
    torch.save(state, tmp_path / "m.bin", **FORMATS[form])
    assert_reads_as_torch(tmp_path / "m.bin", state)


@pytest.mark.parametrize("form", FORMATS)
def test_shared_storages_views_and_parameters(tmp_path, form):
    whole = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "whole": whole,
        "tied": whole,                    # the same tensor under two names (tied embeddings)
        "row": whole[2],                  # a view at an offset into the same storage
        "prefix": whole.view(-1)[:7],     # same start as "whole", fewer elements
        "rows": whole[1:4],
        "flat": whole.view(60),
        "param": torch.nn.Parameter(torch.ones(3, 2, dtype=torch.bfloat16)),
        "column_of_one": whole[:, 3:4][0:1],
    }
    torch.save(state, tmp_path / "m.bin", **FORMATS[form])
    assert_reads_as_torch(tmp_path / "m.bin", state)


def test_a_state_dict_with_its_metadata_attribute(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    state = model.state_dict()  # an OrderedDict carrying `_metadata` (pickled with BUILD)
    torch.save(state, tmp_path / "m.bin")
    assert_reads_as_torch(tmp_path / "m.bin", state)


@pytest.mark.parametrize("form", FORMATS)
def test_a_non_contiguous_view_is_refused_naming_the_tensor(tmp_path, form):
    torch.save({"ok": torch.ones(2), "t": torch.ones(3, 4).t()}, tmp_path / "m.bin",
               **FORMATS[form])
    with pytest.raises(FormatError, match=r"m\.bin: tensor 't': stored with strides \[1, 4\]"):
        read_bin(tmp_path / "m.bin")


# ---- merges from .bin folders equal merges from the same weights in safetensors ----

def as_bin_folder(source: Path, folder: Path, *, shards: int = 1, form: str = "zip") -> Path:
    """The safetensors model `source` re-saved by torch.save (pytorch_model.bin, or shards with
    pytorch_model.bin.index.json), its other files copied."""
    from safetensors.torch import load_file

    folder.mkdir(parents=True)
    for file in source.iterdir():
        if not file.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(file, folder / file.name)
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(file))
    names = list(state)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin", **FORMATS[form])
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / shard, **FORMATS[form])
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def merged_tensors(out: Path) -> dict:
    return {name: read_elements(location)
            for name, location in open_checkpoint(out).tensors.items()}


@pytest.mark.parametrize("shards,form", [(1, "zip"), (3, "zip"), (1, "legacy")])
def test_a_merge_from_bin_is_bitwise_the_safetensors_merge(tiny_trio, tmp_path, shards, form):
    bins = {role: as_bin_folder(folder, tmp_path / role, shards=shards, form=form)
            for role, folder in tiny_trio.items()}
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "from_st", fsync=False)
    merge_checkpoints(bins["base"], bins["domain"], bins["aligned"], tmp_path / "from_bin",
                      fsync=False)
    expected, got = merged_tensors(tmp_path / "from_st"), merged_tensors(tmp_path / "from_bin")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].tobytes() == expected[name].tobytes(), name
    assert verify_output(tmp_path / "from_bin") == []
    assert not list((tmp_path / "from_bin").glob("*.bin")), "output is always safetensors"


def test_a_bin_model_beside_safetensors_ones(tiny_trio, tmp_path):
    domain = as_bin_folder(tiny_trio["domain"], tmp_path / "domain")
    merge_checkpoints(tiny_trio["base"], domain, tiny_trio["aligned"], tmp_path / "out",
                      fsync=False)
    assert verify_output(tmp_path / "out") == []


def test_safetensors_win_over_bin_in_one_folder(tiny_trio, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(tiny_trio["domain"], folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a checkpoint")
    assert all(loc.file.suffix == ".safetensors"
               for loc in open_checkpoint(folder).tensors.values())


# ---- hostile and broken files: one line naming the file, nothing executed ----

class RunsCode:
    """Pickles to a call of os.system: an unpickler that ran it would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalsCode:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def one_line_error(path: Path) -> str:
    with pytest.raises(MergeError) as info:
        open_checkpoint(path.parent)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.mark.parametrize("form", FORMATS)
def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path, form):
    marker = tmp_path / "executed"
    torch.save({"w": torch.ones(2), "payload": RunsCode(marker)},
               tmp_path / "pytorch_model.bin", **FORMATS[form])
    assert "calls posix.system" in one_line_error(tmp_path / "pytorch_model.bin")
    assert not marker.exists()


def test_eval_and_unknown_globals_are_refused(tmp_path):
    torch.save({"w": torch.ones(2), "x": EvalsCode()}, tmp_path / "pytorch_model.bin")
    assert "eval, which a state dict" in one_line_error(tmp_path / "pytorch_model.bin")


def rewrite_member(path: Path, member_suffix: str, replace) -> None:
    """Rewrite the zip `path` with the member ending in `member_suffix` replaced."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    with zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith(member_suffix):
                data, info.compress_type = replace(data, info.compress_type)
            target.writestr(info, data)


def pickle_with_opcode(opcode: bytes) -> bytes:
    """protocol 2: PROTO 2, a MARK, the opcode's minimal form, STOP."""
    return b"\x80\x02" + opcode + b"."


def test_an_opcode_a_state_dict_never_uses_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    inst = b"(ios\nsystem\n"  # INST: builds os.system(...) without REDUCE
    rewrite_member(path, "data.pkl", lambda data, kind: (pickle_with_opcode(inst), kind))
    assert "opcode INST" in one_line_error(path)


def test_a_build_that_would_rewrite_a_tensor_record_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)

    def rebuilt(data, kind):
        # After the tensor's REDUCE (the last one of a one-tensor dict): {"offset": "x"} BUILD.
        import pickletools

        at = [pos for op, _, pos in pickletools.genops(data) if op.name == "REDUCE"][-1]
        build = b"}X\x06\x00\x00\x00offsetX\x01\x00\x00\x00xsb"
        return data[:at + 1] + build + data[at + 1:], kind
    rewrite_member(path, "data.pkl", rebuilt)
    assert "BUILD applied to a tensor" in one_line_error(path)


def test_big_endian_and_compressed_archives_are_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    rewrite_member(path, "byteorder", lambda data, kind: (b"big", kind))
    assert "big-endian" in one_line_error(path)
    torch.save({"w": torch.ones(2)}, path)
    rewrite_member(path, "data/0", lambda data, kind: (data, zipfile.ZIP_DEFLATED))
    assert "is compressed" in one_line_error(path)


@pytest.mark.parametrize("value", [None, 3, "text", {"nested": 1}], ids=repr)
def test_entries_that_are_not_tensors_are_refused_by_name(tmp_path, value):
    torch.save({"w": torch.ones(2), "extra": value}, tmp_path / "pytorch_model.bin")
    assert "entry 'extra'" in one_line_error(tmp_path / "pytorch_model.bin")


def test_a_whole_module_is_not_a_state_dict(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pytorch_model.bin")
    assert "refused, not executed" in one_line_error(tmp_path / "pytorch_model.bin")


def test_a_storage_type_torch_does_not_have_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    rewrite_member(path, "data.pkl",
                   lambda data, kind: (data.replace(b"FloatStorage", b"FancyStorage"), kind))
    assert "torch.FancyStorage" in one_line_error(path)


@pytest.mark.parametrize("form", FORMATS)
def test_every_truncation_is_one_clear_line(tmp_path, form):
    whole = tmp_path / "whole.bin"
    torch.save({"a": torch.ones(40), "b": torch.zeros(3, dtype=torch.bfloat16)}, whole,
               **FORMATS[form])
    data = whole.read_bytes()
    path = tmp_path / "pytorch_model.bin"
    for cut in sorted({*range(0, len(data), max(1, len(data) // 60)), len(data) - 1}):
        path.write_bytes(data[:cut])
        one_line_error(path)


def test_flipped_bytes_end_in_an_error_or_the_right_tensors(tmp_path):
    state = {"a": torch.arange(12, dtype=torch.float32), "b": torch.ones(2, 3).half()}
    torch.save(state, tmp_path / "whole.bin")
    data = bytearray((tmp_path / "whole.bin").read_bytes())
    rng = np.random.default_rng(5)
    path = tmp_path / "pytorch_model.bin"
    for _ in range(300):
        broken = bytearray(data)
        for position in rng.integers(0, len(data), size=rng.integers(1, 4)):
            broken[position] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(broken))
        try:
            found = open_checkpoint(tmp_path).tensors
        except MergeError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            continue
        for name, location in found.items():  # whatever reads must be in bounds
            assert location.entry.end <= len(data) and location.entry.begin >= 0, name


def test_an_index_naming_a_missing_bin_shard(tiny_trio, tmp_path):
    folder = as_bin_folder(tiny_trio["domain"], tmp_path / "domain", shards=2)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(MergeError, match="lists shard pytorch_model-00002-of-00002.bin which "
                                         "does not exist"):
        open_checkpoint(folder)


def test_a_legacy_file_from_a_big_endian_machine_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    # The third pickle is sys_info: {"protocol_version":..., "little_endian": True, ...}; True
    # is the first NEWTRUE (0x88) after the key.
    flag = data.index(b"\x88", data.index(b"little_endian"))
    flipped = data[:flag] + b"\x89" + data[flag + 1:]
    path.write_bytes(flipped)
    assert "big-endian" in one_line_error(path)
