"""Warm merges beside their floors, and what a page the machine never touched costs.

    python benches/warm_trio.py [--rounds 5] [--json OUT.json]

The 1.1B-parameter bf16 trio (3 x 2.2 GB) in the page cache, output 2.2 GB.  Before each row the
previous output is removed, dirty pages written back and the inputs read once (warm).  Rows, in
the same order every round: `cat` of the inputs; the output's size written by `dd` (no fsync);
both at once; ours `--no-fsync`; and a probe that touches the output's size of fresh anonymous
memory, once and again.  On a virtual machine whose free memory is handed back to the host
(free page reporting, a balloon), the first write to such a page faults in the host: the probe
says what that costs at the moment, and why a merge's (and `dd`'s) writes into new page-cache
pages vary run to run where a `cat` of cached pages does not.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_trio import (inputs_of, ours, read_and_write_floor, read_floor,  # noqa: E402
                       write_floor)
from conftest import drop_file, machine_line  # noqa: E402

from mergealign_fast.tools.demo import default_cache_dir  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio  # noqa: E402

TOUCH = """
import mmap, sys, time
size = int(sys.argv[1])
memory = mmap.mmap(-1, size)
for label in ("first", "again"):
    started = time.perf_counter()
    for offset in range(0, size, mmap.PAGESIZE):
        memory[offset] = 1
    print(label, time.perf_counter() - started)
"""


def fresh_page_probe(nbytes: int) -> dict:
    """Seconds to touch nbytes of new anonymous memory, then the same pages again."""
    out = subprocess.run([sys.executable, "-c", TOUCH, str(nbytes)], check=True,
                         capture_output=True, text=True).stdout.split()
    return {out[0]: float(out[1]), out[2]: float(out[3])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trio = ensure_synthetic_trio(default_cache_dir() / "bench-llama-1.1b-v1", LLAMA_1B)
    out = default_cache_dir() / "warm-out"
    nbytes = sum(p.stat().st_size for p in trio["base"].glob("*.safetensors"))
    rows = {"floor: read inputs (cat)": read_floor,
            "floor: write output (dd)": write_floor(False),
            "floor: 3 cats + write at once": read_and_write_floor(False),
            "ours --no-fsync": ours("advise", False)}
    results = {name: [] for name in [*rows, "probe: touch new memory", "probe: touch again"]}
    print(machine_line(), flush=True)
    for round_ in range(args.rounds):
        for name, run in rows.items():
            drop_file(out)
            subprocess.run(["sync"], check=True)
            subprocess.run(["sh", "-c", "cat " + " ".join(inputs_of(trio)) + " > /dev/null"],
                           check=True)
            seconds = run(trio, out)[0]
            results[name].append(seconds)
            print(f"round {round_ + 1}  {name:32s} {seconds:6.2f} s", flush=True)
        probe = fresh_page_probe(nbytes)
        results["probe: touch new memory"].append(probe["first"])
        results["probe: touch again"].append(probe["again"])
        print(f"round {round_ + 1}  probe: touch {nbytes / 1e9:.1f} GB new memory "
              f"{probe['first']:6.2f} s, again {probe['again']:6.2f} s", flush=True)
    drop_file(out)
    print()
    floor = min(results["floor: read inputs (cat)"])
    for name, times in results.items():
        print(f"{name:32s} best {min(times):6.2f} s  worst {max(times):6.2f} s  "
              f"best {min(times) / floor:4.2f}x cat")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
