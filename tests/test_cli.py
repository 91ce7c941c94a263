"""The command line as a user runs it: exit codes, one-line errors, no tracebacks."""

import os
import subprocess
import sys

import pytest

from conftest import small_model, write_checkpoint


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mergealign_fast", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=300)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("mergealign-fast: error: ") for line in lines)
    for fragment in fragments:
        assert fragment in proc.stderr


def test_merge_prints_a_summary(tiny_trio, tmp_path):
    proc = run_cli("merge", tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                   "-o", tmp_path / "out", "--domain-weight", "0.7", "--align-weight", "0.4",
                   "--max-shard-size", "100KB", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "merged 21 tensors into" in proc.stdout and str(tmp_path / "out") in proc.stdout
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert proc.stderr == ""


def test_progress_goes_to_stderr(tiny_trio, tmp_path):
    proc = run_cli("merge", tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                   "-o", tmp_path / "out")
    assert proc.returncode == 0 and "merging [" in proc.stderr and "100.0%" in proc.stderr


def test_shape_mismatch_exits_2_with_one_line(tmp_path):
    for seed, role in enumerate(("base", "domain", "aligned")):
        write_checkpoint(tmp_path / role, small_model(seed, vocab=40 if role == "domain" else 32))
    proc = run_cli("merge", tmp_path / "base", tmp_path / "domain", tmp_path / "aligned",
                   "-o", tmp_path / "out")
    assert_clean_error(proc, "embed.weight", "domain has 8 extra rows")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--dtype", "int4", "unknown dtype 'int4'"),
    ("--max-shard-size", "lots", "cannot read size 'lots'"),
    ("--threads", "0", "--threads must be at least 1"),
])
def test_bad_options_are_clear_errors(tiny_trio, tmp_path, flag, value, message):
    proc = run_cli("merge", tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                   "-o", tmp_path / "out", flag, value)
    assert_clean_error(proc, message)


def test_missing_folder(tmp_path):
    proc = run_cli("merge", tmp_path / "nope", tmp_path / "nope", tmp_path / "nope",
                   "-o", tmp_path / "out")
    assert_clean_error(proc, "base: ", "not a directory")


def test_env_lists_backends():
    proc = run_cli("env")
    assert proc.returncode == 0
    assert "backend cpu    available" in proc.stdout and "code path" in proc.stdout


@pytest.mark.slow
def test_demo_merges_and_checks_the_built_in_example(tmp_path):
    proc = run_cli("demo", "--quiet", env={"MERGEALIGN_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "oracle   PASS" in proc.stdout and "peak RSS" in proc.stdout
    assert (tmp_path / "demo-llama-156m-v1" / "merged" / "model.safetensors").exists()


def test_demo_trained_outside_a_source_checkout_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """The miniature experiment is research code in examples/, not installed with the package."""
    from mergealign_fast.cli import main as cli
    from mergealign_fast.tools import demo

    monkeypatch.setattr(demo, "__file__", str(tmp_path / "site-packages" / "pkg" / "demo.py"))
    assert cli.main(["demo", "--trained", "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "examples/miniature" in err[0] and "not installed" in err[0]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["merge", "sweep"])
def test_ray_flag_without_ray_installed_is_one_line_saying_what_to_install(
        tiny_trio, tmp_path, command):
    missing = tmp_path / "no-ray"  # a `ray` that fails to import, as an absent one does
    (missing / "ray").mkdir(parents=True)
    (missing / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")")
    extra = ["--lambdas", "0,1"] if command == "sweep" else []
    proc = run_cli(command, tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                   "-o", tmp_path / "out", *extra, "--ray", env={"PYTHONPATH": str(missing)})
    assert_clean_error(proc, "pip install 'mergealign-fast[ray]'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_ray_address_nothing_answers_on_is_one_line_not_a_hang(tiny_trio, tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("merge", tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                   "-o", tmp_path / "out", "--ray", f"127.0.0.1:{port}")
    assert_clean_error(proc, f"--ray 127.0.0.1:{port}: nothing answers there")
    assert not (tmp_path / "out").exists()
