"""Inputs from where users keep them: the 1.1B trio merged from PyTorch .bin shards beside the same
merge from safetensors (rows alternating, warm), and what planning a merge of three remote repos
reads from a local Hub server before the check passes.

    python benches/bin_and_hub_inputs.py [--rounds 5] [--json OUT.json]

Targets (issue "Models from where users keep them"): .bin within 1.15x the safetensors time at
the same peak RSS (<= 256 MB); planning reads under 1 MB per shard.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# huggingface_hub reads these when it is imported: the local server's address is set below,
# before the plan imports it.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="bench-hf-home-")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from cold_trio import timed_child  # noqa: E402
from conftest import drop_file, machine_line  # noqa: E402

from mergealign_fast.tools.demo import default_cache_dir  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio  # noqa: E402

BIN_SHARDS = 2  # a sharded .bin with its index, as older fine-tunes ship them


def as_bin_trio(trio: dict, root: Path) -> dict:
    """Each model re-saved by torch.save into BIN_SHARDS pytorch_model-*.bin (built once)."""
    import torch
    from safetensors.torch import load_file

    folders = {role: root / role for role in trio}
    if (root / "COMPLETE").exists():
        return folders
    for role, source in trio.items():
        folder = folders[role]
        folder.mkdir(parents=True, exist_ok=True)
        for side in source.glob("*.json"):
            (folder / side.name).write_bytes(side.read_bytes())
        state = load_file(source / "model.safetensors")
        names, weight_map = list(state), {}
        per_shard = -(-len(names) // BIN_SHARDS)
        for i in range(BIN_SHARDS):
            shard = f"pytorch_model-{i + 1:05d}-of-{BIN_SHARDS:05d}.bin"
            part = {n: state[n] for n in names[i * per_shard:(i + 1) * per_shard]}
            torch.save(part, folder / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
        del state
    (root / "COMPLETE").write_text("done\n")
    return folders


def merge_row(trio: dict, out: Path):
    """(seconds, peak RSS in MB) of one warm merge.  GNU time measures the RSS: a child forked
    from this process would start from this process's peak (fork copies the page tables)."""
    argv = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "mergealign_fast", "merge",
            str(trio["base"]), str(trio["domain"]), str(trio["aligned"]), "-o", str(out),
            "--quiet", "--no-fsync"]

    def run():
        for folder in trio.values():  # warm: the inputs in the page cache
            timed_child(["sh", "-c", f"cat {folder}/* > /dev/null"])
        drop_file(out)
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        seconds, kilobytes = done.stderr.split()[-2:]
        return float(seconds), int(kilobytes) / 1024
    return run


def planning_reads(trio: dict, bins: dict) -> dict:
    """Bytes the local Hub server sent per weight file while a merge of three remote repos was
    planned (safetensors, then .bin)."""
    from hub_server import LocalHub

    hub = LocalHub()
    os.environ["HF_ENDPOINT"] = hub.start()
    from mergealign_fast.plan import plan_merge

    found = {}
    for kind, folders in (("safetensors", trio), ("bin", bins)):
        for role, folder in folders.items():
            hub.add_repo(f"bench-{kind}/{role}", folder)
        before = dict(hub.bytes_sent)
        plan_merge(*(f"bench-{kind}/{r}" for r in folders), Path(tempfile.mkdtemp()) / "out")
        sent = {f"{repo}/{name}": n - before.get((repo, name), 0)
                for (repo, name), n in hub.bytes_sent.items()
                if name.endswith((".safetensors", ".bin")) and repo.startswith(f"bench-{kind}")}
        sizes = [(folders[k.split("/")[1]] / k.split("/")[2]).stat().st_size for k in sent]
        found[kind] = {"per_file": sent, "max_bytes": max(sent.values()),
                       "file_bytes": min(sizes)}
    hub.stop()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--convert-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    trio = ensure_synthetic_trio(default_cache_dir() / "bench-llama-1.1b-v1", LLAMA_1B)
    bin_root = default_cache_dir() / "bench-llama-1.1b-bin-v1"
    if args.convert_only:
        as_bin_trio(trio, bin_root)
        return 0
    # Converted in a child: a child's peak RSS starts from its parent's at fork, so this
    # process must never hold a model.
    timed_child([sys.executable, __file__, "--convert-only"])
    bins = as_bin_trio(trio, bin_root)
    out = default_cache_dir() / "bin-bench-out"
    rows = {"ours, safetensors inputs": merge_row(trio, out),
            "ours, .bin inputs (2 shards each)": merge_row(bins, out)}
    results = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():  # alternating: the VM's drift hits both alike
            results[name].append(run())
    drop_file(out)
    print(machine_line())
    median = {}
    for name, samples in results.items():
        seconds = statistics.median(s for s, _ in samples)
        rss = max(r for _, r in samples)
        median[name] = seconds
        print(f"{name:36s} median {seconds:6.2f} s  (min {min(s for s, _ in samples):.2f}, "
              f"max {max(s for s, _ in samples):.2f})  peak RSS {rss:6.1f} MB")
    first, second = median.values()
    print(f".bin / safetensors time: {second / first:.3f}x (median of {args.rounds} rounds)")
    reads = planning_reads(trio, bins)
    for kind, found in reads.items():
        print(f"planning 3 remote repos ({kind}): at most {found['max_bytes']:,} bytes read per "
              f"weight file of {found['file_bytes']:,}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "planning": reads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
