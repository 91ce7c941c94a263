"""The merge as most people would first write it: safe_open + torch arithmetic + save_file.

A comparison point for the benchmarks, not part of the package.  Holds the whole output in RAM
(save_file needs every tensor at once), as naive scripts and mergekit's writer do.

    python benches/naive_torch_merge.py BASE DOMAIN ALIGNED OUT \
        --domain-weight 0.5 --align-weight 0.5
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def tensor_files(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {n: folder / "model.safetensors" for n in f.keys()}


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("base", "domain", "aligned", "out"):
        p.add_argument(name, type=Path)
    p.add_argument("--domain-weight", type=float, default=0.5)
    p.add_argument("--align-weight", type=float, default=0.5)
    args = p.parse_args()
    files = [tensor_files(args.base), tensor_files(args.domain), tensor_files(args.aligned)]
    merged = {}
    for name, path in files[0].items():
        parts = []
        for f in files:
            with safe_open(f[name], framework="pt") as handle:
                parts.append(handle.get_tensor(name).float())
        b, d, a = parts
        merged[name] = (b + args.domain_weight * (d - b) + args.align_weight * (a - b)).to(
            torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(merged, args.out / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    main()
