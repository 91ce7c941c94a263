"""`extract-lora MODEL BASE -o ADAPTER` (and mergekit's `mergekit-extract-lora` flags): a PEFT
LoRA adapter with BASE + adapter ≈ MODEL, module by module, in bounded memory.

What each module of MODEL becomes (mergekit 0.1.5's choices, made from names and shapes):
- a 2-D weight of the same shape as BASE's: lora_A/lora_B from a truncated SVD of
  τ = MODEL − BASE (low_rank.py), rank `max_rank` or fewer where singular values are at most
  `sv_epsilon`; a GPT-2 Conv1D (stored in x out) is decomposed transposed, with fan_in_fan_out;
  a bias that changed is added as lora_B.bias (lora_bias);
- an embedding or output head: saved whole (modules_to_save), or with `embed_lora` an embedding
  as lora_embedding_A/B and a head as lora_A/B; saved whole anyway when its rows differ from
  BASE's (added tokens);
- a module named by `save_modules`: saved whole;
- anything else (norms, other 1-D tensors): saved whole, or skipped with skip_undecomposable;
- include / exclude regular expressions (searched in the module's name) leave modules out.
Each module's tensors use one rank: lora_alpha = r for every module (scale 1), modules whose
rank differs listed in rank_pattern and alpha_pattern.

The output is crash-safe like a merge's: the hidden partial folder beside ADAPTER, locked; each
finished module's tensors in a part file recorded in the journal (size, CRC-32C), so a killed
extraction resumes (--resume) where it stopped; when all are done the parts become
adapter_model.safetensors, the config, model card and manifest are written and the folder is
renamed to ADAPTER at once.  `verify ADAPTER` checks it.  Memory: the largest decomposed
module's τ in fp32 and its factors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._version import __version__
from ..dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from ..errors import MergeError, PlanError
from ..io.adapters import PEFT_PREFIX, config_folder, open_model, tokenizer_folder
from ..io.checkpoint import (ADAPTER_CONFIG, CONFIG_FILE, TOKENIZER_FILES, TensorLocation,
                             read_elements)
from ..io.safetensors_format import EncodedTensor, encode_header, read_header
from ..io.stream import AdaptedWindows, InputMaps
from ..output import (fsync_dir, lock_folder, move_into_place, out_dir_problems,
                      partial_dir_for, resolve_out_dir, write_file)
from ..output.manifest import (FORMAT, MANIFEST, checkpoint_identities, crc_hex,
                               file_crc32c, verify_output)
from ..plan.output import disk_problems
from ..progress import Progress
from ..sources import download_inputs, model_folders, pending_download_bytes
from .low_rank import Linalg, factors, relative_error
from ..io import json_text

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PARTS = "parts"
# Bytes of a tensor saved whole copied at a time: memory stays bounded by the decompositions.
COPY_WINDOW = 16 << 20
# Input embeddings (nn.Embedding: lora_embedding_A/B) and output heads (nn.Linear), by the
# module's last name as transformers' models call them.
INPUT_EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|tok_embeddings|"
                              r"embed_in|embed_positions|position_embeddings|embeddings|"
                              r"shared)$")
OUTPUT_HEADS = re.compile(r"(^|\.)(lm_head|embed_out|output)$")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Models whose projections are transformers' Conv1D (weights stored in x out).
CONV1D_MODEL_TYPES = {"gpt2"}
CONV1D_MODULES = re.compile(r"(^|\.)(c_attn|c_proj|c_fc)$")


@dataclass(frozen=True)
class ExtractOptions:
    max_rank: int = 128  # mergekit-extract-lora's default
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    embed_lora: bool = False
    save_modules: Tuple[str, ...] = ()
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    skip_undecomposable: bool = False
    seed: int = 0
    exact_svd: bool = False  # LAPACK's SVD for every module (else randomized for large ones)
    dtype: Optional[str] = None  # of the factors: "bf16", "fp16", "fp32"; None: the model's
    device: str = "cpu"
    force: bool = False
    resume: bool = False
    fsync: bool = True

    def identity(self) -> dict:
        """What makes another adapter (not where or how it is written)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("device", "force", "resume", "fsync")}


@dataclass
class Job:
    """One module of MODEL and what the adapter holds for it."""

    module: str
    kind: str  # "lora", "embedding" (lora_embedding_A/B), "whole"
    tensors: Dict[str, object]  # part ("weight", "bias") -> MODEL's TensorLocation
    base: Dict[str, object] = field(default_factory=dict)  # part -> BASE's
    conv1d: bool = False
    note: str = ""

    @property
    def input_bytes(self) -> int:
        return sum(loc.entry.nbytes for loc in [*self.tensors.values(), *self.base.values()])


@dataclass
class ExtractionPlan:
    model: object
    base: object
    base_name: str
    out_dir: Path
    options: ExtractOptions
    jobs: List[Job]
    side_files: List[Path]
    skipped: List[str]
    fingerprint: str = ""


# ---- planning ----------------------------------------------------------------------------------

def _modules(checkpoint) -> Dict[str, Dict[str, object]]:
    found: Dict[str, Dict[str, object]] = {}
    for name, location in checkpoint.tensors.items():
        module, _, part = name.rpartition(".")
        found.setdefault(module, {})[part] = location
    return found


def _wanted(module: str, options: ExtractOptions) -> bool:
    if options.include and not any(re.search(r, module) for r in options.include):
        return False
    return not any(re.search(r, module) for r in options.exclude)


def _saved_whole(module: str, options: ExtractOptions) -> bool:
    return module in options.save_modules or module.rsplit(".", 1)[-1] in options.save_modules


def _job(module: str, parts: Dict[str, object], base_parts: Dict[str, object],
         options: ExtractOptions, conv1d_model: bool) -> Tuple[Optional[Job], Optional[str]]:
    """(the module's job or None, a problem or None)."""
    weight = parts.get("weight")
    embedding = INPUT_EMBEDDINGS.search(module) is not None
    head = OUTPUT_HEADS.search(module) is not None
    whole = Job(module, "whole", parts)
    if _saved_whole(module, options):
        return whole, None
    if (embedding or head) and weight is not None and len(weight.entry.shape) == 2:
        base_weight = base_parts.get("weight")
        if not options.embed_lora:
            return whole, None
        if base_weight is None or base_weight.entry.shape != weight.entry.shape:
            whole.note = "rows differ from the base's (added tokens): saved whole"
            return whole, None
        return Job(module, "embedding" if embedding else "lora", parts, base_parts), None
    if weight is None or len(weight.entry.shape) != 2:
        return (None, None) if options.skip_undecomposable else (whole, None)
    base_weight = base_parts.get("weight")
    unusable = [loc.entry.dtype for loc in (weight, base_weight)
                if loc is not None and loc.entry.dtype not in FLOAT_DTYPES]
    if unusable:
        return None, (f"tensor {module}.weight: dtype {unusable[0]} (quantized or integer) "
                      f"cannot be decomposed; --save-module {module} saves it whole, "
                      f"--exclude-regex leaves it out")
    if base_weight is None or base_weight.entry.shape != weight.entry.shape:
        seen = "missing from BASE" if base_weight is None else \
            f"{list(base_weight.entry.shape)} in BASE"
        return None, (f"tensor {module}.weight: {list(weight.entry.shape)} in MODEL, {seen}: no "
                      f"LoRA can stand for it; --save-module {module} saves it whole, "
                      f"--exclude-regex leaves it out")
    return Job(module, "lora", parts, base_parts,
               conv1d=conv1d_model and CONV1D_MODULES.search(module) is not None), None


def plan_extraction(model, base, out_dir, options: ExtractOptions) -> ExtractionPlan:
    """Every module's job, checked before anything is computed; PlanError lists every problem
    (inputs, options, output, disk)."""
    problems = _option_problems(options)
    given = out_dir
    out_dir = resolve_out_dir(out_dir)
    folders, found = model_folders({"model": model, "base": base})
    problems += found
    if len(folders) < 2:
        raise PlanError(problems)
    checkpoints = {}
    for role, folder in folders.items():
        try:
            checkpoints[role] = open_model(folder)
        except MergeError as exc:
            problems.append(f"{role}: {exc}")
    if problems:
        raise PlanError(problems)
    model_ckpt, base_ckpt = checkpoints["model"], checkpoints["base"]
    conv1d = _model_type(model_ckpt.folder) in CONV1D_MODEL_TYPES
    jobs, skipped = [], []
    base_modules = _modules(base_ckpt)
    for module, parts in _modules(model_ckpt).items():
        if not _wanted(module, options):
            skipped.append(module)
            continue
        job, problem = _job(module, parts, base_modules.get(module, {}), options, conv1d)
        if problem:
            problems.append(problem)
        elif job is None:
            skipped.append(module)
        else:
            jobs.append(job)
    if not any(job.kind != "whole" for job in jobs) and not problems:
        problems.append("no module of MODEL is left to decompose (check --include-regex, "
                        "--exclude-regex and --save-module)")
    plan = ExtractionPlan(model_ckpt, base_ckpt, str(base), out_dir, options, jobs,
                          _side_files(model_ckpt.folder), skipped)
    plan.fingerprint = _fingerprint(plan)
    problems += out_dir_problems(given, out_dir) + _overlap_problems(plan, given)
    problems += _existing_output_problems(plan, given)
    problems += disk_problems(out_dir, 2 * _estimated_bytes(plan),
                              pending_download_bytes(_files_read(plan)))
    if problems:
        raise PlanError(problems)
    return plan


def _option_problems(options: ExtractOptions) -> List[str]:
    problems = []
    if options.max_rank < 1:
        problems.append(f"--max-rank must be at least 1 (got {options.max_rank})")
    if not math.isfinite(options.sv_epsilon) or options.sv_epsilon < 0:
        problems.append(f"--sv-epsilon must be 0 or more (got {options.sv_epsilon})")
    if options.dtype not in (None, "bf16", "fp16", "fp32"):
        problems.append(f"--dtype {options.dtype}: choose bf16, fp16 or fp32")
    for pattern in options.include + options.exclude:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"regular expression {pattern!r}: {exc}")
    return problems


def _model_type(folder) -> Optional[str]:
    try:
        return json_text.loads((config_folder(folder) / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _side_files(folder) -> List[Path]:
    """MODEL's tokenizer files: an adapter carries the tokenizer of the model it stands for."""
    source = tokenizer_folder(folder)
    return [Path(source) / n for n in TOKENIZER_FILES if (Path(source) / n).is_file()]


def _files_read(plan: ExtractionPlan) -> List[Path]:
    return sorted({f for job in plan.jobs
                   for loc in [*job.tensors.values(), *job.base.values()] for f in loc.files}
                  | set(plan.side_files))


def _factor_dtype(plan: ExtractionPlan, location) -> str:
    chosen = plan.options.dtype
    if chosen is not None:
        return {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[chosen]
    return location.entry.dtype if location.entry.dtype in ("BF16", "F16", "F32") else "F32"


def _estimated_bytes(plan: ExtractionPlan) -> int:
    total = 0
    for job in plan.jobs:
        if job.kind == "whole":
            total += sum(loc.entry.nbytes for loc in job.tensors.values())
        else:
            rows, cols = job.tensors["weight"].entry.shape
            total += (rows + cols) * plan.options.max_rank * 4
    return total + (1 << 20)


def _fingerprint(plan: ExtractionPlan) -> str:
    identities = checkpoint_identities([plan.model, plan.base])
    key = json.dumps([sorted((str(p), i) for p, i in identities.items()),
                      plan.options.identity(), plan.base_name, "extract-lora 1"],
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def _overlap_problems(plan: ExtractionPlan, given) -> List[str]:
    out = plan.out_dir
    for role, checkpoint in (("MODEL", plan.model), ("BASE", plan.base)):
        for folder in {Path(checkpoint.folder).resolve(), *(Path(f).resolve().parent
                                                            for f in checkpoint.files)}:
            if folder == out or out in folder.parents or folder in out.parents:
                return [f"output {given} overlaps {role} ({folder}): write the adapter "
                        "elsewhere"]
    return []


def _existing_output_problems(plan: ExtractionPlan, given) -> List[str]:
    out = plan.out_dir
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return []
    if not out.is_dir():
        return [f"output {given} exists and is not a folder"]
    ours = (out / MANIFEST).is_file() and (out / ADAPTER_CONFIG).is_file()
    if plan.options.resume and ours and _recorded_fingerprint(out) == plan.fingerprint:
        return []
    if not ours:
        return [f"output {given} holds files that are not an adapter written by mergealign-fast: "
                "name a new folder (nothing there is replaced)"]
    if not plan.options.force:
        return [f"output {given} already holds an adapter: add --force to replace it"]
    return []


def _recorded_fingerprint(folder: Path) -> Optional[str]:
    try:
        return json_text.loads((folder / MANIFEST).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


# ---- computing ---------------------------------------------------------------------------------

def _values(location, maps: InputMaps) -> np.ndarray:
    """A tensor as fp32 (an adapted one with its LoRA applied)."""
    if location.delta is not None:
        held, _, _ = AdaptedWindows(location).window(maps.maps[location.file], 0,
                                                     location.entry.count)
        return held.values.reshape(location.entry.shape)  # fp32: the delta's held is None
    raw = read_elements(location)
    if location.entry.dtype == "BF16":
        raw = bf16_bits_to_f32(raw)
    return raw.astype(np.float32, copy=False).reshape(location.entry.shape)


def _stored(values: np.ndarray, dtype: str) -> Tuple[bytes, np.ndarray]:
    """(the bytes of `values` stored in dtype, the stored values widened back to fp32)."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == "BF16":
        bits = f32_to_bf16_bits(values)
        return bits.tobytes(), bf16_bits_to_f32(bits).reshape(values.shape)
    if dtype == "F16":
        half = values.astype(np.float16)
        return half.tobytes(), half.astype(np.float32)
    return values.tobytes(), values


def _decompose(plan: ExtractionPlan, job: Job, maps: InputMaps, linalg: Linalg):
    """(tensors {name: (dtype, shape, bytes)}, report) of a lora or embedding job."""
    o = plan.options
    weight = job.tensors["weight"]
    tau = _values(weight, maps) - _values(job.base["weight"], maps)
    # PEFT's B·A: out x in for a Linear; (B·A)ᵀ is the stored tensor for an embedding
    # (rows x dim) and a Conv1D (in x out).
    transposed = job.kind == "embedding" or job.conv1d
    target = np.ascontiguousarray(tau.T) if transposed else tau
    del tau
    found = factors(target, o.max_rank, job.module, sv_epsilon=o.sv_epsilon,
                    distribute_scale=o.distribute_scale, seed=o.seed, linalg=linalg,
                    exact=o.exact_svd)
    dtype = _factor_dtype(plan, weight)
    a_bytes, a = _stored(found.a, dtype)
    b_bytes, b = _stored(found.b, dtype)
    rank = a.shape[0]
    report = {"module": job.module, "kind": job.kind, "shape": list(weight.entry.shape),
              "rank": rank, "error": relative_error(target, b, a),
              "svd": "exact" if found.exact else "randomized"}
    if rank == 0:
        report["kind"] = "unchanged"
        return {}, report
    name = f"{PEFT_PREFIX}{job.module}"
    if job.kind == "embedding":
        tensors = {f"{name}.lora_embedding_A": (dtype, a.shape, a_bytes),
                   f"{name}.lora_embedding_B": (dtype, b.shape, b_bytes)}
    else:
        tensors = {f"{name}.lora_A.weight": (dtype, a.shape, a_bytes),
                   f"{name}.lora_B.weight": (dtype, b.shape, b_bytes)}
    bias = job.tensors.get("bias")
    if bias is not None and "bias" in job.base:
        delta = _values(bias, maps) - _values(job.base["bias"], maps)
        if np.any(delta != 0):
            bias_dtype = _factor_dtype(plan, bias)
            tensors[f"{name}.lora_B.bias"] = (bias_dtype, delta.shape,
                                               _stored(delta, bias_dtype)[0])
            report["bias"] = True
    return tensors, report


def _whole(job: Job, maps: InputMaps) -> Tuple[Dict[str, tuple], dict]:
    """A module saved whole: its MODEL tensors as stored (copied from the file in windows), or
    for a LoRA-adapted MODEL their values."""
    tensors = {}
    for part, loc in job.tensors.items():
        name = f"{PEFT_PREFIX}{job.module}.{part}"
        if loc.delta is None:
            tensors[name] = (loc.entry.dtype, loc.entry.shape, loc)
        else:
            tensors[name] = ("F32", loc.entry.shape, _values(loc, maps).tobytes())
    report = {"module": job.module, "kind": "whole",
              "shape": list(next(iter(job.tensors.values())).entry.shape)}
    if job.note:
        report["note"] = job.note
    return tensors, report


def _nbytes(data) -> int:
    return data.entry.nbytes if hasattr(data, "entry") else len(data)


def _copy_into(out, data) -> None:
    """Bytes, or a stored tensor copied from its file COPY_WINDOW at a time."""
    if not hasattr(data, "entry"):
        out.write(data)
        return
    with open(data.file, "rb") as f:
        for start in range(0, data.entry.nbytes, COPY_WINDOW):
            f.seek(data.entry.begin + start)
            piece = f.read(min(COPY_WINDOW, data.entry.nbytes - start))
            if len(piece) != min(COPY_WINDOW, data.entry.nbytes - start):
                raise MergeError(f"{data.file}: tensor {data.entry.name} ends early (the file "
                                 "shrank while it was read)")
            out.write(piece)


def _write_part(path: Path, tensors: Dict[str, tuple], fsync: bool) -> dict:
    """A part file of the journal: the tensors as a safetensors file; (file, size, CRC)."""
    names = sorted(tensors)
    header, _ = encode_header([EncodedTensor(n, tensors[n][0], tuple(tensors[n][1]),
                                             _nbytes(tensors[n][2])) for n in names])
    with open(path, "wb") as out:
        out.write(header)
        for n in names:
            _copy_into(out, tensors[n][2])
        if fsync:
            out.flush()
            os.fsync(out.fileno())
    return {"file": f"{PARTS}/{path.name}", "size": path.stat().st_size,
            "crc32c": crc_hex(file_crc32c(path))}


# ---- the output ------------------------------------------------------------------------------

class _Journal:
    """The partial folder's journal: each finished job's part file and report."""

    def __init__(self, folder: Path, fingerprint: str, fsync: bool):
        self.path = folder / MANIFEST
        self.folder, self.fingerprint, self.fsync = folder, fingerprint, fsync
        self.parts: Dict[str, dict] = {}

    def load(self) -> None:
        try:
            recorded = json_text.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if recorded.get("fingerprint") != self.fingerprint:
            raise MergeError(f"the interrupted extraction in {self.folder} was started with "
                             "other inputs or options: rerun it as it was, or use --force to "
                             "start over")
        self.parts = dict(recorded.get("parts", {}))

    def done(self, module: str) -> bool:
        part = self.parts.get(module)
        if part is None:
            return False
        path = self.folder / part["file"] if part.get("file") else None
        if path is None:
            return True  # nothing to store (an unchanged module)
        return (path.is_file() and path.stat().st_size == part["size"]
                and crc_hex(file_crc32c(path)) == part["crc32c"])

    def record(self, module: str, entry: dict) -> None:
        self.parts[module] = entry
        document = {"format": FORMAT, "kind": "lora-extraction", "fingerprint": self.fingerprint,
                    "parts": self.parts}
        staging = self.path.with_name(MANIFEST + ".new")
        write_file(staging, (json.dumps(document, indent=2) + "\n").encode(), self.fsync)
        os.replace(staging, self.path)


def _open_partial(plan: ExtractionPlan) -> Tuple[Path, int, _Journal]:
    folder = partial_dir_for(plan.out_dir)
    plan.out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder, make=True)
    if lock is None:
        raise MergeError(f"another run writing {plan.out_dir} holds {folder}: wait for it or "
                         "choose another output")
    journal = _Journal(folder, plan.fingerprint, plan.options.fsync)
    leftovers = list(folder.iterdir())
    try:
        if leftovers and not (plan.options.resume or plan.options.force):
            raise MergeError(f"{folder} holds an interrupted extraction into {plan.out_dir}: "
                             "add --resume to finish it, or --force to start over")
        if leftovers and plan.options.resume:
            journal.load()
        else:
            for path in leftovers:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        (folder / PARTS).mkdir(exist_ok=True)
    except BaseException:
        os.close(lock)
        raise
    return folder, lock, journal


@dataclass
class ExtractionResult:
    out_dir: Path
    seconds: float
    report: List[dict]
    adapter_bytes: int
    already_complete: bool = False

    def summary(self) -> List[str]:
        decomposed = [r for r in self.report if r["kind"] in ("lora", "embedding")]
        whole = [r for r in self.report if r["kind"] == "whole"]
        unchanged = [r for r in self.report if r["kind"] == "unchanged"]
        lines = [f"extracted {len(decomposed)} LoRA modules (rank "
                 f"{max((r['rank'] for r in decomposed), default=0)} at most), "
                 f"{len(whole)} saved whole, {len(unchanged)} unchanged -> {self.out_dir} "
                 f"({self.adapter_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s"]
        if decomposed:
            errors = [r["error"] for r in decomposed]
            worst = max(decomposed, key=lambda r: r["error"])
            lines.append(f"relative error ||tau - BA|| / ||tau||: mean {np.mean(errors):.4f}, "
                         f"max {worst['error']:.4f} ({worst['module']}, rank {worst['rank']})")
        return lines


def extract(plan: ExtractionPlan, show_progress: bool = False) -> ExtractionResult:
    """Run a checked plan: the jobs into the partial folder (resuming the journal's), then the
    adapter assembled and published as OUT."""
    started = time.perf_counter()
    if plan.options.resume and (plan.out_dir / MANIFEST).is_file() \
            and _recorded_fingerprint(plan.out_dir) == plan.fingerprint:
        problems = verify_output(plan.out_dir)
        if problems:
            raise MergeError(f"{plan.out_dir} holds this extraction but fails verification "
                             f"({problems[0]}): rerun with --force")
        recorded = json_text.loads((plan.out_dir / MANIFEST).read_text())
        return ExtractionResult(plan.out_dir, time.perf_counter() - started,
                                recorded.get("extraction", {}).get("modules", []),
                                (plan.out_dir / ADAPTER_WEIGHTS).stat().st_size, True)
    download_inputs(_files_read(plan), show_progress)
    folder, lock, journal = _open_partial(plan)
    try:
        _run_jobs(plan, folder, journal, show_progress)
        report = [journal.parts[job.module]["report"] for job in plan.jobs]
        if not any(r["kind"] in ("lora", "embedding") for r in report):
            shutil.rmtree(folder, ignore_errors=True)
            journal.parts.clear()
            raise MergeError(f"every module of MODEL that could be decomposed equals BASE's (no "
                             f"singular value above --sv-epsilon {plan.options.sv_epsilon}): "
                             "there is no adapter to write")
        size = _publish(plan, folder, journal, report)
    except BaseException as exc:
        kept = bool(journal.parts)
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, (MergeError, OSError)):
            hint = (f"finished modules are kept in {folder}: rerun with --resume to go on"
                    if kept else f"nothing was kept; {plan.out_dir} is unchanged")
            raise MergeError(f"{exc}; {hint}") from exc
        raise
    finally:
        os.close(lock)
    return ExtractionResult(plan.out_dir, time.perf_counter() - started, report, size)


def _run_jobs(plan: ExtractionPlan, folder: Path, journal: _Journal,
              show_progress: bool) -> None:
    progress = Progress(sum(job.input_bytes for job in plan.jobs), "extracting",
                        enabled=show_progress)
    linalg = Linalg(plan.options.device)
    with InputMaps([plan.model, plan.base]) as maps:
        maps.check_unchanged()
        for index, job in enumerate(plan.jobs):
            if not journal.done(job.module):
                if job.kind == "whole":
                    tensors, report = _whole(job, maps)
                else:
                    tensors, report = _decompose(plan, job, maps, linalg)
                entry = {"report": report}
                if tensors:
                    entry.update(_write_part(folder / PARTS / f"{index:06d}.safetensors",
                                             tensors, plan.options.fsync))
                journal.record(job.module, entry)
            progress.advance(job.input_bytes)
    progress.close()


def _assemble(folder: Path, journal: _Journal, fsync: bool) -> Tuple[int, int]:
    """adapter_model.safetensors from the part files, tensors in name order: (size, CRC)."""
    pieces = []
    for part in journal.parts.values():
        if part.get("file"):
            header = read_header(folder / part["file"])
            pieces += [(name, entry, folder / part["file"]) for name, entry in
                       header.tensors.items()]
    pieces.sort(key=lambda piece: piece[0])
    header, _ = encode_header([EncodedTensor(n, e.dtype, e.shape, e.nbytes)
                               for n, e, _ in pieces], {"format": "pt"})
    path = folder / ADAPTER_WEIGHTS
    with open(path, "wb") as out:
        out.write(header)
        for _, entry, source in pieces:
            _copy_into(out, TensorLocation(source, entry))
        if fsync:
            out.flush()
            os.fsync(out.fileno())
    return path.stat().st_size, file_crc32c(path)


def _publish(plan: ExtractionPlan, folder: Path, journal: _Journal, report: List[dict]) -> int:
    size, crc = _assemble(folder, journal, plan.options.fsync)
    files = {ADAPTER_CONFIG: (json.dumps(adapter_config(plan, report), indent=2) + "\n").encode(),
             "README.md": model_card(plan, report).encode()}
    files.update((source.name, source.read_bytes()) for source in plan.side_files)
    recorded = {}
    for name, data in files.items():
        write_file(folder / name, data, plan.options.fsync)
        recorded[name] = {"size": len(data), "crc32c": crc_hex(file_crc32c(folder / name))}
    shutil.rmtree(folder / PARTS)
    manifest = {"format": FORMAT, "tool": f"mergealign-fast {__version__}",
                "kind": "lora-extraction", "fingerprint": plan.fingerprint,
                "inputs": {"model": str(plan.model.folder), "base": str(plan.base.folder)},
                "options": plan.options.identity(),
                "shards": {ADAPTER_WEIGHTS: {"size": size, "crc32c": crc_hex(crc)}},
                "files": recorded, "extraction": {"modules": report, "skipped": plan.skipped}}
    write_file(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(),
               plan.options.fsync)
    if plan.options.fsync:
        fsync_dir(folder)
    move_into_place(folder, plan.out_dir, plan.options.fsync)
    return size


def adapter_config(plan: ExtractionPlan, report: Sequence[dict]) -> dict:
    """PEFT's LoraConfig of the extracted adapter: lora_alpha = r for every module (scale 1)."""
    decomposed = {r["module"]: r["rank"] for r in report if r["kind"] in ("lora", "embedding")}
    rank = max(decomposed.values(), default=1)
    differing = {m: r for m, r in decomposed.items() if r != rank}
    whole = sorted({r["module"].rsplit(".", 1)[-1] for r in report if r["kind"] == "whole"})
    return {
        "base_model_name_or_path": plan.base_name, "peft_type": "LORA",
        "task_type": "CAUSAL_LM", "inference_mode": True, "r": rank, "lora_alpha": rank,
        "rank_pattern": differing, "alpha_pattern": differing, "use_rslora": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in decomposed}),
        "modules_to_save": whole or None, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": any(job.conv1d for job in plan.jobs if job.module in decomposed),
        "lora_bias": any(r.get("bias") for r in report), "use_dora": False,
        "init_lora_weights": True,
    }


def model_card(plan: ExtractionPlan, report: Sequence[dict]) -> str:
    rows = "\n".join(f"| {r['module']} | {r['kind']} | {r.get('rank', '')} | "
                     f"{r['error']:.4f} |" if "error" in r else
                     f"| {r['module']} | {r['kind']} | | |" for r in report)
    return (f"---\nbase_model: {plan.base_name}\nlibrary_name: peft\ntags:\n- mergealign-fast\n"
            f"- lora\n---\n\n# LoRA extracted by mergealign-fast\n\n"
            f"`{plan.model.folder}` minus `{plan.base_name}`, max rank {plan.options.max_rank}"
            f"{f', sv_epsilon {plan.options.sv_epsilon}' if plan.options.sv_epsilon else ''}.\n\n"
            "Relative error per module: ||tau - BA||_F / ||tau||_F of the stored factors.\n\n"
            f"| module | kind | rank | relative error |\n|---|---|---|---|\n{rows}\n")
