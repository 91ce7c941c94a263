"""`mergealign-fast bench --quick`: runs in seconds, prints the table, writes pytest-benchmark
JSON in which every one of our rows stands beside a floor measured in the same run."""

import json
import subprocess
import sys


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", "mergealign_fast", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_quick_bench_json_has_every_ratio_beside_its_floor(tmp_path):
    proc = run_bench("--quick", "--dir", tmp_path / "work", "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert {"machine_info", "benchmarks", "datetime", "version"} <= set(report)
    info = report["machine_info"]
    assert info["code_path"] in ("x86-64-v4", "x86-64-v3", "baseline") and info["cpus"] >= 1
    rows = {b["name"]: b for b in report["benchmarks"]}
    floors = {n for n, b in rows.items() if b["group"] == "floor"}
    ours = [b for b in rows.values() if b["group"] == "ours"]
    assert {"kernel bf16 1t", "kernel fp16 1t", "kernel fp32 1t", "merge (warm)"} <= set(rows)
    for row in ours:
        extra = row["extra_info"]
        assert extra["floor"] in floors, row["name"]
        assert (extra["ratio_to_floor"] or extra["times_floor_time"]) > 0, row["name"]
        assert row["stats"]["min"] > 0 and extra["GB/s"] > 0
    kernel = rows["kernel bf16 1t"]["extra_info"]
    assert kernel["bytes"] == rows["memcpy bf16 1t"]["extra_info"]["bytes"]  # same traffic
    assert "of memcpy bf16 1t" in proc.stdout and info["cpu"] in proc.stdout


def test_bench_refuses_what_it_cannot_do_in_one_line(tmp_path):
    for args, message in ((["--device", "tpu"], "choose cpu or cuda"),
                          (["--threads", "0"], "--threads must be at least 1"),
                          (["--size", "lots"], "cannot read size")):
        proc = run_bench("--quick", "--dir", tmp_path, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
