"""Command line: `mergealign-fast merge|sweep|run|mergekit-yaml|extract-lora|
mergekit-extract-lora|eval|tune|inspect|verify|check|demo|env|bench` (or `python -m mergealign_fast`; entry.py sets up the process first)."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .. import dtypes
from .._version import __version__
from ..engine.loop import MergeResult
from ..api import execute_on
from .interrupts import (EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, interrupt_in,
                    interrupted_while_starting)
from ..errors import MergeError
from ..tools.inspect_vectors import inspect_checkpoints, summary, write_reports
from ..kernels import cpu, cuda, describe_backends
from ..output.manifest import verify_output
from ..mergekit.run import plan_config
from ..output import PARTIAL_SUFFIX, partial_dir_for, resolve_out_dir
from ..plan import MergeOptions, plan_merge
from ..units import parse_mergekit_size, parse_size
from ..units import human_bytes
from ..plan.sweep import parse_lambdas
from ..api import sweep_checkpoints

from .parser import (EXIT_BAD_INPUT, MERGEKIT_NO_OP_SWITCHES, MERGEKIT_NO_OP_VALUES, build_parser,
                     method_from_args, weights_from_args)
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
    options = _run_options(args, out_dtype=_out_dtype(args), method=method_from_args(args),
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
    domain_weight, align_weight = weights_from_args(args)
    options = _run_options(
        args, domain_weight=domain_weight, align_weight=align_weight,
        out_dtype=_out_dtype(args), device=args.device,
        gpu_memory=_user_value(parse_size, args.gpu_memory), backend=args.backend,
        method=method_from_args(args), **_tokenizer_settings(args))
    plan = plan_merge(args.base, args.domain, args.aligned, args.out, options)
    for note in plan.notes:
        _tell("warning", note)
    _print_result(execute_on(plan, args.ray, show_progress=not args.quiet))
    return 0


def _run_extract_lora(args: argparse.Namespace) -> int:
    """extract-lora, and mergekit-extract-lora's flags for it."""
    from ..tools.extract_lora import ExtractOptions, extract, plan_extraction

    device = getattr(args, "device", None) or ("cuda" if getattr(args, "cuda", False) else "cpu")
    options = ExtractOptions(
        max_rank=args.max_rank, sv_epsilon=args.sv_epsilon,
        distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
        save_modules=tuple(args.save_modules), include=tuple(args.include),
        exclude=tuple(args.exclude), skip_undecomposable=args.skip_undecomposable,
        seed=args.seed, exact_svd=args.exact_svd, dtype=args.dtype, device=device, force=args.force, resume=args.resume,
        fsync=args.fsync)
    result = extract(plan_extraction(args.model, args.base, args.out, options),
                     show_progress=not args.quiet)
    if result.already_complete:
        print(f"{result.out_dir} is already complete, verified against its manifest; "
              "nothing to do")
    else:
        for line in result.summary():
            print(line)
    return 0


def _run_config(args: argparse.Namespace, device: str = "cpu", copy_tokenizer: bool = True,
                seed: Optional[int] = None, allow_crimes: bool = True,
                truncate_vocabulary: bool = False) -> int:
    """`run`, and `mergekit-yaml` with its flags: a mergekit config through the engine."""
    options = _run_options(args, device=device, truncate_vocabulary=truncate_vocabulary,
                           compute_dtype=args.compute_dtype)
    plan = plan_config(args.config, args.out, options, seed=seed, allow_crimes=allow_crimes,
                       copy_tokenizer=copy_tokenizer, write_model_card=args.write_model_card,
                       tell=_tell)
    _print_result(execute_on(plan, args.ray, show_progress=not args.quiet))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    """`check`: the report on stdout, each problem as an error line; exit 2 with problems."""
    from ..tools.check import check

    given = args.models
    if len(given) == 1 and given[0].endswith((".yml", ".yaml")):
        lines, problems = check(lambda: plan_config(given[0], args.out, MergeOptions(),
                                                    tell=_tell))
    elif len(given) == 3:
        lines, problems = check(lambda: plan_merge(*given, args.out, MergeOptions()),
                                dict(zip(("base", "domain", "aligned"), given)))
    else:
        raise MergeError("check takes a mergekit YAML config, or the trio's three models "
                         f"(got {len(given)} arguments)")
    print("\n".join(lines))
    for line in problems:
        print(f"mergealign-fast: error: {line}", file=sys.stderr)
    print("check: " + (f"{len(problems)} problems: the merge cannot run as given" if problems
                       else "no problems: the merge can run"))
    return EXIT_BAD_INPUT if problems else 0


def _tell(kind: str, text: str) -> None:
    print(f"mergealign-fast: {kind}: {text}", file=sys.stderr)


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

    from ..sources import model_folder

    model = model_folder(args.model)  # a folder, a Hub repo id, or BASE+ADAPTER
    out = Path(args.out or f"eval-{Path(model).resolve().name}.json")
    evaluator = Evaluator(_eval_settings(args))
    result = evaluator.evaluate(model, answers_path_for(out))
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
    options = MergeOptions(threads=args.threads, method=method_from_args(args), fsync=args.keep)
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
        args = build_parser().parse_args(argv)
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
        if args.command in ("extract-lora", "mergekit-extract-lora"):
            return _run_extract_lora(args)
        if args.command == "verify":
            return _run_verify(args.out)
        if args.command == "check":
            return _run_check(args)
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
