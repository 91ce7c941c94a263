"""The edges a new user hits: every form of OUT, resumes that must not mix inputs, files
transformers needs, values at the limits, and the command line's own edges."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mergealign_fast import MergeError, Method, PlanError, merge_checkpoints, merge_tensors
from mergealign_fast.kernels import cpu
from mergealign_fast.output.manifest import MANIFEST, verify_output
from mergealign_fast.output import partial_dir_for
from mergealign_fast.api import sweep_checkpoints

from conftest import small_model, write_checkpoint
from test_engine import FailingNative, all_tensors_bytes, leftovers

SHARDED = dict(max_shard_size=100_000)  # the tiny trio in 3 shards


def cli(*args, cwd=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "mergealign_fast", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, **kwargs)


def merge_args(trio, out, *extra):
    return ("merge", trio["base"], trio["domain"], trio["aligned"], "-o", out, "--quiet", *extra)


def one_error_line(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and all(f in lines[0] for f in fragments), lines[0]


@pytest.fixture(scope="module")
def reference(tiny_trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], out)
    return all_tensors_bytes(out)


def copy_trio(trio, root):
    copied = {r: root / r for r in trio}
    for role, folder in trio.items():
        shutil.copytree(folder, copied[role])
    return copied


# ---- OUT in every form ------------------------------------------------------------------------

@pytest.mark.parametrize("out", [".", ".."])
def test_the_current_directory_or_above_is_refused_before_compute(tiny_trio, tmp_path, out):
    here = tmp_path / "parent" / "here"
    here.mkdir(parents=True)
    proc = cli(*merge_args(tiny_trio, out), cwd=here)
    one_error_line(proc, "current directory")
    assert list(here.iterdir()) == [] and sorted(p.name for p in here.parent.iterdir()) == ["here"]


@pytest.mark.parametrize("form", ["relative", "trailing slash", "dot segments"])
def test_relative_forms_of_out_work(tiny_trio, tmp_path, reference, form):
    (tmp_path / "work").mkdir()
    out = {"relative": "merged", "trailing slash": "merged/",
           "dot segments": "./sub/../merged"}[form]
    (tmp_path / "work" / "sub").mkdir()
    proc = cli(*merge_args(tiny_trio, out), cwd=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    assert all_tensors_bytes(tmp_path / "work" / "merged") == reference
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["merged", "sub"]


def test_out_as_a_link_to_a_folder_on_another_file_system(tiny_trio, small_fs, tmp_path,
                                                          reference):
    """The partial folder is made beside the link's target, on its file system: the final rename
    works, and --resume after an interruption too."""
    target = small_fs / "models" / "merged"
    target.mkdir(parents=True)
    link = tmp_path / "merged"
    link.symlink_to(target)
    proc = cli(*merge_args(tiny_trio, link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and all_tensors_bytes(target) == reference
    assert sorted(p.name for p in small_fs.iterdir()) == ["models"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["merged"]


def test_out_as_a_link_to_a_model_replaced_twice_with_force(tiny_trio, tmp_path, reference):
    target = tmp_path / "store" / "model"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # the previous model
    (target / "old.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "store" / "neighbour.txt").write_text("untouched")
    link = tmp_path / "current"
    link.symlink_to(target)
    for _ in range(2):
        proc = cli(*merge_args(tiny_trio, link, "--force"))
        assert proc.returncode == 0, proc.stderr
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert all_tensors_bytes(target) == reference
        assert not (target / "old.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["model", "neighbour.txt"]
    assert (tmp_path / "store" / "neighbour.txt").read_text() == "untouched"


def test_a_mount_point_as_out_is_refused_before_compute(tiny_trio, small_fs):
    proc = cli(*merge_args(tiny_trio, small_fs))
    one_error_line(proc, "mount point", "merged")
    assert list(small_fs.iterdir()) == []


# ---- resumes that cannot mix inputs -----------------------------------------------------------

def interrupt_after_first_shard(trio, out, monkeypatch, **options):
    failing = FailingNative(fail_at=12, failure=errno.EIO)  # after the first of 3 shards
    monkeypatch.setattr(cpu, "native", lambda: failing)
    with pytest.raises(MergeError, match="--resume"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, **SHARDED,
                          **options)
    monkeypatch.undo()
    assert (partial_dir_for(out) / MANIFEST).exists()


def test_an_input_rewritten_with_its_mtime_restored_is_not_resumed(tiny_trio, tmp_path,
                                                                   monkeypatch, reference):
    trio = copy_trio(tiny_trio, tmp_path)
    out = tmp_path / "out"
    interrupt_after_first_shard(trio, out, monkeypatch)
    victim = trio["domain"] / "model.safetensors"
    before = os.stat(victim)
    with open(victim, "r+b") as f:  # same size, other values, times put back
        f.seek(-64, os.SEEK_END)
        f.write(bytes(64))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(victim).st_mtime_ns == before.st_mtime_ns
    with pytest.raises(MergeError, match=r"input domain: .*model.safetensors changed.*ctime"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, **SHARDED,
                          resume=True)
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, **SHARDED, force=True)
    assert verify_output(out) == [] and all_tensors_bytes(out) != reference


def test_a_resume_with_another_option_names_it(tiny_trio, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_after_first_shard(tiny_trio, out, monkeypatch)
    with pytest.raises(MergeError, match=r"option domain_weight: 0\.5 then, 0\.31 now"):
        merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], out,
                          **SHARDED, resume=True, domain_weight=0.31)


def test_resume_on_a_complete_output_verifies_and_exits_0(tiny_trio, tmp_path):
    out = tmp_path / "out"
    assert cli(*merge_args(tiny_trio, out)).returncode == 0
    again = cli(*merge_args(tiny_trio, out, "--resume"))
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr
    other = cli(*merge_args(tiny_trio, out, "--resume", "--domain-weight", "0.3"))
    one_error_line(other, "holds another merge", "option domain_weight")
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\x7f\x7f")
    damaged = cli(*merge_args(tiny_trio, out, "--resume"))
    one_error_line(damaged, "fails verification", "--force")


# ---- files transformers needs -----------------------------------------------------------------

def remote_code_trio(root):
    for seed, role in enumerate(("base", "domain", "aligned")):
        write_checkpoint(root / role, small_model(seed), config={
            "model_type": "tiny", "torch_dtype": "float32",
            "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                         "AutoModelForCausalLM": "modeling_tiny.TinyModel",
                         "AutoTokenizer": ["other/repo--tokenization_x.X", None]}})
        (root / role / "configuration_tiny.py").write_text("# config code\n")
        (root / role / "modeling_tiny.py").write_text("from .helpers import x\n")
        (root / role / "helpers.py").write_text("x = 1\n")
    return {r: root / r for r in ("base", "domain", "aligned")}


def test_remote_code_files_travel_with_the_config(tmp_path):
    trio = remote_code_trio(tmp_path)
    out = tmp_path / "out"
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out)
    for name in ("configuration_tiny.py", "modeling_tiny.py", "helpers.py"):
        assert (out / name).read_bytes() == (trio["aligned"] / name).read_bytes()
    assert verify_output(out) == []
    (trio["aligned"] / "modeling_tiny.py").unlink()
    with pytest.raises(PlanError, match="auto_map names modeling_tiny.py, which is not in"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out2")


def test_a_single_file_beside_an_index_is_what_is_merged_as_transformers_loads_it(
        tiny_trio, tiny_trio_sharded, tmp_path, reference):
    trio = copy_trio(tiny_trio, tmp_path)
    for role, folder in trio.items():  # stale shards and index beside the single file
        for f in tiny_trio_sharded[role].glob("model*"):
            shutil.copy(f, folder / f.name)
            if f.suffix == ".safetensors":  # other values, so a wrong choice shows
                with open(folder / f.name, "r+b") as g:
                    g.seek(-16, os.SEEK_END)
                    g.write(bytes(16))
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out")
    assert all_tensors_bytes(tmp_path / "out") == reference


def test_a_peft_adapter_given_as_a_model_is_named(tiny_trio, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(PlanError, match=r"domain: .*a PEFT adapter .*BASE\+"):
        merge_checkpoints(tiny_trio["base"], adapter, tiny_trio["aligned"], tmp_path / "out")


# ---- values at the limits ---------------------------------------------------------------------

@pytest.mark.parametrize("weight", [1e39, -1e39, float("inf"), float("nan")])
def test_a_weight_beyond_float32_is_refused(tiny_trio, tmp_path, weight):
    with pytest.raises(PlanError, match="domain weight must be a finite real number, within "
                                        "float32's range"):
        merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                          tmp_path / "out", domain_weight=weight)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("method, message", [
    (Method("ties", t=0.3), "t does not apply to ties"),
    (Method("slerp", domain_density=0.5), "domain_density does not apply to slerp"),
    (Method("task_arithmetic", seed=4), "seed does not apply to task_arithmetic"),
    (Method("ties", base_weight=0.2), "base_weight applies to karcher and linear only"),
])
def test_a_parameter_the_method_does_not_take_is_refused_as_on_the_command_line(
        tiny_trio, tmp_path, method, message):
    with pytest.raises(PlanError, match=message):
        merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                          tmp_path / "out", method=method)


def test_api_values_are_read_as_the_command_line_reads_them(tiny_trio, tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.ones(8)
    assert merge_tensors(x, x * 2, x * 3, out_dtype=torch.float16).dtype == torch.float16
    assert merge_tensors(x, x, x, out_dtype=np.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="torch.int32"):
        merge_tensors(x, x, x, out_dtype=torch.int32)
    trio = (tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"])
    merge_checkpoints(*trio, tmp_path / "text", max_shard_size="100KB", out_dtype="fp16")
    merge_checkpoints(*trio, tmp_path / "int", max_shard_size=100_000, out_dtype=torch.float16)
    assert all_tensors_bytes(tmp_path / "text") == all_tensors_bytes(tmp_path / "int")
    with pytest.raises(ValueError, match="max_shard_size must be a byte count"):
        merge_checkpoints(*trio, tmp_path / "bad", max_shard_size=[1])
    with pytest.raises(PlanError, match="threads must be a whole number of at least 1"):
        merge_checkpoints(*trio, tmp_path / "zero", threads=0)


def test_lambdas_that_differ_past_six_digits_get_their_own_folders(tiny_trio, tmp_path):
    results = sweep_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                                tmp_path / "sweep", [0.1234561, 0.1234562, 0.5])
    names = [r.out_dir.name for r in results]
    assert names == ["lambda-0.1234561", "lambda-0.1234562", "lambda-0.5"]
    assert all(verify_output(r.out_dir) == [] for r in results)


# ---- the command line's own edges -------------------------------------------------------------

def test_ctrl_c_while_loading_is_one_line(monkeypatch, capsys):
    from mergealign_fast.cli import entry

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "mergealign_fast.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "mergealign_fast.cli.main", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    assert entry.main() == entry.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == ("mergealign-fast: interrupted while starting; "
                                               "nothing was done")


def test_a_closed_stdout_does_not_fail_a_finished_merge(tiny_trio, tmp_path):
    out = tmp_path / "out"
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "mergealign_fast",
                                          *map(str, merge_args(tiny_trio, out))])
    proc = subprocess.run(["sh", "-c", command + " >&-"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert verify_output(out) == []
    head = subprocess.run(["sh", "-c", command.replace(str(out), str(tmp_path / "o2"))
                           + " | head -c 0"], capture_output=True, text=True)
    assert head.returncode == 0 and "Traceback" not in head.stderr, head.stderr


def test_verify_checks_the_side_files_and_names_a_missing_folder(tiny_trio, tmp_path):
    out = tmp_path / "out"
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], out)
    recorded = json.loads((out / MANIFEST).read_text())["files"]
    assert "config.json" in recorded and "generation_config.json" in recorded
    (out / "config.json").write_text("garbage")
    [problem] = verify_output(out)
    assert "config.json" in problem and "bytes" in problem
    assert verify_output(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: does not exist"]


def test_inspect_says_when_it_cannot_plot_and_when_cosine_is_undefined(tiny_trio, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from mergealign_fast.cli.main import main;"
            " sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "inspect", tiny_trio["base"],
                           tiny_trio["base"], tiny_trio["aligned"], "-o", tmp_path / "report"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "layers.png not written: matplotlib is not installed" in proc.stderr
    assert "cos = undefined" in proc.stdout
    model = json.loads((tmp_path / "report" / "vectors.json").read_text())["model"]
    assert model["cosine"] is None


def test_a_misspelled_yaml_key_is_suggested_and_the_rest_still_checked(tiny_trio, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_mehtod: ties\nbase_model: {tiny_trio['base']}\n"
                      f"models:\n  - model: {tiny_trio['domain']}\n    parameters: "
                      f"{{weight: 0.5, density: 2}}\n  - model: {tiny_trio['aligned']}\n"
                      "    parameters: {weight: 0.5, density: 0.5}\n")
    proc = cli("run", config, tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert any("unknown key `merge_mehtod`: did you mean `merge_method`?" in l for l in lines)
    assert not any("merge_method None" in l or "merge_method is missing" in l for l in lines)
    assert any("density" in l for l in lines), lines  # the other problem is still found


# ---- NaN and inf are counted and said ---------------------------------------------------------

def nan_trio(root):
    """fp32 models with NaN and inf in the domain model, and values beyond fp16's range."""
    base = {"w": np.linspace(-1, 1, 4096, dtype=np.float32),
            "big": np.full(100, 70000.0, dtype=np.float32)}
    domain = {k: v.copy() for k, v in base.items()}
    domain["w"][[3, 400, 4000]] = [np.nan, np.inf, -np.inf]
    for role, tensors in (("base", base), ("domain", domain), ("aligned", base)):
        write_checkpoint(root / role, tensors, config={"torch_dtype": "float32"})
    return {r: root / r for r in ("base", "domain", "aligned")}


@pytest.mark.parametrize("writer", ["cpu", "gpu writer on the cpu"])
def test_nan_and_inf_in_the_output_are_counted(tmp_path, writer):
    from mergealign_fast.engine.loop import execute
    from mergealign_fast.plan import MergeOptions, plan_merge
    from mergealign_fast.engine.writers.gpu import GpuWriter

    trio = nan_trio(tmp_path)
    plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out",
                      MergeOptions(out_dtype="fp16"))
    gpu = GpuWriter(plan, 1 << 20, backend="cpu", device="cpu") if writer != "cpu" else None
    result = execute(plan, writer=gpu)
    # NaN, inf and -inf stay non-finite; 70000 (and any mix of it) is beyond fp16's 65504
    assert result.nonfinite == {"w": 3, "big": 100}
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["shards"]["model.safetensors"]["nonfinite"] == {"big": 100, "w": 3}


def test_the_command_line_warns_of_nan_and_inf_also_on_resume(tmp_path):
    trio = nan_trio(tmp_path)
    proc = cli(*merge_args(trio, tmp_path / "out", "--dtype", "fp32"))
    assert proc.returncode == 0
    warning = [l for l in proc.stderr.splitlines() if "warning" in l]
    assert len(warning) == 1 and "3 values" in warning[0] and "w: 3" in warning[0]
    again = cli(*merge_args(trio, tmp_path / "out", "--dtype", "fp32", "--resume"))
    assert again.returncode == 0 and "3 values" in again.stderr and "already complete" in \
        again.stdout


def test_a_clean_merge_warns_of_nothing(tiny_trio, tmp_path):
    proc = cli(*merge_args(tiny_trio, tmp_path / "out"))
    assert proc.returncode == 0 and proc.stderr == ""


# ---- buffers the kernels cannot merge ---------------------------------------------------------

def buffers_trio(root, differ: str = ""):
    """fp32 weights plus integer, bool and float64 buffers (position ids, masks, rotary
    frequencies) as transformers models carry them."""
    buffers = {"position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
               "mask": np.tril(np.ones((4, 4), dtype=bool)),
               "inv_freq": 1.0 / 10000 ** (np.arange(0, 8, 2, dtype=np.float64) / 8)}
    for seed, role in enumerate(("base", "domain", "aligned")):
        tensors = {**small_model(seed), **{k: v.copy() for k, v in buffers.items()}}
        if role == "domain" and differ:
            flat = tensors[differ].reshape(-1)
            flat[0] = not flat[0] if flat.dtype == bool else flat[0] + 1
        write_checkpoint(root / role, tensors)
    return {r: root / r for r in ("base", "domain", "aligned")}


def test_identical_buffers_are_copied_through(tmp_path):
    from safetensors.numpy import load_file

    trio = buffers_trio(tmp_path)
    out = tmp_path / "out"
    result = merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out,
                               max_shard_size=200)
    assert result.shards > 1 and verify_output(out) == []
    merged = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(shard))
    base = load_file(trio["base"] / "model.safetensors")
    for name in ("position_ids", "mask", "inv_freq"):
        assert merged[name].dtype == base[name].dtype
        np.testing.assert_array_equal(merged[name], base[name])
    assert merged["embed.weight"].dtype == np.float32


@pytest.mark.parametrize("name, dtype", [("position_ids", "I64"), ("mask", "BOOL")])
def test_buffers_that_differ_are_refused_before_compute(tmp_path, name, dtype):
    trio = buffers_trio(tmp_path, differ=name)
    with pytest.raises(PlanError, match=f"tensor {name} in .*: dtype {dtype} cannot be merged "
                                        ".*these differ"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


# ---- float64 tensors are merged in float64 ----------------------------------------------------

def f64_trio(root):
    rng = np.random.default_rng(7)
    base = rng.standard_normal((33, 7))  # float64
    for offset, role in enumerate(("base", "domain", "aligned")):
        write_checkpoint(root / role, {**small_model(offset),
                                       "scale": base + offset * rng.standard_normal((33, 7))})
    return {r: root / r for r in ("base", "domain", "aligned")}


@pytest.mark.parametrize("method, expected", [
    (Method("task_arithmetic"), lambda b, d, a: b + (0.3 * (d - b) + 0.9 * (a - b))),
    (Method("task_arithmetic", lambda_=0.5, normalize=True),
     lambda b, d, a: b + 0.5 * ((0.3 * (d - b) + 0.9 * (a - b)) / 1.2)),
    (Method("linear", base_weight=0.2),
     lambda b, d, a: (0.2 * b + 0.3 * d + 0.9 * a) / 1.4),
], ids=["task_arithmetic", "lambda-normalize", "linear"])
def test_f64_tensors_that_differ_are_merged_in_float64(tmp_path, method, expected):
    from safetensors.numpy import load_file

    trio = f64_trio(tmp_path)
    out = tmp_path / "out"
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, method=method,
                      domain_weight=0.3, align_weight=0.9)
    b, d, a = (load_file(trio[r] / "model.safetensors")["scale"] for r in trio)
    got = load_file(out / "model.safetensors")["scale"]
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected(b, d, a))  # float64 math, nothing rounded to fp32
    assert verify_output(out) == []


def test_f64_tensors_in_a_sweep_equal_their_single_merges(tmp_path):
    trio = f64_trio(tmp_path)
    results = sweep_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "sweep",
                                [0.25, 0.75])
    for lam, result in zip([0.25, 0.75], results):
        single = tmp_path / f"single-{lam}"
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], single,
                          domain_weight=lam, align_weight=1 - lam)
        assert all_tensors_bytes(result.out_dir) == all_tensors_bytes(single)


def test_f64_tensors_with_a_method_that_needs_passes_are_refused(tmp_path):
    trio = f64_trio(tmp_path)
    with pytest.raises(PlanError, match="tensor scale is F64 in every model: it is merged "
                                        "in float64 by linear, task_arithmetic only, not ties"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out",
                          method=Method("ties", domain_density=0.5))


def test_resume_on_a_complete_output_clears_what_duplicates_it_and_keeps_other_work(
        tiny_trio, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = partial_dir_for(out)
    assert cli(*merge_args(tiny_trio, out)).returncode == 0
    shutil.copytree(out, partial)  # a --force swap killed before the old copy was deleted
    done = cli(*merge_args(tiny_trio, out, "--resume"))
    assert done.returncode == 0 and "already complete" in done.stdout and not partial.exists()
    interrupt_after_first_shard(tiny_trio, out.parent / "other", monkeypatch, domain_weight=0.3)
    shutil.move(partial_dir_for(out.parent / "other"), partial)  # another merge's work
    kept = cli(*merge_args(tiny_trio, out, "--resume"))
    assert kept.returncode == 0 and partial.exists()
    assert "holds an interrupted merge of other inputs or options" in kept.stderr


def test_an_interrupt_wrapped_by_class_creation_is_still_an_interrupt(monkeypatch, capsys):
    """A SIGTERM that lands while an import creates a dataclass reaches us as a RuntimeError
    whose cause is the interrupt (Python 3.11): still one line, exit 143 (found by the torture
    test)."""
    from mergealign_fast.cli import entry

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "mergealign_fast.cli.main":
                try:
                    raise entry.Terminated()
                except entry.Terminated as exc:
                    raise RuntimeError("Error calling __set_name__") from exc
            return None

    monkeypatch.delitem(sys.modules, "mergealign_fast.cli.main", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert entry.main([]) == entry.EXIT_TERMINATED
    assert "interrupted while starting" in capsys.readouterr().err


def test_a_merge_starting_while_another_publishes_cannot_clear_its_folder(tiny_trio, tmp_path,
                                                                         monkeypatch):
    """Publishing renames the locked partial folder to OUT.  A merge that opened the folder just
    before takes the lock once it is released, finds the path now names another folder, and
    locks a new one instead of clearing the published model (found by the torture test)."""
    import fcntl

    from mergealign_fast import output

    partial = partial_dir_for(tmp_path / "out")
    partial.mkdir()
    (partial / "model.safetensors").write_text("the model being published")
    real_flock = fcntl.flock

    def publish_in_between(fd, operation):  # the other merge renames its folder right here
        if (tmp_path / "out").exists() is False and partial.exists():
            os.rename(partial, tmp_path / "out")
        return real_flock(fd, operation)

    monkeypatch.setattr(output.fcntl, "flock", publish_in_between)
    fd = output.lock_folder(partial, make=True)
    try:
        assert os.fstat(fd).st_ino == os.stat(partial).st_ino  # a new, empty folder
        assert list(partial.iterdir()) == []
        assert (tmp_path / "out" / "model.safetensors").exists()  # the published one untouched
    finally:
        os.close(fd)
