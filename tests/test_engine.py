"""End to end on generated Llama trios: correctness, format, determinism, atomic output."""

import errno
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from mergealign_fast import MergeError, PlanError, merge_checkpoints, merge_tensors
from mergealign_fast.io import stream
from mergealign_fast.dtypes import DType
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.kernels import cpu
from mergealign_fast.tools.oracle_check import check_against_oracle
from mergealign_fast.tools.synthetic import LLAMA_TINY, write_synthetic_model

ROLES = ("base", "domain", "aligned")


def merge(trio, out, **kwargs):
    kwargs.setdefault("domain_weight", 0.3)
    kwargs.setdefault("align_weight", 0.9)
    return merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, **kwargs)


def all_tensors_bytes(folder) -> dict:
    model = open_checkpoint(folder)
    return {name: read_elements(loc).tobytes() for name, loc in model.tensors.items()}


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".mergealign-" in p.name]


def test_every_element_within_the_oracle_bound(tiny_trio, tmp_path):
    result = merge(tiny_trio, tmp_path / "out")
    assert result.tensors == len(LLAMA_TINY.tensors()) and result.shards == 1
    report = check_against_oracle(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                                  tmp_path / "out", 0.3, 0.9, max_tensors=10**6,
                                  elements_per_tensor=10**9)
    assert report.tensors_checked == result.tensors
    assert report.passed, report


def test_equal_to_the_in_memory_kernel(tiny_trio, tmp_path):
    merge(tiny_trio, tmp_path / "out")
    merged = all_tensors_bytes(tmp_path / "out")
    inputs = [open_checkpoint(tiny_trio[r]) for r in ROLES]
    for name, raw in merged.items():
        parts = [read_elements(m.tensors[name]) for m in inputs]
        expected = merge_tensors(*parts, domain_weight=0.3, align_weight=0.9)
        assert raw == expected.tobytes(), name


def test_output_is_a_hugging_face_folder(tiny_trio, tmp_path):
    out = tmp_path / "out"
    merge(tiny_trio, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "mergealign-manifest.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "llama"
    assert leftovers(tmp_path) == []


def test_sharded_inputs_and_outputs_give_the_same_tensors(tiny_trio, tiny_trio_sharded, tmp_path):
    assert len(open_checkpoint(tiny_trio_sharded["domain"]).files) > 1
    merge(tiny_trio, tmp_path / "single")
    result = merge(tiny_trio_sharded, tmp_path / "sharded", max_shard_size=100_000)
    assert result.shards > 1
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{result.shards:05d}.safetensors"
                     for i in range(1, result.shards + 1)]
    loaded = {}
    for f in files:  # the safetensors package reads every shard we wrote
        for name, value in load_file(out / f).items():
            assert index["weight_map"][name] == f
            loaded[name] = value
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in loaded.values())
    assert set(loaded) == set(open_checkpoint(tiny_trio["base"]).tensors)
    assert all_tensors_bytes(out) == all_tensors_bytes(tmp_path / "single")


def test_bitwise_identical_for_any_threads_and_window(tiny_trio, tmp_path, monkeypatch):
    merge(tiny_trio, tmp_path / "a", threads=1)
    monkeypatch.setattr(stream, "WINDOW_BYTES", 4096 + 6)  # odd windows split tensors mid-way
    merge(tiny_trio, tmp_path / "b", threads=3)
    assert all_tensors_bytes(tmp_path / "a") == all_tensors_bytes(tmp_path / "b")


def test_mixed_input_dtypes_and_fp32_output(tiny_trio, tmp_path):
    mixed = dict(tiny_trio)
    mixed["domain"] = write_synthetic_model(tmp_path / "domain16", LLAMA_TINY, "domain", seed=3,
                                            dtype=DType.F16)
    out = tmp_path / "out"
    merge(mixed, out, out_dtype=DType.F32)
    assert {loc.entry.dtype for loc in open_checkpoint(out).tensors.values()} == {"F32"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    report = check_against_oracle(mixed["base"], mixed["domain"], mixed["aligned"], out, 0.3, 0.9)
    assert report.passed, report


def test_existing_output_needs_force_and_is_replaced_only_when_done(tiny_trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_text("previous model")
    with pytest.raises(PlanError, match="not empty"):
        merge(tiny_trio, out)
    merge(tiny_trio, out, force=True)
    assert not (out / "old.safetensors").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


class FailingNative:
    """The native module, except that the n-th merge_to_files call fails or raises."""

    def __init__(self, fail_at: int, failure):
        self.real, self.calls, self.fail_at, self.failure = cpu.native(), 0, fail_at, failure

    def __getattr__(self, name):
        return getattr(self.real, name)

    def merge_to_files(self, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            if isinstance(self.failure, int):
                return self.failure, [], []  # (errno, CRCs, NaN counts) as the native call
            raise self.failure
        return self.real.merge_to_files(*args)


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EIO, KeyboardInterrupt()],
                         ids=["disk-full", "io-error", "ctrl-c"])
def test_failure_midway_keeps_the_old_output_and_resume_finishes(tiny_trio, tmp_path, monkeypatch,
                                                                 failure):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_text("previous model")
    merge(tiny_trio, tmp_path / "reference", max_shard_size=100_000)
    fake = FailingNative(fail_at=9, failure=failure)  # shard 1 of 3 done, shard 2 half done
    monkeypatch.setattr(cpu, "native", lambda: fake)
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else MergeError
    with pytest.raises(expected) as info:
        merge(tiny_trio, out, force=True, max_shard_size=100_000)
    assert fake.calls == 9
    if expected is MergeError:
        assert "rerun with --resume" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["old.safetensors"]  # OUT untouched
    assert leftovers(tmp_path) == [".out.mergealign-partial"]
    monkeypatch.undo()
    with pytest.raises(PlanError, match="not empty"):  # --force is still needed to replace OUT
        merge(tiny_trio, out, resume=True, max_shard_size=100_000)
    counting = FailingNative(fail_at=0, failure=None)  # counts, never fails
    monkeypatch.setattr(cpu, "native", lambda: counting)
    merge(tiny_trio, out, force=True, resume=True, max_shard_size=100_000)
    tensors = len(LLAMA_TINY.tensors())
    assert 0 < counting.calls < tensors  # the completed first shard was not merged again
    assert all_tensors_bytes(out) == all_tensors_bytes(tmp_path / "reference")
    assert leftovers(tmp_path) == []


def test_an_interrupted_merge_is_neither_overwritten_nor_silently_resumed(tiny_trio, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "out"
    failing = FailingNative(fail_at=12, failure=errno.EIO)  # after the first of 3 shards
    monkeypatch.setattr(cpu, "native", lambda: failing)
    with pytest.raises(MergeError):
        merge(tiny_trio, out, max_shard_size=100_000)
    monkeypatch.undo()
    with pytest.raises(MergeError, match="add --resume to finish it, or --force to start over"):
        merge(tiny_trio, out, max_shard_size=100_000)
    with pytest.raises(MergeError, match="started with other inputs or options"):
        merge(tiny_trio, out, max_shard_size=100_000, resume=True, domain_weight=0.31)
    merge(tiny_trio, out, max_shard_size=100_000, force=True)  # starts over
    assert leftovers(tmp_path) == [] and (out / "model.safetensors.index.json").exists()


def test_a_second_merge_into_the_same_output_fails_at_once(tiny_trio, tmp_path):
    import fcntl
    import os

    from mergealign_fast.output import partial_dir_for

    out = tmp_path / "out"
    partial = partial_dir_for(out)
    partial.mkdir()
    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running merge holds: the folder itself
    try:
        with pytest.raises(MergeError, match="another merge into .* is running now"):
            merge(tiny_trio, out)
        merge(tiny_trio, tmp_path / "elsewhere")  # other outputs are not blocked
    finally:
        os.close(fd)
    assert not out.exists()


def test_transformers_loads_the_merged_model(tiny_trio, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    out = tmp_path / "out"
    merge(tiny_trio, out, max_shard_size=100_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    ours = open_checkpoint(out)
    for name, param in model.state_dict().items():
        raw = read_elements(ours.tensors[name])
        assert param.view(torch.int16).numpy().view(np.uint16).ravel().tobytes() == raw.tobytes()
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, LLAMA_TINY.vocab) and torch.isfinite(logits).all()


def test_options_by_keyword_or_as_one_object_give_the_same_model(tiny_trio, tmp_path):
    from mergealign_fast import MergeOptions, Method

    chosen = dict(domain_weight=0.7, align_weight=0.2, method=Method("ties", domain_density=0.5))
    merge(tiny_trio, tmp_path / "keywords", **chosen)
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "object", options=MergeOptions(**chosen))
    assert all_tensors_bytes(tmp_path / "keywords") == all_tensors_bytes(tmp_path / "object")
    merge(tiny_trio, tmp_path / "default")
    assert all_tensors_bytes(tmp_path / "default") != all_tensors_bytes(tmp_path / "object")


def test_an_unknown_option_is_named_before_anything_is_read(tiny_trio, tmp_path):
    with pytest.raises(TypeError, match="domain_wieght"):
        merge(tiny_trio, tmp_path / "out", domain_wieght=0.7)
    assert leftovers(tmp_path) == []


def test_both_writers_follow_the_writer_protocol():
    from mergealign_fast.engine.writers import Writer
    from mergealign_fast.engine.writers.cpu import CpuWriter
    from mergealign_fast.engine.writers.gpu import GpuWriter

    for writer in (CpuWriter, GpuWriter):
        assert all(callable(getattr(writer, name, None))
                   for name in ("chunk_elements", "write", "drain", "close"))
    assert isinstance(CpuWriter(fsync=False, threads=1), Writer)
