"""The command line's grammar: the subcommands and their flags (a flag per method parameter,
from the registry, with the methods that take it), and the flags read back into a Method."""

from __future__ import annotations

import argparse

from ..errors import MergeError
from ..evaluation.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from .. import methods
from ..methods.core.parameters import (PARAMETERS, RESCALES, Method, Rule, base_weighing,
                                       setting_of)
from ..methods.core.spec import VECTOR_MODES
from ..plan import ROLES
from ..plan.options import COMPUTE_DTYPES

EXIT_BAD_INPUT = 2  # bad input: a one-line message per problem
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


def _add_compute_dtype_arg(p) -> None:
    """run's and mergekit-yaml's arithmetic."""
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="fp32",
                   help="fp32 (default): this engine's arithmetic, fp32 with one rounding and "
                   "exact statistics, streamed; mergekit: mergekit 0.1.5's own arithmetic in "
                   "the config's dtype (signs, top-k and scores taken in bf16 under a bf16 "
                   "config, its output dtypes), tensor by tensor in torch: its tensors bit for "
                   "bit, for reproducing a published merge (slower, a few tensors in memory)")


def _add_ray_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (needs the ray extra): alone, the Ray instance of this "
                   "machine (started if none runs); with an address, that cluster.  Inputs and "
                   "output must be on storage every node mounts at the same path")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """Options shared by merge and sweep."""
    p.add_argument("base", help="base model: a folder (Hugging Face layout) or a Hub repo id "
                   "(org/name, org/name@revision)")
    p.add_argument("domain", help="domain-expert model (folder or repo id), fine-tuned from base")
    p.add_argument("aligned", help="aligned/instruct model (folder or repo id), fine-tuned "
                   "from base")
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


# The method flags whose help and values are not one parameter's (methods/core/parameters.py
# gives the rest).
_FLAG_SETTINGS = {"density": dict(type=float, metavar="P"),
                  "domain_density": dict(type=float, metavar="P", help="density of τ_d alone"),
                  "align_density": dict(type=float, metavar="P", help="density of τ_a alone"),
                  "lambda_": dict(type=float, metavar="L"), "seed": dict(type=int),
                  "t": dict(type=float), "gamma": dict(type=float, metavar="G"),
                  "select_topk": dict(type=float, metavar="P"),
                  "epsilon": dict(type=float, metavar="E"), "r": dict(type=float, metavar="R"),
                  "alpha": dict(type=float, metavar="A"), "rescale": dict(choices=RESCALES),
                  "base_weight": dict(type=float, metavar="W")}
# The flag of a method's own parameter, by its kind.
_KIND_SETTINGS = {"number": dict(type=float, metavar="X"), "count": dict(type=int, metavar="N"),
                  "rescale": dict(choices=RESCALES)}
# The weight flags belong to merge and inspect (a sweep sets the weights), but --base-weight.
_WEIGHT_FLAGS = ("domain_weight", "align_weight")


def _flag(field: str) -> str:
    return f"--{field.rstrip('_').replace('_', '-')}"


def _taken_by(parameter: str) -> str:
    """The methods taking it, and what it means for those that give it a meaning of their own."""
    taking = [s for s in methods.specs() if parameter in s.parameters]
    meanings = [f"{s.name}: {s.meanings[parameter]}" for s in taking if parameter in s.meanings]
    return "; ".join([", ".join(s.name for s in taking)] + meanings)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    """--method and a flag per method parameter, with the methods that take it (the
    registry says which)."""
    group = p.add_argument_group("merge method (see docs/methods.md)")
    group.add_argument("--method", default="task_arithmetic", choices=list(methods.names()),
                       help="default task_arithmetic: MergeAlign's base + w_d τ_d + w_a τ_a")
    for parameter in PARAMETERS.values():
        for flag, _ in parameter.flags:
            if flag in _WEIGHT_FLAGS:
                continue
            if parameter.kind == "bool":
                group.add_argument(f"--{flag}", dest=flag, action="store_true", default=None,
                                   help=f"{parameter.help} ({_taken_by(parameter.name)})")
                group.add_argument(f"--no-{flag}", dest=flag, action="store_false",
                                   help="do not " + parameter.help)
                continue
            settings = dict(_FLAG_SETTINGS.get(flag) or _KIND_SETTINGS[parameter.kind])
            text = settings.pop("help", None) or parameter.help
            if flag == "base_weight":
                text, taken = "weight of the base model itself (default 0)", \
                    " and ".join(base_weighing())
            else:
                taken = _taken_by(parameter.name)
            group.add_argument(_flag(flag), dest=flag, default=None,
                               help=f"{text} ({taken})", **settings)
    group.add_argument("--vectors", choices=VECTOR_MODES, default=None,
                       help="what one vector is: the whole tensor (default), each row (last "
                            "dimension) or column (first dimension) ("
                            + ", ".join(s.name for s in methods.specs() if s.vectors) + ")")


def method_from_args(args: argparse.Namespace):
    """The Method the flags describe; MergeError for a flag the method does not take."""
    spec = methods.get(args.method)
    accepted = spec.parameters
    given = {flag: getattr(args, flag, None) for p in PARAMETERS.values() for flag, _ in p.flags}
    problems = [f"{_flag(flag)} does not apply to {args.method} (it takes: "
                f"{', '.join(accepted) or 'nothing'})"
                for p in PARAMETERS.values() for flag, _ in p.flags
                if given[flag] is not None and p.name not in accepted]
    if args.base_weight is not None and not spec.contract.weighs_base:
        problems.append(f"--base-weight applies to {' and '.join(base_weighing())} only")
    if spec.flag_problems is not None:
        problems += spec.flag_problems(given)
    if problems:
        raise MergeError("\n".join(dict.fromkeys(problems)))

    def first_given(*values):
        return next((v for v in values if v is not None), None)

    fields = {"domain_density": first_given(args.domain_density, args.density),
              "align_density": first_given(args.align_density, args.density),
              "vectors": args.vectors}
    fields.update((field, given[flag]) for p in PARAMETERS.values() for flag, field in p.flags
                  if field and field not in fields and flag not in _WEIGHT_FLAGS)
    try:  # the method's own parameters travel as rules (Parameter's docstring)
        own = tuple(Rule(p.name, None, setting_of(p.name, given[flag]))
                    for p in spec.own_parameters for flag, _ in p.flags
                    if given[flag] is not None)
    except ValueError as exc:
        raise MergeError(f"{args.method}: {exc}") from None
    # Flags not given keep Method's own defaults (one home for them).
    method = Method(args.method, rules=own, **{k: v for k, v in fields.items() if v is not None})
    problems = method.problems()
    if problems:
        raise MergeError("\n".join(problems))
    return method


def weights_from_args(args: argparse.Namespace):
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


def build_parser() -> argparse.ArgumentParser:
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
    run.add_argument("config", help="mergekit YAML file; models are local folders, relative "
                     "to the current directory (as mergekit-yaml reads them), or Hub repo ids")
    run.add_argument("out", help="output folder (created; see --force)")
    _add_writing_args(run)
    _add_compute_dtype_arg(run)
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
        inspect.add_argument(role, help=f"{role} model folder or Hub repo id")
    inspect.add_argument("-o", "--out", default="mergealign-inspect",
                         help="folder for vectors.json, tensors.csv, layers.csv, layers.png")
    inspect.add_argument("--domain-weight", type=float, default=0.5,
                         help="w_d of the merge whose distances to the parents are reported "
                              "(default 0.5)")
    inspect.add_argument("--align-weight", type=float, default=0.5,
                         help="w_a of that merge (default 0.5)")
    inspect.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    check = sub.add_parser("check", help="the plan of a merge and every problem with it, "
                           "downloading no weight and computing nothing")
    check.add_argument("models", nargs="+", metavar="CONFIG | BASE DOMAIN ALIGNED",
                       help="a mergekit YAML config, or the trio's three models (folders or "
                       "Hub repo ids, repo@revision)")
    check.add_argument("-o", "--out", default="merged",
                       help="the output folder the merge would write (default ./merged)")
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
    _add_extract_lora_args(sub.add_parser(
        "extract-lora", help="a PEFT LoRA adapter with BASE + adapter ~ MODEL (a truncated SVD "
        "of each module's MODEL - BASE), in bounded memory"), mergekit=False)
    _add_extract_lora_args(sub.add_parser(
        "mergekit-extract-lora", help="mergekit-extract-lora's command line (--model, "
        "--base-model, --out-path and its flags) on this engine"), mergekit=True)
    _add_eval_args(sub.add_parser("eval", help="domain tasks (lm-evaluation-harness) and "
                                  "safety (a judge) of one model folder"))
    tune = sub.add_parser("tune", help="sweep λ, evaluate every merge and the parents, "
                          "recommend a point")
    for role in ("base", "domain", "aligned"):
        tune.add_argument(role, help=f"{role} model folder or Hub repo id")
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
    _add_compute_dtype_arg(group)
    _add_ray_arg(group)


def _add_extract_lora_args(p: argparse.ArgumentParser, mergekit: bool) -> None:
    """extract-lora's flags: mergekit-extract-lora's (mergekit 0.1.5), and this engine's."""
    switch = argparse.BooleanOptionalAction
    if mergekit:
        p.add_argument("--model", required=True, help="fine-tuned model (folder or repo id)")
        p.add_argument("--base-model", dest="base", required=True, help="base model")
        p.add_argument("--out-path", dest="out", required=True, help="output adapter folder")
        p.add_argument("--cuda", action=switch, default=False, help="SVDs on the GPU")
        for name in MERGEKIT_NO_OP_SWITCHES:
            p.add_argument(f"--{name}", action=switch, default=None, help=argparse.SUPPRESS)
        for name in MERGEKIT_NO_OP_VALUES:
            p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
        p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    else:
        p.add_argument("model", help="the fine-tuned or merged model: folder, repo id, or "
                       "BASE+ADAPTER")
        p.add_argument("base", help="the base model the adapter will be applied to")
        p.add_argument("-o", "--out", required=True, help="output adapter folder")
    p.add_argument("--max-rank", type=int, default=128,
                   help="rank of each module's factors (fewer with --sv-epsilon; default 128)")
    p.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values at or below this (default 0: keep max-rank)")
    p.add_argument("--distribute-scale", action=switch, default=True,
                   help="split the singular values as sqrt between A and B (default: yes)")
    p.add_argument("--embed-lora", action=switch, default=False,
                   help="decompose embeddings and the output head too (default: save whole)")
    p.add_argument("--save-module", dest="save_modules", action="append", default=[],
                   help="save this module whole (a full name or a last name; repeatable)")
    p.add_argument("-i", "--include-regex", dest="include", action="append", default=[],
                   help="only modules whose name matches (repeatable)")
    p.add_argument("-e", "--exclude-regex", dest="exclude", action="append", default=[],
                   help="leave out modules whose name matches (repeatable)")
    p.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out norms and other modules no LoRA can stand for (default: "
                   "saved whole)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (default 0)")
    p.add_argument("--exact-svd", action="store_true", help="LAPACK's exact SVD for every "
                   "module, as mergekit (default: a seeded randomized SVD for matrices of 1024 "
                   "or more rows and columns, much faster on large ones)")
    p.add_argument("--factor-dtype", dest="dtype", default=None,
                   choices=["bf16", "fp16", "fp32"], help="dtype of lora_A/lora_B (default: "
                   "each weight's)")
    if not mergekit:
        p.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or "
                       "cuda (needs torch)")
    p.add_argument("--force", action="store_true", help="replace an adapter written here "
                   "before; discard an interrupted extraction")
    p.add_argument("--resume", action="store_true", help="finish an interrupted extraction "
                   "(keeping the modules it completed)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="skip fsync of the output")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


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


