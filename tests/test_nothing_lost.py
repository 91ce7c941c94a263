"""Nothing the user had is lost, whatever happens around a merge: only OUT and the merge's own
hidden folder are ever written or removed (overlap decided by file identity, not names),
--force replaces models only, exit 0 means an output that verifies, --resume calls complete
only the merge that was asked for, a broken stderr does not fail a finished merge, and the
disk check counts what a resumed merge still has to write."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mergealign_fast import MergeError, PlanError, merge_checkpoints, sweep_checkpoints
from mergealign_fast.engine.in_memory import merge_tensors
from mergealign_fast.output import PartialOutput, partial_dir_for
from mergealign_fast.output.manifest import verify_output
from mergealign_fast.plan import MergeOptions, plan_merge
from mergealign_fast.tools.synthetic import LlamaShape, ensure_synthetic_trio

from test_engine import all_tensors_bytes


def cli(*args):
    return [sys.executable, "-m", "mergealign_fast", *map(str, args)]


def merge_argv(trio, out, *extra):
    return cli("merge", trio["base"], trio["domain"], trio["aligned"], "-o", out, "--quiet",
               "--no-fsync", *extra)


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=120,
                          **kwargs)


def one_line_refusal(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def trio(tiny_trio, tmp_path):
    """A private copy of the tiny trio (tests here move and link its folders)."""
    copies = {role: tmp_path / "inputs" / role for role in tiny_trio}
    for role, folder in tiny_trio.items():
        shutil.copytree(folder, copies[role])
    return copies


# ---- overlap by identity -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["--force", "--resume"])
def test_an_input_sitting_at_the_hidden_folder_is_refused_and_kept(trio, tmp_path, mode):
    out = tmp_path / "out"
    hidden = partial_dir_for(out)
    os.rename(trio["domain"], hidden)
    trio = {**trio, "domain": hidden}
    before = snapshot(hidden)
    proc = run(merge_argv(trio, out, mode))
    one_line_refusal(proc, "overlaps the domain model folder")
    assert snapshot(hidden) == before and not out.exists()


@pytest.mark.parametrize("mode", ["--force", "--resume"])
def test_a_hidden_folder_that_is_a_link_is_refused(trio, tmp_path, mode):
    out = tmp_path / "out"
    partial_dir_for(out).symlink_to(trio["aligned"])
    before = snapshot(trio["aligned"])
    proc = run(merge_argv(trio, out, mode))
    one_line_refusal(proc, "is a symbolic link")
    assert snapshot(trio["aligned"]) == before and not out.exists()


def test_an_input_shard_linked_into_out_is_refused(trio, tmp_path):
    out = tmp_path / "out"
    assert run(merge_argv(trio, out)).returncode == 0
    shard = trio["domain"] / "model.safetensors"
    shard.unlink()
    shard.symlink_to(out / "model.safetensors")
    kept = (out / "model.safetensors").read_bytes()
    proc = run(merge_argv(trio, out, "--force"))
    one_line_refusal(proc, "overlaps the domain model folder", "lies inside")
    assert (out / "model.safetensors").read_bytes() == kept


def test_a_bind_mounted_alias_of_out_is_found(trio, tmp_path):
    """Same folder, another name: only the (device, inode) of the folder tells."""
    out = tmp_path / "out"
    out.mkdir()
    alias = tmp_path / "alias"
    alias.mkdir()
    if os.geteuid() != 0 or run(["mount", "--bind", str(out), str(alias)]).returncode != 0:
        pytest.skip("needs root to bind-mount")
    try:
        shutil.copytree(trio["domain"], out / "domain")
        proc = run(merge_argv({**trio, "domain": alias / "domain"}, out, "--force"))
        one_line_refusal(proc, "overlaps the domain model folder")
        assert (out / "domain" / "model.safetensors").is_file()
    finally:
        run(["umount", "-l", str(alias)])


def test_out_inside_an_input_is_refused(trio):
    proc = run(merge_argv(trio, trio["base"] / "merged"))
    one_line_refusal(proc, "overlaps the base model folder")


# ---- --force replaces models only ----------------------------------------------------------------

@pytest.mark.parametrize("contents", [{".ssh/id_ed25519": b"key"}, {"notes.txt": b"mine"},
                                      {"model.safetensors": b"x", "photo.jpg": b"\xff\xd8"}])
def test_force_refuses_a_folder_that_is_not_a_model(trio, tmp_path, contents):
    out = tmp_path / "home"
    for name, data in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = snapshot(out)
    proc = run(merge_argv(trio, out, "--force"))
    one_line_refusal(proc, "--force replaces only a model")
    assert snapshot(out) == before


def test_force_replaces_a_model(trio, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trio["base"], out)
    assert run(merge_argv(trio, out, "--force")).returncode == 0
    assert verify_output(out) == []


# ---- exit 0 only for an output that verifies ------------------------------------------------------

def _swap_hidden_folder_after(calls: int, monkeypatch):
    """After `calls` journal writes, the hidden folder is removed and another merge's takes its
    name (what a user's `rm -rf` and a second merge do while the first is stopped)."""
    real = PartialOutput._write_manifest
    seen = []

    def swapping(self, fsync):
        real(self, fsync)
        seen.append(1)
        if len(seen) == calls:
            shutil.rmtree(self.folder)
            self.folder.mkdir()
            (self.folder / "the-other-merge").write_text("kept")
    monkeypatch.setattr(PartialOutput, "_write_manifest", swapping)


@pytest.mark.parametrize("calls", [1, 2], ids=["between-shards", "before-publishing"])
def test_a_hidden_folder_replaced_midway_is_never_published(trio, tmp_path, monkeypatch, calls):
    out = tmp_path / "out"
    options = dict(max_shard_size=150_000, fsync=False)
    shards = len(plan_merge(trio["base"], trio["domain"], trio["aligned"], out,
                            MergeOptions(**options)).shards)
    assert shards == 2  # 1: after the first shard; 2: after the last, before the side files
    _swap_hidden_folder_after(calls, monkeypatch)
    with pytest.raises(MergeError, match="removed or replaced|No such file"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, **options)
    assert not out.exists()
    assert (partial_dir_for(out) / "the-other-merge").read_text() == "kept"


# ---- --resume calls complete only this merge -------------------------------------------------------

def test_resume_with_another_tokenizer_source_is_not_complete(trio, tmp_path):
    (trio["domain"] / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    out = tmp_path / "out"
    assert run(merge_argv(trio, out, "--tokenizer-from", "domain")).returncode == 0
    proc = run(merge_argv(trio, out, "--resume"))
    one_line_refusal(proc, "holds another merge", "tokenizer_config.json")
    assert run(merge_argv(trio, out, "--resume", "--tokenizer-from", "domain")).returncode == 0


def test_resume_after_an_input_side_file_was_edited_is_not_complete(trio, tmp_path):
    out = tmp_path / "out"
    assert run(merge_argv(trio, out)).returncode == 0
    for folder in trio.values():  # (whichever input the config is taken from)
        config = folder / "config.json"
        config.write_text(config.read_text().replace("{", '{"note": "edited", ', 1))
    proc = run(merge_argv(trio, out, "--resume"))
    one_line_refusal(proc, "holds another merge", "config.json")


# ---- a broken stderr or stdout -------------------------------------------------------------------

def test_a_full_stderr_does_not_fail_the_merge(trio, tmp_path):
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(merge_argv(trio, out)[:-2] + ["--no-fsync"], stderr=full,
                              stdout=full, timeout=120)
    assert proc.returncode == 0 and verify_output(out) == []


def test_a_reader_that_goes_away_does_not_fail_the_merge(trio, tmp_path):
    out = tmp_path / "out"
    argv = " ".join(map(str, merge_argv(trio, out)[:-2])) + " 2>&1 | head -c 1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", argv], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and verify_output(out) == []


# ---- the in-memory API ---------------------------------------------------------------------------

def test_merge_tensors_refuses_what_it_would_get_wrong():
    a = np.linspace(-1, 1, 8, dtype=np.float32)
    with pytest.raises(TypeError, match="byte order"):
        merge_tensors(a.astype(">f4"), a, a)
    with pytest.raises(ValueError, match="read-only"):
        merge_tensors(a, a, a, out=np.frombuffer(bytes(32), dtype=np.float32))
    for threads in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            merge_tensors(a, a, a, threads=threads)
    swapped = merge_tensors(a, a, a.astype(">f4").astype("=f4"), domain_weight=0.3)
    np.testing.assert_array_equal(swapped, a)


def test_methods_by_name_in_the_checkpoint_api(trio, tmp_path):
    result = merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "t",
                               method="ties", fsync=False)
    assert result.tensors > 0 and verify_output(tmp_path / "t") == []
    with pytest.raises(PlanError, match="appears twice"):
        sweep_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "s",
                          [0.5, 0.5])


# ---- the disk check counts what is still to write --------------------------------------------------

SMALL = LlamaShape(hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2, vocab=4000)


def test_resume_and_force_fit_where_the_fresh_merge_fitted(tmp_path, small_fs, monkeypatch):
    """A merge fits with 1 MiB to spare; it fails after its first shard; --resume and --force
    both pass the disk check although the kept shard now occupies its share of the disk."""
    trio = ensure_synthetic_trio(tmp_path / "small", SMALL, seed=2)
    out = small_fs / "out"
    options = MergeOptions(max_shard_size=2_000_000, fsync=False)
    fresh = plan_merge(trio["base"], trio["domain"], trio["aligned"], out, options)
    assert len(fresh.shards) >= 3
    from mergealign_fast.plan.output import output_needs

    filler = small_fs / "filler"
    spare = shutil.disk_usage(small_fs).free - output_needs(fresh) - (2 << 20)
    subprocess.run(["fallocate", "-l", str(spare), str(filler)], check=True)
    _fail_after_first_shard(monkeypatch)
    with pytest.raises(MergeError, match="kept"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, options=options)
    monkeypatch.undo()
    for mode in ("resume", "force"):
        plan_merge(trio["base"], trio["domain"], trio["aligned"], out,
                   MergeOptions(max_shard_size=2_000_000, **{mode: True}))
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, options=options,
                      resume=True)
    assert verify_output(out) == []


def _fail_after_first_shard(monkeypatch):
    real = PartialOutput.record_shard

    def failing(self, shard, size, fsync):
        real(self, shard, size, fsync)
        raise MergeError("stopped for the test")
    monkeypatch.setattr(PartialOutput, "record_shard", failing)


def test_a_merge_is_not_refused_for_want_of_an_unneeded_64_mib(tiny_trio, tmp_path, monkeypatch):
    import mergealign_fast.plan.output as output_checks

    out = tmp_path / "out"
    needs = output_checks.output_needs(plan_merge(tiny_trio["base"], tiny_trio["domain"],
                                                  tiny_trio["aligned"], out))
    real = shutil.disk_usage
    monkeypatch.setattr(output_checks.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=needs + (2 << 20)))
    plan_merge(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], out)
    monkeypatch.setattr(output_checks.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=needs // 2))
    with pytest.raises(PlanError, match="not enough free disk"):
        plan_merge(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], out)


def test_too_few_inodes_are_found_before_the_merge(tiny_trio, tmp_path, monkeypatch):
    import mergealign_fast.plan.output as output_checks

    real = os.statvfs

    class Vfs:
        def __init__(self, path):
            self.real = real(path)

        f_files, f_favail = 1000, 2

        def __getattr__(self, name):
            return getattr(self.real, name)
    monkeypatch.setattr(output_checks.os, "statvfs", Vfs)
    with pytest.raises(PlanError, match="not enough free inodes"):
        plan_merge(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], tmp_path / "o")


def test_a_sweep_resumed_with_one_more_lambda_counts_only_the_new_one(tiny_trio, tmp_path):
    from mergealign_fast.plan.output import output_needs
    from mergealign_fast.plan.sweep import plan_sweep

    root = tmp_path / "sweep"
    sweep_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], root,
                      [0.25], fsync=False)
    plans = plan_sweep(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], root,
                       [0.25, 0.75], MergeOptions(resume=True))
    assert output_needs(plans[0]) == 0 and output_needs(plans[1]) > 0


# ---- bench leaves the user's files alone ----------------------------------------------------------

@pytest.mark.slow
def test_bench_dir_keeps_what_the_user_had_there(tmp_path):
    work = tmp_path / "work"
    (work / "merged").mkdir(parents=True)
    (work / "merged" / "weights.safetensors").write_bytes(b"mine")
    (work / "write-floor").write_bytes(b"mine too")
    before = snapshot(work)
    proc = subprocess.run(cli("bench", "--quick", "--dir", work), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    after = snapshot(work)
    assert {k: after[k] for k in before} == before
    assert not [p for p in work.iterdir() if p.name.startswith(".mergealign-bench-run-")]


def test_a_synthetic_build_never_writes_into_a_folder_it_did_not_make(tmp_path):
    from mergealign_fast.tools.synthetic import LLAMA_TINY

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "mine.txt").write_text("mine")
    with pytest.raises(MergeError, match="not made by a finished build"):
        ensure_synthetic_trio(tmp_path, LLAMA_TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert (tmp_path / "base" / "mine.txt").read_text() == "mine"


def test_the_same_merge_twice_gives_the_same_bytes(trio, tmp_path):
    """(The checks above add no state to the output: a merge is still a pure function.)"""
    for name in ("a", "b"):
        assert run(merge_argv(trio, tmp_path / name)).returncode == 0
    assert all_tensors_bytes(tmp_path / "a") == all_tensors_bytes(tmp_path / "b")


# ---- one line, never a traceback ---------------------------------------------------------------

def write_raw_model(folder: Path, header, data: bytes, config: str = '{"model_type": '
                    '"llama"}') -> None:
    """A model whose safetensors header is written as given (names and dtypes unchecked; a
    str is the header's JSON text itself)."""
    import json
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    (folder / "config.json").write_text(config)


def raw_trio(root: Path, tensors_of) -> dict:
    """{role: folder} of three raw models; tensors_of(i) -> (header, data) of model i."""
    folders = {role: root / role for role in ("base", "domain", "aligned")}
    for i, folder in enumerate(folders.values()):
        write_raw_model(folder, *tensors_of(i))
    return folders


def f32_entry(offset: int, count: int) -> dict:
    return {"dtype": "F32", "shape": [count], "data_offsets": [offset, offset + 4 * count]}


def test_folder_names_that_are_not_utf8_merge_verify_and_resume(trio, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/in\xfeputs"))
    shutil.copytree(trio["base"].parent, odd)
    odd_trio = {role: odd / role for role in trio}
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out\xff"))
    for extra in ((), ("--resume",)):
        proc = run(merge_argv(odd_trio, out, *extra))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert run(cli("verify", out)).returncode == 0 and verify_output(out) == []


@pytest.mark.parametrize("manifest", ['[1, 2]', '{"format": "mergealign-fast manifest 1", '
                                      '"shards": [1]}', '{"shards": {"a": {"size": "9"}}}',
                                      "[" * 100_000 + "]" * 100_000])
def test_verify_and_resume_over_a_damaged_manifest_or_journal(trio, tmp_path, manifest):
    out = tmp_path / "out"
    assert run(merge_argv(trio, out)).returncode == 0
    (out / "mergealign-manifest.json").write_text(manifest)
    proc = run(cli("verify", out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    hidden = partial_dir_for(tmp_path / "again")
    hidden.mkdir()
    (hidden / "mergealign-manifest.json").write_text(manifest)
    proc = run(merge_argv(trio, tmp_path / "again", "--resume"))
    assert proc.returncode == 0, proc.stderr  # a damaged journal is no journal: merged anew
    assert verify_output(tmp_path / "again") == []


@pytest.mark.parametrize("where", ["header", "index", "config"])
def test_json_nested_very_deep_is_one_line(trio, tmp_path, where):
    deep = "[" * 50_000 + "]" * 50_000
    folder = trio["domain"]
    if where == "header":
        write_raw_model(folder, '{"__metadata__": {"a": ' + deep + "}}", b"")
    elif where == "index":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + deep + "}")
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    else:  # (in each input: whichever config the merge reads)
        for each in trio.values():
            (each / "config.json").write_text('{"a": ' + deep + "}")
    proc = run(merge_argv(trio, tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_tensor_of_no_elements_merges_by_rows(tmp_path):
    trio = raw_trio(tmp_path / "in", lambda i: (
        {"empty": {"dtype": "F32", "shape": [4, 0], "data_offsets": [0, 0]},
         "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}},
        np.full(6, i + 1, np.float32).tobytes()))
    for method in ("nuslerp", "model_stock"):
        out = tmp_path / method
        proc = run(merge_argv(trio, out, "--method", method, "--vectors", "rows"))
        assert proc.returncode == 0, proc.stderr
        assert verify_output(out) == []


def test_models_without_tensors_are_refused(tmp_path):
    trio = raw_trio(tmp_path / "in", lambda i: ({}, b""))
    one_line_refusal(run(merge_argv(trio, tmp_path / "out")), "hold no tensors")
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_tensor_name_is_refused(tmp_path):
    trio = raw_trio(tmp_path / "in", lambda i: ({"w\ud800" if i == 1 else "w": f32_entry(0, 2)},
                                                np.ones(2, np.float32).tobytes()))
    one_line_refusal(run(merge_argv(trio, tmp_path / "out")), "not valid Unicode")


def test_complex_tensors_the_same_in_every_model_are_copied(tmp_path):
    freqs = np.arange(3, dtype=np.complex64) * (1 - 2j)
    trio = raw_trio(tmp_path / "in", lambda i: (
        {"freqs": {"dtype": "C64", "shape": [3], "data_offsets": [0, 24]},
         "w": f32_entry(24, 2)}, freqs.tobytes() + np.full(2, i, np.float32).tobytes()))
    out = tmp_path / "out"
    assert run(merge_argv(trio, out)).returncode == 0
    from safetensors.numpy import load_file

    merged = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(merged["freqs"], freqs)


def test_an_auto_map_of_the_wrong_type_is_not_a_traceback(trio, tmp_path):
    import json

    for folder in trio.values():
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "auto_map": ["x.Y"]}))
    proc = run(merge_argv(trio, tmp_path / "out"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
