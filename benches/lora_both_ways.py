"""LoRA both ways on the 1.1B trio: MergeAlign with a rank-64 LoRA expert on every projection
beside the plain merge (rows alternating, warm, --no-fsync), and extract-lora of the domain model
at rank 64 beside mergekit 0.1.5's mergekit-extract-lora (time, peak RSS, error at that rank).

    python benches/lora_both_ways.py [--rounds 5] [--no-mergekit] [--json OUT.json]

Targets (issue "LoRA both ways"): the LoRA merge <= 2x the plain merge's time at <= 256 MB RSS;
extraction >= 5x faster than mergekit-extract-lora at <= 1/10 of its RSS.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from cold_trio import timed_child  # noqa: E402
from conftest import drop_file, machine_line  # noqa: E402

from mergealign_fast.tools.demo import default_cache_dir  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio  # noqa: E402

RANK = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(base: Path, folder: Path) -> Path:
    """A PEFT folder with a rank-RANK LoRA (bf16, seeded) on every projection of `base`."""
    import numpy as np

    from mergealign_fast.dtypes import f32_to_bf16_bits
    from mergealign_fast.io.checkpoint import open_checkpoint
    from mergealign_fast.io.safetensors_format import EncodedTensor, encode_header

    if (folder / "COMPLETE").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, loc in sorted(open_checkpoint(base).tensors.items()):
        module = name.rsplit(".", 1)[0]
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        rows, cols = loc.entry.shape
        a = rng.standard_normal((RANK, cols), dtype=np.float32) / np.sqrt(cols)
        b = rng.standard_normal((rows, RANK), dtype=np.float32) * 1e-3
        for part, value in (("lora_A", a), ("lora_B", b)):
            tensors[f"base_model.model.{module}.{part}.weight"] = f32_to_bf16_bits(value)
    names = sorted(tensors)
    header, _ = encode_header([EncodedTensor(n, "BF16", tensors[n].shape, tensors[n].nbytes)
                               for n in names])
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(header)
        for n in names:
            f.write(tensors[n].tobytes())
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": list(PROJECTIONS),
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}, indent=2))
    (folder / "COMPLETE").write_text("done\n")
    return folder


def timed(argv, warm=()):
    """(seconds, peak RSS in MB) of a command, measured by GNU time (a child forked from this
    process would start from this process's peak), inputs warm in the page cache."""
    for folder in warm:
        timed_child(["sh", "-c", f"cat {folder}/*.safetensors > /dev/null"])
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *argv], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    seconds, kilobytes = done.stderr.split()[-2:]
    return float(seconds), int(kilobytes) / 1024


def merge_rows(trio: dict, adapter: Path, out: Path, rounds: int) -> dict:
    ours = [sys.executable, "-m", "mergealign_fast", "merge"]
    rows = {
        "plain merge (base, domain, aligned)":
            [*ours, str(trio["base"]), str(trio["domain"]), str(trio["aligned"])],
        f"LoRA expert (base, base+rank-{RANK} adapter, aligned)":
            [*ours, str(trio["base"]), f"{trio['base']}+{adapter}", str(trio["aligned"])],
    }
    results = {name: [] for name in rows}
    for _ in range(rounds):
        for name, argv in rows.items():  # alternating: the VM's drift hits both alike
            drop_file(out)
            results[name].append(timed([*argv, "-o", str(out), "--quiet", "--no-fsync"],
                                       warm=[*trio.values(), adapter]))
    drop_file(out)
    return results


def errors_of(adapter: Path, model: Path, base: Path) -> list:
    """‖τ − B·A‖ / ‖τ‖ of each lora module of an adapter folder (read back from its files)."""
    import numpy as np

    from mergealign_fast.dtypes import bf16_bits_to_f32
    from mergealign_fast.io.checkpoint import TensorLocation, open_checkpoint, read_elements
    from mergealign_fast.io.safetensors_format import read_header
    from mergealign_fast.tools.low_rank import relative_error

    def f32(loc):
        raw = read_elements(loc)
        raw = bf16_bits_to_f32(raw) if loc.entry.dtype == "BF16" else raw
        return raw.astype(np.float32).reshape(loc.entry.shape)

    path = adapter / "adapter_model.safetensors"
    saved = {n: TensorLocation(path, e) for n, e in read_header(path).tensors.items()}
    models = open_checkpoint(model).tensors, open_checkpoint(base).tensors
    found = []
    for key in sorted(k for k in saved if k.endswith("lora_A.weight")):
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        tau = f32(models[0][module + ".weight"]) - f32(models[1][module + ".weight"])
        b = f32(saved[key.replace("lora_A", "lora_B")])
        found.append(relative_error(tau, b, f32(saved[key])))
    return found


def extraction_rows(trio: dict, root: Path, with_mergekit: bool) -> dict:
    rows = {}
    ours = root / "ours"
    shutil.rmtree(ours, ignore_errors=True)
    rows["ours: extract-lora"] = timed(
        [sys.executable, "-m", "mergealign_fast", "extract-lora", str(trio["domain"]),
         str(trio["base"]), "-o", str(ours), "--max-rank", str(RANK), "--quiet", "--no-fsync"],
        warm=[trio["domain"], trio["base"]]) + (ours,)
    if with_mergekit:
        theirs = root / "mergekit"
        shutil.rmtree(theirs, ignore_errors=True)
        tool = Path(sys.executable).parent / "mergekit-extract-lora"
        rows["mergekit 0.1.5: mergekit-extract-lora"] = timed(
            [str(tool), "--model", str(trio["domain"]), "--base-model", str(trio["base"]),
             "--out-path", str(theirs), "--max-rank", str(RANK)],
            warm=[trio["domain"], trio["base"]]) + (theirs,)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--errors", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.errors:  # in a child: this process must never hold a model
        print(json.dumps(errors_of(*args.errors)))
        return 0
    trio = ensure_synthetic_trio(default_cache_dir() / "bench-llama-1.1b-v1", LLAMA_1B)
    adapter = write_adapter(trio["base"], default_cache_dir() / "bench-lora-r64-v1")
    root = default_cache_dir() / "lora-bench-out"
    root.mkdir(exist_ok=True)
    print(machine_line())
    merges = merge_rows(trio, adapter, root / "merged", args.rounds)
    medians = {}
    for name, samples in merges.items():
        medians[name] = statistics.median(s for s, _ in samples)
        print(f"{name:52s} median {medians[name]:6.2f} s (min {min(s for s, _ in samples):.2f},"
              f" max {max(s for s, _ in samples):.2f})  peak RSS "
              f"{max(r for _, r in samples):6.1f} MB")
    plain, lora = medians.values()
    print(f"LoRA expert / plain merge time: {lora / plain:.2f}x (median of {args.rounds} rounds)")
    extractions = extraction_rows(trio, root, not args.no_mergekit)
    found = {}
    for name, (seconds, rss, folder) in extractions.items():
        child = subprocess.run([sys.executable, __file__, "--errors", str(folder),
                                str(trio["domain"]), str(trio["base"])],
                               capture_output=True, text=True, check=True)
        errors = json.loads(child.stdout)
        found[name] = {"seconds": seconds, "peak_rss_mb": rss, "modules": len(errors),
                       "mean_error": statistics.mean(errors), "max_error": max(errors)}
        print(f"{name:40s} {seconds:7.1f} s  peak RSS {rss:8.1f} MB  {len(errors)} modules at "
              f"rank {RANK}: relative error mean {found[name]['mean_error']:.5f}, max "
              f"{found[name]['max_error']:.5f}")
    if len(found) == 2:
        (ours, theirs) = found.values()
        print(f"extraction: mergekit / ours time {theirs['seconds'] / ours['seconds']:.1f}x, "
              f"ours / mergekit RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"merges": merges, "extractions": found}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
