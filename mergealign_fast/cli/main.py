"""Command line: `mergealign-fast merge|sweep|run|mergekit-yaml|eval|tune|inspect|verify|
demo|env|bench` (or `python -m mergealign_fast`; entry.py sets up the process first)."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from .. import dtypes
from .._version import __version__
from ..engine.loop import MergeResult, execute_on
from .entry import (EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, interrupt_in,
                    interrupted_while_starting)
from ..errors import MergeError, PlanError
from ..evaluation.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from ..tools.inspect_vectors import inspect_checkpoints, summary, write_reports
from ..kernels import cpu, cuda, describe_backends
from ..output.manifest import verify_output
from ..mergekit.config import load as load_mergekit_config
from ..methods import METHODS, RESCALES, VECTOR_MODES, Method
from ..mergekit.model_card import card_files
from ..output import PARTIAL_SUFFIX, partial_dir_for, resolve_out_dir
from ..plan import ROLES, MergeOptions, parse_size, plan_merge, plan_set
from ..progress import human_bytes
from ..plan.sweep import parse_lambdas, sweep_checkpoints

EXIT_BAD_INPUT = 2


THREADS_HELP = "worker threads (default: every CPU this process may use)"
QUIET_HELP = "no progress bar"


def _add_writing_args(p: argparse.ArgumentParser) -> None:
    """Flags of every command that writes a model: merge, sweep, run."""
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder "
                   "(only once the new model is complete); discard an interrupted merge's "
                   "partial output")
    p.add_argument("--resume", action="store_true", help="finish an interrupted merge into the "
                   "same output, keeping the shards it completed (checked by CRC-32C); on an "
                   "output this merge already completed, verify it and exit 0")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="skip fsync of the output (faster; not durable across power loss)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    _add_ray_arg(p)


def _add_ray_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (needs the ray extra): alone, the Ray instance of this "
                   "machine (started if none runs); with an address, that cluster.  Inputs and "
                   "output must be on storage every node mounts at the same path")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """Options shared by merge and sweep."""
    p.add_argument("base", help="base model folder (Hugging Face layout)")
    p.add_argument("domain", help="domain-expert model folder, fine-tuned from base")
    p.add_argument("aligned", help="aligned/instruct model folder, fine-tuned from base")
    p.add_argument("--dtype", default=None, metavar="{bf16,fp16,fp32}",
                   help="output dtype (default: each tensor keeps the base model's dtype)")
    p.add_argument("--tokenizer-from", default="aligned", choices=[*ROLES, "none"],
                   help="model whose tokenizer, generation and chat-template files (and "
                        "config.json) the output gets (default aligned)")
    p.add_argument("--vocab", default=None, choices=[*ROLES, "union"],
                   help="merge the embedding and output rows by token, for models whose "
                        "vocabularies differ (a domain expert that added tokens): the output "
                        "vocabulary is this model's, or the union of all three (built on the "
                        "base's; the chat template of --tokenizer-from). Default: rows merged "
                        "by index, the tokenizers must number their tokens alike")
    _add_writing_args(p)
    _add_method_args(p)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("merge method (see README: Merge methods)")
    group.add_argument("--method", default="task_arithmetic", choices=list(METHODS),
                       help="default task_arithmetic: MergeAlign's base + w_d τ_d + w_a τ_a")
    group.add_argument("--density", type=float, default=None, metavar="P",
                       help="ties/dare/resta: fraction of each task vector kept (default 1)")
    group.add_argument("--domain-density", type=float, default=None, metavar="P",
                       help="density of τ_d alone")
    group.add_argument("--align-density", type=float, default=None, metavar="P",
                       help="density of τ_a alone")
    group.add_argument("--lambda", dest="lambda_", type=float, default=None, metavar="L",
                       help="task_arithmetic/ties/dare: scale of the combined vector (default 1)")
    group.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                       help="divide by the summed weights (default: on for linear and ties)")
    group.add_argument("--no-normalize", dest="normalize", action="store_false",
                       help="do not divide by the summed weights")
    group.add_argument("--rescale", choices=RESCALES, default=None,
                       help="after dropping: l1 (default for dare, mergekit's), inverse_density "
                            "(1/p, default for resta) or none (default for ties)")
    group.add_argument("--seed", type=int, default=None,
                       help="dare/resta: seed of the random masks (default 0)")
    group.add_argument("--t", type=float, default=None,
                       help="slerp/slerp_vectors/chipalign: 0 = aligned, 1 = domain (default "
                            "0.5); nearswap: the distance within which domain's value is taken")
    group.add_argument("--base-weight", type=float, default=None, metavar="W",
                       help="linear: weight of the base model itself (default 0)")
    group.add_argument("--gamma", type=float, default=None, metavar="G",
                       help="breadcrumbs: fraction of the largest |τ| dropped (default 0.01)")
    group.add_argument("--select-topk", type=float, default=None, metavar="P",
                       help="sce: fraction of elements kept, by variance across the models "
                            "(default 1: all)")
    group.add_argument("--epsilon", type=float, default=None, metavar="E",
                       help="della: the keep probability runs from density - E (smallest |τ| "
                            "of a row) to density + E (largest; default 0.15); ram: the |τ| "
                            "above which a model's change counts (default 1e-5)")
    group.add_argument("--r", type=float, default=None, metavar="R",
                       help="ramplus_tl: unshared changes scaled by up to 1 + R·alpha "
                            "(default 0.1)")
    group.add_argument("--alpha", type=float, default=None, metavar="A",
                       help="ramplus_tl: the cap on the ratio of shared to unshared changes "
                            "(default 0.2)")
    group.add_argument("--vectors", choices=VECTOR_MODES, default=None,
                       help="nuslerp/model_stock: what one vector is: the whole tensor "
                            "(default), each row (last dimension) or column (first dimension)")


# Command-line flag -> the method parameter it sets (methods.METHODS lists what each accepts).
_METHOD_FLAGS = {"density": "density", "domain_density": "density",
                 "align_density": "density", "lambda_": "lambda", "normalize": "normalize",
                 "rescale": "rescale", "seed": "seed", "t": "t", "base_weight": "weight",
                 "domain_weight": "weight", "align_weight": "weight", "gamma": "gamma",
                 "select_topk": "select_topk", "epsilon": "epsilon", "r": "r",
                 "alpha": "alpha"}


def _method_from_args(args: argparse.Namespace):
    """The Method the flags describe; MergeError for a flag the method does not take."""
    accepted = METHODS[args.method].parameters
    problems = [f"--{flag.rstrip('_').replace('_', '-')} does not apply to {args.method} (it "
                f"takes: {', '.join(accepted) or 'nothing'})"
                for flag, parameter in _METHOD_FLAGS.items()
                if getattr(args, flag, None) is not None and parameter not in accepted]
    if args.base_weight is not None and args.method not in ("linear", "karcher"):
        problems.append("--base-weight applies to linear and karcher only")
    if args.method == "resta" and getattr(args, "domain_weight", None) is not None:
        problems.append("--domain-weight does not apply to resta: the expert is kept whole "
                        "(--align-weight is β)")
    if problems:
        raise MergeError("\n".join(dict.fromkeys(problems)))

    def first_given(*values):
        return next((v for v in values if v is not None), None)

    given = {"domain_density": first_given(args.domain_density, args.density),
             "align_density": first_given(args.align_density, args.density),
             "lambda_": args.lambda_, "normalize": args.normalize, "rescale": args.rescale,
             "seed": args.seed, "t": args.t, "base_weight": args.base_weight,
             "gamma": args.gamma, "vectors": args.vectors, "select_topk": args.select_topk,
             "epsilon": args.epsilon, "r": args.r, "alpha": args.alpha}
    # Flags not given keep Method's own defaults (one home for them).
    method = Method(args.method, **{k: v for k, v in given.items() if v is not None})
    problems = method.problems()
    if problems:
        raise MergeError("\n".join(problems))
    return method


def _weights(args: argparse.Namespace):
    """(w_d, w_a): 0.5 each unless given."""
    return (0.5 if args.domain_weight is None else args.domain_weight,
            0.5 if args.align_weight is None else args.align_weight)


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    _add_output_args(p)
    p.add_argument("-o", "--out", required=True, help="output folder (created; see --force)")
    p.add_argument("--domain-weight", type=float, default=None, metavar="W",
                   help="weight of (domain - base) (default 0.5, the paper's equal mix)")
    p.add_argument("--align-weight", type=float, default=None, metavar="W",
                   help="weight of (aligned - base) (default 0.5; resta: β)")
    p.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N to merge "
                   "on a GPU, streaming through a fixed device-memory budget")
    p.add_argument("--gpu-memory", default="2GiB", metavar="SIZE",
                   help="device memory the GPU merge may use, and at most as much pinned "
                   "host memory (default 2GiB; staging is capped at 4 x 64 MiB and at the "
                   "largest tensor)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"],
                   help="GPU kernel (default auto: cuda, then triton)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergealign-fast",
        description="Fused, streaming merges of LLM checkpoints: "
                    "out = base + w_d*(domain - base) + w_a*(aligned - base)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_merge_args(sub.add_parser("merge", help="merge three model folders"))
    sweep = sub.add_parser("sweep", help="one model per λ (w_d = λ, w_a = 1 - λ), reading the "
                           "inputs once")
    _add_output_args(sweep)
    sweep.add_argument("-o", "--out", required=True,
                       help="folder that receives lambda-<λ>/ for each λ")
    sweep.add_argument("--lambdas", required=True, help="comma-separated, e.g. 0,0.25,0.5,0.75,1")
    run = sub.add_parser("run", help="run a mergekit YAML config (models, base_model, "
                         "merge_method, parameters, dtype) through this engine")
    run.add_argument("config", help="mergekit YAML file; model paths are local folders, "
                     "relative to the current directory (as mergekit-yaml reads them)")
    run.add_argument("out", help="output folder (created; see --force)")
    _add_writing_args(run)
    run.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                     help="write README.md (the model card: recipe, models, tool) and "
                     "mergekit_config.yml into the output (default: yes, as mergekit does)")
    _add_mergekit_yaml_args(sub.add_parser(
        "mergekit-yaml", help="mergekit-yaml's command line (CONFIG OUT and its flags) on this "
        "engine: alias mergekit-yaml='mergealign-fast mergekit-yaml'"))
    demo = sub.add_parser("demo", help="build a ~156M-parameter Llama trio, merge it, check it")
    demo.add_argument("--cache-dir", default=None, help="where the demo models live "
                      "(default $MERGEALIGN_CACHE or ~/.cache/mergealign-fast)")
    demo.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    demo.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    demo.add_argument("--trained", action="store_true", help="the miniature MergeAlign "
                      "experiment instead: train a tiny Llama base/expert/aligned trio (once, "
                      "~2 min), merge it and compare answers (needs the showcase extra)")
    inspect = sub.add_parser("inspect", help="norms, cosine and sign conflicts of the domain and "
                             "alignment vectors, per tensor and per layer")
    for role in ("base", "domain", "aligned"):
        inspect.add_argument(role, help=f"{role} model folder")
    inspect.add_argument("-o", "--out", default="mergealign-inspect",
                         help="folder for vectors.json, tensors.csv, layers.csv, layers.png")
    inspect.add_argument("--domain-weight", type=float, default=0.5,
                         help="w_d of the merge whose distances to the parents are reported "
                              "(default 0.5)")
    inspect.add_argument("--align-weight", type=float, default=0.5,
                         help="w_a of that merge (default 0.5)")
    inspect.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    verify = sub.add_parser("verify", help="check a merged folder against its manifest")
    verify.add_argument("out", help="a folder written by mergealign-fast merge")
    sub.add_parser("env", help="print the build and the available backends")
    bench = sub.add_parser("bench", help="this machine's floors (memcpy, disk read and write) "
                           "and our kernel and merge beside them (under a minute)")
    bench.add_argument("--size", default="311MB", metavar="SIZE",
                       help="size of each generated model of the merged trio (default 311MB, "
                            "the demo's; keep it within the page cache for warm rows)")
    bench.add_argument("--quick", action="store_true",
                       help="tiny sizes and one round: seconds, for CI (numbers flattered by "
                            "caches)")
    bench.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    bench.add_argument("--dir", default=None, help="work folder for the generated trio and "
                       "outputs (default: the system temp folder); its file system is measured")
    bench.add_argument("--json", default=None, metavar="PATH",
                       help="also write the results in pytest-benchmark's JSON format")
    bench.add_argument("--vs-mergekit", action="store_true",
                       help="measure mergekit-yaml on the same trio too (when installed)")
    bench.add_argument("--device", default="cpu",
                       help="cpu (default), or cuda to add the GPU rows")
    _add_eval_args(sub.add_parser("eval", help="domain tasks (lm-evaluation-harness) and "
                                  "safety (a judge) of one model folder"))
    tune = sub.add_parser("tune", help="sweep λ, evaluate every merge and the parents, "
                          "recommend a point")
    for role in ("base", "domain", "aligned"):
        tune.add_argument(role, help=f"{role} model folder")
    tune.add_argument("-o", "--out", required=True, help="folder for the results (reruns "
                      "resume in it)")
    tune.add_argument("--lambdas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                      help="comma-separated λ (w_d = λ, w_a = 1 - λ; default 0,0.1,...,1)")
    tune.add_argument("--keep", action="store_true", help="keep the merged models "
                      "(default: each is deleted once evaluated)")
    tune.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    tune.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    _add_ray_arg(tune)
    _add_method_args(tune)
    _add_eval_args(tune, model=False)
    return parser


# mergekit 0.1.5 flags that only tune mergekit's own memory, threads or storage: accepted, and
# named in one line as doing nothing here (this engine streams in bounded memory).
MERGEKIT_NO_OP_SWITCHES = ("lazy-unpickle", "low-cpu-memory", "read-to-gpu", "multi-gpu",
                           "async-write", "clone-tensors", "trust-remote-code")
MERGEKIT_NO_OP_VALUES = ("write-threads", "transformers-cache", "lora-merge-cache",
                         "lora-merge-dtype")


def _add_mergekit_yaml_args(p: argparse.ArgumentParser) -> None:
    switch = argparse.BooleanOptionalAction
    p.add_argument("config", help="mergekit YAML file")
    p.add_argument("out", help="output folder")
    p.add_argument("--out-shard-size", default="5B", metavar="SIZE",
                   help="largest output shard in bytes, mergekit's way: 5B, 500M, 1000K "
                   "(decimal; default 5B)")
    p.add_argument("--copy-tokenizer", action=switch, default=True,
                   help="copy the tokenizer of tokenizer_source (default: yes)")
    p.add_argument("--write-model-card", action=switch, default=True,
                   help="README.md and mergekit_config.yml in the output (default: yes)")
    p.add_argument("--cuda", action=switch, default=False, help="merge on the GPU")
    p.add_argument("--gpu-rich", action="store_true", help="mergekit's alias for --cuda and "
                   "memory settings: here, --cuda")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("-j", "--num-threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--random-seed", type=int, default=None,
                   help="seed of DARE's drop masks where the config sets none")
    p.add_argument("--allow-crimes", action=switch, default=False,
                   help="allow models of different architectures (refused without it, as in "
                   "mergekit)")
    p.add_argument("--safe-serialization", action=switch, default=True,
                   help="safetensors output (the only output this engine writes)")
    p.add_argument("--unsafe-truncate-embeddings", action=switch, default=False,
                   help="vocabulary tensors that differ in rows only are cut to the fewest "
                   "rows instead of refused (the models must number their tokens alike)")
    p.add_argument("--quiet", action=switch, default=False, help=QUIET_HELP)
    p.add_argument("-v", action="count", default=0, dest="verbosity",
                   help="accepted (this engine's output is the same at every verbosity)")
    for name in MERGEKIT_NO_OP_SWITCHES:
        p.add_argument(f"--{name}", action=switch, default=None, help=argparse.SUPPRESS)
    for name in MERGEKIT_NO_OP_VALUES:
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    group = p.add_argument_group("this engine's own")
    group.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    group.add_argument("--resume", action="store_true", help="finish an interrupted merge")
    group.add_argument("--no-fsync", dest="fsync", action="store_false",
                       help="skip fsync of the output")
    _add_ray_arg(group)


def parse_mergekit_size(text: str) -> int:
    """mergekit's sizes: a whole number with an optional K, M or B suffix, decimal (5B = 5e9
    bytes: its writer compares them with bytes, whatever its help says about parameters)."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"--out-shard-size {text!r}: expected a whole number with an optional "
                         "K, M or B suffix (e.g. 5B)")
    return int(digits) * scale


def _run_mergekit_yaml(args: argparse.Namespace) -> int:
    if not args.safe_serialization:
        raise MergeError("--no-safe-serialization: this engine writes safetensors only")
    given = [f"--{n}" for n in MERGEKIT_NO_OP_SWITCHES + MERGEKIT_NO_OP_VALUES
             if getattr(args, n.replace("-", "_")) is not None]
    if given:
        print(f"mergealign-fast: note: {', '.join(given)} only tune mergekit's own memory, "
              "threads or storage: nothing to do here", file=sys.stderr)
    args.max_shard_size = str(_user_value(parse_mergekit_size, args.out_shard_size))
    args.threads = args.num_threads
    device = args.device or ("cuda" if args.cuda or args.gpu_rich else "cpu")
    return _run_config(args, device=device, copy_tokenizer=args.copy_tokenizer,
                       seed=args.random_seed, allow_crimes=args.allow_crimes,
                       truncate_vocabulary=args.unsafe_truncate_embeddings)


def _add_eval_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    group = p.add_argument_group("evaluation (needs the eval extra)")
    if model:
        p.add_argument("model", help="model folder (Hugging Face layout)")
        p.add_argument("-o", "--out", default=None, metavar="RESULTS.json",
                       help="results file (default eval-<model folder name>.json); the "
                            "answers and verdicts go beside it in RESULTS.answers.jsonl")
    group.add_argument("--tasks", default="", help="comma-separated lm-evaluation-harness tasks "
                       "(built-in names, or tasks of --include-path)")
    group.add_argument("--include-path", default=None, metavar="DIR",
                       help="folder of task YAMLs (local data: dataset_path: json)")
    group.add_argument("--safety", default=None, metavar="HARMFUL.jsonl",
                       help="harmful prompts, one {\"prompt\": ...} per line: the safe rate")
    group.add_argument("--benign", default=None, metavar="BENIGN.jsonl",
                       help="benign prompts, same format: the over-refusal rate")
    group.add_argument("--judge", default="refusal", metavar="refusal|GUARD_FOLDER",
                       help="refusal (a refusal-phrase list, default) or a Llama-Guard-style "
                            "model folder answering safe/unsafe")
    group.add_argument("--refusal-phrases", default=None, metavar="FILE",
                       help="more refusal phrases, one per line")
    group.add_argument("--limit", type=int, default=None, metavar="N",
                       help="first N items of each task and prompt file (for quick looks)")
    group.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    group.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"],
                       help="model backend of the harness: hf (transformers) or vllm (GPU, "
                            "faster generation); default auto: vllm on --device cuda when "
                            "installed, else hf")
    group.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help=f"prompts per forward pass (default {DEFAULT_BATCH_SIZE})")
    group.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"answer length for safety prompts (default "
                            f"{DEFAULT_MAX_NEW_TOKENS})")


def _user_value(parse, text):
    """parse(text), with a ValueError turned into the one-line MergeError the CLI prints."""
    try:
        return parse(text)
    except ValueError as exc:
        raise MergeError(str(exc)) from None


def _out_dtype(args: argparse.Namespace) -> Optional[dtypes.DType]:
    return _user_value(dtypes.parse_dtype, args.dtype) if args.dtype else None


def _warn_nonfinite(result: MergeResult) -> None:
    if not result.nonfinite:
        return
    worst = sorted(result.nonfinite.items(), key=lambda item: -item[1])[:3]
    print(f"mergealign-fast: warning: {sum(result.nonfinite.values()):,} values of "
          f"{result.out_dir} are NaN or ±inf, in {len(result.nonfinite)} tensor(s) ("
          + ", ".join(f"{name}: {count:,}" for name, count in worst)
          + "): NaN/inf in the inputs, or results beyond the output dtype's range",
          file=sys.stderr)


def _print_result(result: MergeResult) -> None:
    _warn_nonfinite(result)
    if result.already_complete:
        print(f"{result.out_dir} is already complete: {result.tensors} tensors in "
              f"{result.shards} shard(s), verified against its manifest; nothing to do")
        if result.kept_partial is not None:
            print(f"mergealign-fast: note: {result.kept_partial} holds an interrupted merge of "
                  "other inputs or options: rerun that merge with --resume, or any merge into "
                  "this output with --force to discard it", file=sys.stderr)
        return
    print(f"merged {result.tensors} tensors into {result.shards} shard(s), "
          f"{human_bytes(result.output_bytes)} -> {result.out_dir} in {result.seconds:.2f} s "
          f"({result.gb_per_s:.1f} GB/s read+write)")


def _run_sweep(args: argparse.Namespace) -> int:
    lambdas = _user_value(parse_lambdas, args.lambdas)
    args.domain_weight = args.align_weight = None  # the sweep sets them
    options = _run_options(args, out_dtype=_out_dtype(args), method=_method_from_args(args),
                           **_tokenizer_settings(args))
    results = sweep_checkpoints(args.base, args.domain, args.aligned, args.out, lambdas,
                                options=options, progress=not args.quiet, ray_address=args.ray)
    for result in results:
        _print_result(result)
    return 0


def _run_options(args: argparse.Namespace, **settings) -> MergeOptions:
    """MergeOptions from the flags every writing command has, plus the command's `settings`."""
    if args.threads is not None and args.threads < 1:
        raise MergeError(f"--threads must be at least 1 (got {args.threads})")
    return MergeOptions(max_shard_size=_user_value(parse_size, args.max_shard_size),
                        force=args.force, resume=args.resume, threads=args.threads,
                        fsync=args.fsync, **settings)


def _tokenizer_settings(args: argparse.Namespace) -> dict:
    """tokenizer_from and vocabulary of merge and sweep: with --vocab ROLE the output's
    vocabulary, so its tokenizer, is ROLE's."""
    if args.vocab is None:
        return {"tokenizer_from": args.tokenizer_from}
    tokenizer_from = args.tokenizer_from if args.vocab == "union" else args.vocab
    return {"tokenizer_from": tokenizer_from, "vocabulary": args.vocab}


def _run_merge(args: argparse.Namespace) -> int:
    domain_weight, align_weight = _weights(args)
    options = _run_options(
        args, domain_weight=domain_weight, align_weight=align_weight,
        out_dtype=_out_dtype(args), device=args.device,
        gpu_memory=_user_value(parse_size, args.gpu_memory), backend=args.backend,
        method=_method_from_args(args), **_tokenizer_settings(args))
    plan = plan_merge(args.base, args.domain, args.aligned, args.out, options)
    _print_result(execute_on(plan, args.ray, show_progress=not args.quiet))
    return 0


def _run_config(args: argparse.Namespace, device: str = "cpu", copy_tokenizer: bool = True,
                seed: Optional[int] = None, allow_crimes: bool = True,
                truncate_vocabulary: bool = False) -> int:
    """`run`, and `mergekit-yaml` with its flags: a mergekit config through the engine."""
    config = load_mergekit_config(args.config, seed=seed, allow_crimes=allow_crimes)
    for warning in config.warnings:
        print(f"mergealign-fast: warning: {warning}", file=sys.stderr)
    # NaN weights: a tensor no `weight` setting covers is an error, never a silent default.
    nan = float("nan")
    options = _run_options(args, domain_weight=nan, align_weight=nan,
                           out_dtype=config.out_dtype, promote_mixed=True, device=device,
                           input_dtype=config.input_dtype,
                           method=config.method,
                           tokenizer_from=config.tokenizer_from if copy_tokenizer else "none",
                           vocabulary=config.vocabulary, truncate_vocabulary=truncate_vocabulary)
    try:
        if config.slices:
            from ..plan.slices import plan_passthrough

            plan = plan_passthrough(list(config.slices), config.base, args.out,
                                    replace(options, domain_weight=0.0, align_weight=0.0))
        elif config.merged_slices:
            from ..plan.slices import plan_sliced_merge

            plan = plan_sliced_merge(config.folders, config.merged_slices, args.out, options)
        elif config.models:
            plan = plan_set(config.base, config.models, args.out, options)
        else:
            plan = plan_merge(config.base, config.domain, config.aligned, args.out, options)
    except PlanError as exc:
        raise PlanError([*config.problems, *exc.problems]) from None
    if config.problems:
        raise PlanError(list(config.problems))
    for note in plan.notes:
        print(f"mergealign-fast: warning: {note}", file=sys.stderr)
    if config.chat_template is not None:
        _set_chat_template(plan, config)
    if args.write_model_card:
        plan.written_files.update(card_files(plan.out_dir, plan.options.method.name,
                                             config.base_name, config.model_names,
                                             Path(args.config).read_text(encoding="utf-8")))
    _print_result(execute_on(plan, args.ray, show_progress=not args.quiet))
    return 0


def _set_chat_template(plan, config) -> None:
    """The config's chat_template into OUT's tokenizer files (checked before any compute)."""
    from ..mergekit.chat_template import resolve_template, template_files

    merged = config.merged_folders
    models = list(dict.fromkeys(p.resolve() for p in merged))
    template = resolve_template(config.chat_template, models)
    if template is None:
        print("mergealign-fast: note: chat_template auto: none of the models carries a "
              "template; the tokenizer files are copied as they are", file=sys.stderr)
        return
    plan.written_files.update(template_files(template, plan.copied_files, plan.written_files))


def _eval_settings(args: argparse.Namespace):
    from ..evaluation.evaluate import EvalSettings

    return EvalSettings(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        include_path=Path(args.include_path) if args.include_path else None,
        harmful=Path(args.safety) if args.safety else None,
        benign=Path(args.benign) if args.benign else None, judge=args.judge,
        refusal_phrases=Path(args.refusal_phrases) if args.refusal_phrases else None,
        limit=args.limit, device=args.device, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, engine=args.engine)


def _run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import Evaluator, answers_path_for, write_json_atomic
    from ..evaluation.report import summary_lines

    out = Path(args.out or f"eval-{Path(args.model).resolve().name}.json")
    evaluator = Evaluator(_eval_settings(args))
    result = evaluator.evaluate(Path(args.model), answers_path_for(out))
    write_json_atomic(out, result)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {out}")
    return 0


def _run_tune(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import Evaluator
    from ..evaluation.tune import tune

    lambdas = _user_value(parse_lambdas, args.lambdas)
    if args.threads is not None and args.threads < 1:
        raise MergeError(f"--threads must be at least 1 (got {args.threads})")
    evaluator = Evaluator(_eval_settings(args))
    # Merges that live only until evaluated need no fsync; kept ones get it.
    options = MergeOptions(threads=args.threads, method=_method_from_args(args), fsync=args.keep)
    summary = tune(Path(args.base), Path(args.domain), Path(args.aligned), Path(args.out),
                   lambdas, evaluator, options, keep=args.keep, progress=not args.quiet,
                   ray_address=args.ray)
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"wrote {args.out}/results.{{md,csv,json}}"
          + (" and results.png" if summary["plot"] else
             " (no results.png: matplotlib is not installed, or nothing had both scores)"))
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    try:
        inspection = inspect_checkpoints(args.base, args.domain, args.aligned,
                                         domain_weight=args.domain_weight,
                                         align_weight=args.align_weight, threads=args.threads)
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    for line in summary(inspection):
        print(line)
    written = write_reports(inspection, Path(args.out))
    for path in written:
        print(f"wrote {path}")
    if not any(path.suffix == ".png" for path in written):
        print("mergealign-fast: note: layers.png not written: matplotlib is not installed "
              "(pip install matplotlib)", file=sys.stderr)
    return 0


def _run_verify(out: str) -> int:
    problems = verify_output(Path(out))
    for line in problems:
        print(f"mergealign-fast: verify: {line}", file=sys.stderr)
    if not problems:
        print(f"{out}: OK (index, headers, sizes and CRC-32C of every shard match the manifest)")
    return 1 if problems else 0


def _run_bench(args: argparse.Namespace) -> int:
    from ..tools.bench import run_bench

    if args.threads is not None and args.threads < 1:
        raise MergeError(f"--threads must be at least 1 (got {args.threads})")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        raise MergeError(f"--device {args.device!r}: choose cpu or cuda")
    lines = run_bench(_user_value(parse_size, args.size), args.quick, args.threads,
                      Path(args.dir) if args.dir else None,
                      Path(args.json) if args.json else None, args.vs_mergekit, args.device)
    for line in lines:
        print(line)
    return 0


def _run_env() -> int:
    print(f"mergealign-fast {__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}")
    if cpu.unavailable_reason() is None:
        native = cpu.native()
        direct = "with" if native.cpu_uses_direct_path() else "without"
        print(f"native CPU kernel: {native.cpu_isa()} code path {direct} the AVX2 direct path, "
              f"{native.hardware_threads()} hardware threads")
    print(f"CUDA extension: {cuda.build_info() or 'not built (no nvcc at install time)'}")
    for name, status in describe_backends().items():
        print(f"backend {name:6s} {status}")
    return 0


def _kept_partials(args: argparse.Namespace) -> List[Path]:
    """The partial folders an interrupted merge, run or sweep left behind."""
    if args.command in ("merge", "run", "mergekit-yaml"):
        return [p for p in [partial_dir_for(args.out)] if p.exists()]
    if args.command == "sweep":
        return sorted(resolve_out_dir(args.out).glob(f".lambda-*{PARTIAL_SUFFIX}"))
    return []


def _interrupted_message(args: argparse.Namespace, how: str) -> str:
    text = f"\nmergealign-fast: {how}; no output folder was created or changed"
    kept = _kept_partials(args)
    if kept:
        text += (f"; completed shards are kept in {', '.join(map(str, kept))}: rerun the same "
                 "command with --resume to finish")
    return text


def _quiet_stdout() -> None:
    """stdout went away (a closed pipe): the work is done, so the summary is simply dropped."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Optional[List[str]] = None) -> int:
    # Past a file-size limit (ulimit -f) the kernel would kill us with SIGXFSZ mid-write; ignored,
    # the write fails with EFBIG instead and the user gets a message and a resumable merge.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        args = _build_parser().parse_args(argv)
    except KeyboardInterrupt as exc:  # SystemExit (--help, bad flags) passes through
        return interrupted_while_starting(exc)
    try:
        if args.command == "merge":
            return _run_merge(args)
        if args.command == "sweep":
            return _run_sweep(args)
        if args.command == "run":
            return _run_config(args)
        if args.command == "mergekit-yaml":
            return _run_mergekit_yaml(args)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "tune":
            return _run_tune(args)
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command == "verify":
            return _run_verify(args.out)
        if args.command == "bench":
            return _run_bench(args)
        if args.command == "demo":
            from ..tools.demo import run_demo, run_trained_demo

            if args.trained:
                return 0 if run_trained_demo(args.cache_dir, args.quiet) else 1
            return 0 if run_demo(args.cache_dir, args.threads, args.quiet) else 1
        return _run_env()
    except MergeError as exc:
        for line in str(exc).splitlines():
            print(f"mergealign-fast: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mergealign-fast: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C and SIGTERM, maybe wrapped; not bugs
        interrupt = interrupt_in(exc)
        if interrupt is None:
            raise
        terminated = isinstance(interrupt, Terminated)
        print(_interrupted_message(args, "terminated" if terminated else "interrupted"),
              file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
