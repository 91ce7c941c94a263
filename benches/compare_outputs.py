"""Two builds of mergealign-fast on one grid of merges: are their outputs bitwise the same?

    python benches/compare_outputs.py OLD_TREE NEW_TREE [--work DIR]

Each tree is a source checkout with its native extension built in place
(`python setup.py build_ext --inplace`), e.g. `git worktree add /tmp/old <commit>`.  The
inputs (tiny Llama-shaped models in bf16, fp16 and fp32, a base with four fine-tunes, and
sharded copies) are written once; then every merge of the grid runs through the command line of
each tree in turn, in a child process with that tree first on sys.path, and the SHA-256 of
every file each output holds (the manifest, which records the version and the time, aside) is
compared.  The grid: every method of the command line on every dtype (with the flags each
takes), mergekit configs (model sets, slices, gradients and filters, passthrough), model-set
merges through the Python API, and sweeps.  Exit 1 when any output differs, naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# `python -m mergealign_fast` of the tree (the same in every layout the package has had).
CLI = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[1:]; "
       "runpy.run_module('mergealign_fast', run_name='__main__')")
MODELS = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
          "from mergealign_fast import merge_models; "
          "a = json.loads(sys.argv[2]); merge_models(a['base'], [tuple(m) for m in a['models']], "
          "a['out'], method=a['method'], parameters=a['parameters'], fsync=False, force=True)")

# method -> the flags it is merged with on the trio (beyond the weights).
TRIO_METHODS = {
    "task_arithmetic": [], "task_arithmetic --lambda 0.8 --normalize": None,
    "linear": ["--base-weight", "0.2"], "ties": ["--density", "0.4"],
    "dare_linear": ["--density", "0.6", "--seed", "3"], "dare_ties": ["--density", "0.6"],
    "slerp": ["--t", "0.3"], "slerp_vectors": ["--t", "0.6"], "resta": ["--density", "0.7"],
    "chipalign": ["--t", "0.4"], "nuslerp": [], "nuslerp rows": ["--vectors", "rows"],
    "nuslerp columns": ["--vectors", "columns"], "nuslerp_models": [],
    "model_stock": [], "model_stock rows": ["--vectors", "rows"],
    "breadcrumbs": ["--density", "0.8", "--gamma", "0.05"],
    "breadcrumbs_ties": ["--density", "0.8"], "nearswap": ["--t", "0.001"],
    "multislerp": [], "multislerp_models": [], "karcher": ["--base-weight", "0.3"],
    "sce": ["--select-topk", "0.5"], "della": ["--density", "0.6", "--epsilon", "0.1"],
    "della_linear": ["--density", "0.5"], "ram": [], "ramplus_tl": ["--r", "0.2"],
    "arcee_fusion": [],
}
UNWEIGHTED = ("slerp", "slerp_vectors", "chipalign", "model_stock", "nearswap", "sce", "ram",
              "ramplus_tl", "arcee_fusion")
SET_METHODS = ("task_arithmetic", "linear", "ties", "dare_ties", "breadcrumbs_ties",
               "multislerp", "karcher", "model_stock", "sce", "della", "ram", "ramplus_tl")

CONFIGS = {
    "ties-gradient": """
merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.7, density: [0.3, 0.6]}}
  - model: {aligned}
    parameters:
      weight: [{{filter: mlp, value: 0.2}}, {{value: 0.5}}]
      density: 0.5
dtype: bfloat16
""",
    "set-dare": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.3, density: 0.7}}
  - model: {e3}
    parameters: {{weight: 0.2, density: 0.6}}
  - model: {e4}
    parameters: {{weight: 0.2, density: 0.9}}
parameters: {{seed: 5, normalize: true}}
""",
    "linear-no-base": """
merge_method: linear
models:
  - model: {domain}
    parameters: {{weight: 0.4}}
  - model: {aligned}
    parameters: {{weight: 0.6}}
out_dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {domain}}}]
parameters:
  t: [{{filter: self_attn, value: [0, 0.5, 1]}}, {{value: 0.3}}]
""",
    "nuslerp-rows": """
merge_method: nuslerp
models:
  - model: {domain}
    parameters: {{weight: 0.3}}
  - model: {aligned}
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_flatten: false}}
""",
    "passthrough-stack": """
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {domain}, layer_range: [1, 2]}}]
dtype: float16
""",
    "sliced-ties": """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 1]}}
      - {{model: {domain}, layer_range: [0, 1], parameters: {{weight: 0.6, density: 0.5}}}}
      - {{model: {aligned}, layer_range: [1, 2], parameters: {{weight: 0.4, density: 0.5}}}}
  - sources:
      - {{model: {base}, layer_range: [1, 2]}}
      - {{model: {domain}, layer_range: [1, 2], parameters: {{weight: 0.5, density: 0.8}}}}
      - {{model: {aligned}, layer_range: [0, 1], parameters: {{weight: 0.5, density: 0.8}}}}
""",
    "karcher-set": """
merge_method: karcher
base_model: {base}
models: [{{model: {domain}}}, {{model: {aligned}}}, {{model: {e3}}}]
parameters: {{max_iter: 6}}
""",
    "della-set": """
merge_method: della
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}
  - model: {aligned}
    parameters: {{weight: 0.3, density: 0.6}}
  - model: {e3}
    parameters: {{weight: 0.2, density: 0.7}}
parameters: {{lambda: 0.9}}
""",
}


def build_inputs(work: Path) -> dict:
    """{name: folder} of the grid's models, written by the tree on sys.path (the new one)."""
    from mergealign_fast.dtypes import DType
    from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio

    roles = ("base", "domain", "aligned", "e3", "e4")
    found = {}
    for dtype in (DType.BF16, DType.F16, DType.F32):
        made = ensure_synthetic_trio(work / f"in-{dtype.short_name}", LLAMA_TINY, seed=3,
                                     dtype=dtype, roles=roles)
        found.update({f"{dtype.short_name}/{r}": f for r, f in made.items()})
    sharded = ensure_synthetic_trio(work / "in-bf16-sharded", LLAMA_TINY, seed=4,
                                    max_shard_size=60_000)
    found.update({f"sharded/{r}": f for r, f in sharded.items()})
    return found


def jobs(inputs: dict, work: Path):
    """(name, argv for the child after the tree) of every merge of the grid."""
    for dtype in ("bf16", "fp16", "fp32"):
        trio = [str(inputs[f"{dtype}/{r}"]) for r in ("base", "domain", "aligned")]
        for label, flags in TRIO_METHODS.items():
            method = label.split()[0]
            flags = ["--lambda", "0.8", "--normalize"] if flags is None else flags
            weights = [] if method in UNWEIGHTED else ["--domain-weight", "0.6",
                                                       "--align-weight", "0.3"]
            if method == "resta":  # the expert is kept whole: only β, the alignment weight
                weights = ["--align-weight", "0.3"]
            yield (f"merge {dtype} {label}", [CLI, "merge", *trio, "-o", "{out}", "--method",
                                              method, *weights, *flags, "--no-fsync",
                                              "--quiet", "--max-shard-size", "300KB"])
        yield (f"merge {dtype} --dtype fp16", [CLI, "merge", *trio, "-o", "{out}", "--dtype",
                                               "fp16", "--no-fsync", "--quiet"])
        yield (f"sweep {dtype} ties", [CLI, "sweep", *trio, "-o", "{out}", "--lambdas",
                                       "0,0.4,1", "--method", "ties", "--density", "0.5",
                                       "--no-fsync", "--quiet"])
    sharded = [str(inputs[f"sharded/{r}"]) for r in ("base", "domain", "aligned")]
    yield ("merge sharded ties", [CLI, "merge", *sharded, "-o", "{out}", "--method", "ties",
                                  "--density", "0.3", "--no-fsync", "--quiet"])
    names = {r: inputs[f"fp32/{r}"] for r in ("base", "domain", "aligned", "e3", "e4")}
    for label, text in CONFIGS.items():
        path = work / f"{label}.yml"
        path.write_text(text.format(**names))
        yield (f"run {label}", [CLI, "run", str(path), "{out}", "--no-fsync", "--quiet"])
    import json

    models = [[str(names[r]), {"weight": w, "density": d}]
              for r, w, d in (("domain", 0.4, 0.5), ("aligned", 0.3, 0.6), ("e3", 0.2, 0.7),
                              ("e4", 0.1, 0.8))]
    for method in SET_METHODS:
        per_model = [[m, {k: v for k, v in p.items() if k != "density" or method in
                          ("ties", "dare_ties", "breadcrumbs_ties", "della")}]
                     for m, p in models]
        if method in ("model_stock", "sce", "ram", "ramplus_tl"):
            per_model = [[m, {}] for m, _ in models]
        parameters = {"seed": 2} if method == "dare_ties" else {}
        yield (f"models {method}", [MODELS, json.dumps({
            "base": str(names["base"]), "models": per_model, "out": "{out}", "method": method,
            "parameters": parameters})])


def digests(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder but the manifests."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "manifest" not in p.name}


def run_job(tree: Path, argv, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    code, *rest = argv
    rest = [a.replace("{out}", str(out)) for a in rest]
    done = subprocess.run([sys.executable, "-c", code, str(tree), *rest], capture_output=True,
                          text=True)
    if done.returncode != 0:
        # The last line: a traceback's other lines name the tree's own paths.
        return {"exit": str(done.returncode), "stderr": done.stderr.strip().splitlines()[-1:]}
    return digests(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="compare-outputs-"))
    sys.path.insert(0, str(args.new.resolve()))
    inputs = build_inputs(work)
    differ, count = [], 0
    for name, argv in jobs(inputs, work):
        # One output folder for both: the model card names it.
        found = {label: run_job(tree.resolve(), argv, work / "out")
                 for label, tree in (("old", args.old), ("new", args.new))}
        count += 1
        same = found["old"] == found["new"]
        files = len(found["new"])
        failed = "exit" in found["new"]
        print(f"{'same' if same else 'DIFFERENT':9s} {name} "
              f"({'FAILED in both' if failed and same else f'{files} files'})", flush=True)
        if not same:
            differ.append(name)
            for label in ("old", "new"):
                print(f"    {label}: {found[label]}")
    print(f"{count - len(differ)} of {count} merges bitwise the same")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
