"""Merges larger than the page cache, cold: ours beside the storage floors, in one run.

    python benches/cold_trio.py [--rounds 2] [--variants advise,read,off] [--vs-mergekit]
                                [--json OUT.json]

The trio is Llama-3.2-3B-shaped bf16 (3 x 7.2 GB; with the 7.2 GB output, more than a 24 GiB
machine's page cache), generated once under the bench cache.  Before every measurement the page
cache is written back and dropped (root: /proc/sys/vm/drop_caches; without root the script says
so and stops).  Floors, measured in the same rounds: `cat` of the three inputs (read), `dd` of
the output's size (write, with and without fsync), and both at the same time.  Ours: the CLI
merge with --no-fsync and with fsync, once per read-ahead variant (MERGEALIGN_READ_AHEAD), with
its peak RSS.  Each round runs every row in the same order; the table shows each row's best and
worst round and its ratio to the matching floor.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import drop_file, machine_line  # noqa: E402

from mergealign_fast.tools.bench import can_drop_caches, drop_caches  # noqa: E402
from mergealign_fast.tools.demo import default_cache_dir  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_3B, ensure_synthetic_trio  # noqa: E402

MIB = 1 << 20


def timed_child(argv, env=None, stderr=None) -> tuple:
    """(seconds, peak RSS in MB, GB it read from the disk) of one child process (and the
    children it waited for)."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{argv[0]} failed (status {status})")
    return seconds, usage.ru_maxrss / 1024, usage.ru_inblock * 512 / 1e9


def inputs_of(trio: dict) -> list:
    return [str(p) for folder in trio.values() for p in sorted(folder.glob("*.safetensors"))]


def output_bytes(trio: dict) -> int:
    return sum(p.stat().st_size for p in trio["base"].glob("*.safetensors"))


def read_floor(trio, _out) -> tuple:
    return timed_child(["sh", "-c", "cat " + " ".join(inputs_of(trio)) + " > /dev/null"])


def parallel_read_command(trio) -> str:
    """One `cat` per model at once: three streams, as the merge reads them (one `cat` alone
    keeps too few requests in flight to reach this disk's speed)."""
    return " ".join(f"cat {folder}/*.safetensors > /dev/null &" for folder in trio.values())


def parallel_read_floor(trio, _out) -> tuple:
    return timed_child(["sh", "-c", parallel_read_command(trio) + " wait"])


def write_command(out: Path, nbytes: int, fsync: bool) -> str:
    return (f"dd if=/dev/zero of={out} bs=1M count={nbytes // MIB} status=none"
            + (" conv=fsync" if fsync else ""))


def write_floor(fsync: bool):
    def run(trio, out):
        return timed_child(["sh", "-c", write_command(out, output_bytes(trio), fsync)])
    return run


def read_and_write_floor(fsync: bool):
    def run(trio, out):
        both = (parallel_read_command(trio) + " "
                + write_command(out, output_bytes(trio), fsync) + "; wait")
        return timed_child(["sh", "-c", both])
    return run


def ours(variant: str, fsync: bool, method=()):
    """variant: a MERGEALIGN_READ_AHEAD mode, optionally with a depth: advise:256MiB."""
    mode, _, depth = variant.partition(":")
    method = list(method)

    def run(trio, out):
        env = {**os.environ, "MERGEALIGN_READ_AHEAD": mode}
        if depth:
            env["MERGEALIGN_READ_AHEAD_BYTES"] = depth
        argv = [sys.executable, "-m", "mergealign_fast", "merge", str(trio["base"]),
                str(trio["domain"]), str(trio["aligned"]), "-o", str(out), "--quiet"]
        return timed_child(argv + method + ([] if fsync else ["--no-fsync"]), env)
    return run


def mergekit(trio, out) -> tuple:
    config = out.parent / "cold-mergekit.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {trio['base']}\nmodels:\n"
        f"  - model: {trio['domain']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {trio['aligned']}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
    # The synthetic trio has no tokenizer; mergekit's progress bars would flood the log.
    return timed_child([str(Path(sys.executable).parent / "mergekit-yaml"), str(config), str(out),
                        "--no-copy-tokenizer"], stderr=subprocess.DEVNULL)


def rows_to_run(variants, vs_mergekit: bool) -> dict:
    rows = {
        "floor: read inputs (cat)": (read_floor, None),
        "floor: read inputs (3 cats at once)": (parallel_read_floor, None),
        "floor: write output (dd)": (write_floor(False), None),
        "floor: write output + fsync": (write_floor(True), None),
        "floor: 3 cats + write at once": (read_and_write_floor(False), None),
        "floor: 3 cats + write + fsync at once": (read_and_write_floor(True), None),
    }
    for mode in variants:
        rows[f"ours {mode} --no-fsync"] = (ours(mode, False), "floor: 3 cats + write at once")
        rows[f"ours {mode} (fsync)"] = (ours(mode, True), "floor: 3 cats + write + fsync at once")
    rows["ours advise, TIES d=0.3 --no-fsync"] = (
        ours("advise", False, ["--method", "ties", "--density", "0.3"]),
        "floor: 3 cats + write at once")
    if vs_mergekit:
        rows["mergekit 0.1.5"] = (mergekit, "floor: 3 cats + write at once")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="advise,off",
                        help="MERGEALIGN_READ_AHEAD values to measure (advise, read, off)")
    parser.add_argument("--vs-mergekit", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not can_drop_caches():
        print("cold_trio: needs root to drop the page cache; not measured")
        return 0
    cache = Path(os.environ.get("MERGEALIGN_BENCH_CACHE", default_cache_dir()))
    trio = ensure_synthetic_trio(cache / "bench-llama-3b-v1", LLAMA_3B, max_shard_size=5 * 10**9)
    out = cache / "cold-out"
    rows = rows_to_run(args.variants.split(","), args.vs_mergekit)
    results = {name: {"seconds": [], "peak_rss_mb": [], "disk_read_gb": []} for name in rows}
    print(machine_line(), flush=True)
    for round_ in range(args.rounds):
        for name, (run, _) in rows.items():
            drop_file(out)
            drop_caches()
            seconds, rss, read = run(trio, out)
            results[name]["seconds"].append(seconds)
            results[name]["peak_rss_mb"].append(rss)
            results[name]["disk_read_gb"].append(read)
            print(f"round {round_ + 1}  {name:38s} {seconds:7.2f} s  peak RSS {rss:7.0f} MB  "
                  f"read from disk {read:6.1f} GB", flush=True)
    drop_file(out)
    print()
    for name, (_, floor) in rows.items():
        times = results[name]["seconds"]
        ratio = (f"  {min(times) / min(results[floor]['seconds']):.2f}x {floor[7:]}"
                 if floor else "")
        print(f"{name:38s} best {min(times):7.2f} s  worst {max(times):7.2f} s{ratio}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
