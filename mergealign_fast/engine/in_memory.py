"""merge_tensors: the fused merge on in-memory numpy arrays and torch CPU tensors."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..kernels import cpu, get_kernel
from ..kernels.buffer import Buffer
from ..kernels.cpu import default_threads
from .routes import BY_VECTORS, IN_WINDOWS, WindowedTensor, route_of, window_elements
from .. import methods
from ..methods.core.spec import WINDOWS
from ..methods.core.parameters import Method, check_weights, set_method
from ..methods.core.passes import SetPasses, TensorPasses
from ..methods.core.settings import layer_position, resolve, settings_problems
from ..methods.core.recipes import set_recipe, tensor_recipe


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def _device_of(x: Any) -> str:
    return x.device.type if _is_torch(x) else "cpu"


def as_buffer(x: Any, label: str) -> Buffer:
    """A zero-copy Buffer over a contiguous numpy array or torch tensor (CPU or CUDA)."""
    if _is_torch(x):
        if x.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{label} is on {x.device}; only CPU and CUDA tensors are supported")
        if not x.is_contiguous():
            raise ValueError(f"{label} must be contiguous (call .contiguous() first)")
        return Buffer(x.data_ptr(), dtypes.from_torch(x.dtype), x.numel(), owner=x)
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise ValueError(f"{label} must be C-contiguous (use np.ascontiguousarray)")
        return Buffer(x.ctypes.data, dtypes.from_numpy(x.dtype), x.size, owner=x)
    raise TypeError(f"{label} must be a numpy array or a torch tensor (got {type(x).__name__})")


def checked_out(out: Any, threads: Optional[int]) -> Buffer:
    """The output's Buffer, refused where the kernel would write what the caller cannot have
    meant: a read-only array (a bytes buffer, a read-only map), or a thread count below 1."""
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out is read-only (a bytes buffer or a read-only map?): give a "
                         "writable array, or none to get a new one")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a whole number of at least 1 (got {threads!r})")
    return as_buffer(out, "out")


def _allocate_like(template: Any, dtype: DType) -> Any:
    if _is_torch(template):
        import torch

        return torch.empty(tuple(template.shape), dtype=dtypes.to_torch(dtype),
                           device=template.device)
    return np.empty(template.shape, dtype=dtypes.storage_numpy_dtype(dtype))


def _common_device(*tensors: Any) -> str:
    devices = {str(t.device) if _is_torch(t) else "cpu" for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"inputs and output must be on one device (got {sorted(devices)})")
    return _device_of(tensors[0])


def _check_no_partial_overlap(out: Buffer, inputs: dict) -> None:
    """In-place output over an input of the same dtype is safe element by element; a shifted
    or differently sized overlap would read values the kernel already overwrote."""
    out_end = out.address + out.nbytes
    for label, buf in inputs.items():
        exact_alias = buf.address == out.address and buf.dtype == out.dtype
        disjoint = buf.address + buf.nbytes <= out.address or out_end <= buf.address
        if not (exact_alias or disjoint or out.count == 0):
            raise ValueError(f"out partially overlaps {label}")


def merge_tensors(base: Any, domain: Any, aligned: Any, *, domain_weight: float = 0.5,
                  align_weight: float = 0.5, out: Any = None,
                  out_dtype: Any = None, backend: str = "auto",
                  threads: Optional[int] = None, method: Union[Method, str, None] = None,
                  name: str = "") -> Any:
    """out = base + domain_weight*(domain - base) + align_weight*(aligned - base), in one pass.

    `method` (a methods.Method or its name) runs another merge method on the CPU instead (the
    native kernel, or window by window as a checkpoint merge runs it), the weights being its
    w_d and w_a; `name` is the tensor's name, which keys DARE's and DELLA's random masks (the
    same name and seed give the same masks as a checkpoint merge).

    Inputs are numpy arrays (float32/float16, bf16 as uint16 bits) or torch tensors
    (float32/float16/bfloat16) of one shape, all on the CPU or all on one CUDA device; their
    dtypes may differ.  Math is fp32 with one rounding to the output dtype (default: base's
    dtype).  Returns `out` (allocated like `base` when not given).  backend: auto, cpu, cuda,
    triton or torch; auto takes cuda, then triton, for CUDA tensors and cpu for host memory.
    """
    check_weights(domain_weight, align_weight)
    inputs = {"base": as_buffer(base, "base"), "domain": as_buffer(domain, "domain"),
              "aligned": as_buffer(aligned, "aligned")}
    shapes = {label: tuple(x.shape) for label, x in (("base", base), ("domain", domain),
                                                      ("aligned", aligned))}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")
    if out_dtype is not None:
        out_dtype = dtypes.as_dtype(out_dtype)
    if out is None:
        out = _allocate_like(base, inputs["base"].dtype if out_dtype is None else out_dtype)
    out_buf = checked_out(out, threads)
    if tuple(out.shape) != shapes["base"]:
        raise ValueError(f"out has shape {tuple(out.shape)}, inputs have {shapes['base']}")
    if out_dtype is not None and out_buf.dtype is not out_dtype:
        raise ValueError(f"out has dtype {out_buf.dtype.short_name}, out_dtype asks "
                         f"{out_dtype.short_name}")
    _check_no_partial_overlap(out_buf, inputs)
    device = _common_device(base, domain, aligned, out)
    method = Method(method) if isinstance(method, str) else method
    if method is not None and not method.is_plain_task_arithmetic:
        problems = method.problems()
        if problems:
            raise ValueError("; ".join(problems))
        if device != "cpu" or backend not in ("auto", "cpu"):
            raise ValueError(f"method {method.name} needs CPU tensors and the cpu backend (its "
                             "statistics passes read host memory); on a GPU, merge checkpoints "
                             "with merge_checkpoints(device='cuda')")
        _merge_with_method(inputs, out_buf, method, name, float(domain_weight),
                           float(align_weight), threads or default_threads(),
                           shapes["base"])
        return out
    kernel = get_kernel(backend, device)
    kernel(inputs["base"], inputs["domain"], inputs["aligned"], out_buf,
           float(domain_weight), float(align_weight), threads or default_threads())
    return out


def _merge_with_method(inputs: dict, out: Buffer, method: Method, name: str, w_domain: float,
                       w_align: float, threads: int, shape) -> None:
    """One tensor through the method's reduction passes and the recipe kernel, or window by
    window in numpy (engine/routes.py), as a merge of model folders does."""
    native = cpu.native()
    b, d, a = inputs["base"], inputs["domain"], inputs["aligned"]
    settings = resolve(method, name, layer_position(name, 0), (w_domain, w_align))
    problems = settings_problems(settings, f"tensor {name}" if name else method.name)
    if problems:
        raise ValueError("; ".join(problems))
    if route_of(settings, shape) in (BY_VECTORS, IN_WINDOWS):
        _merge_in_windows(settings, [b, d, a], out, name, tuple(shape), threads)
        return

    def windows():  # the whole tensor is one window: it is in memory already
        yield cpu.operands(b, d, a, out), lambda: None

    recipe = tensor_recipe(native, settings, name, out.count, TensorPasses(native, windows,
                                                                           threads))
    cpu.merge_recipe(b, d, a, out, recipe, 0, threads)


def merge_set_tensors(base: Any, models: Sequence[Any], *, method: str = "task_arithmetic",
                      parameters: Optional[Dict[str, object]] = None,
                      per_model: Optional[Sequence[Dict[str, object]]] = None,
                      base_parameters: Optional[Dict[str, object]] = None, out: Any = None,
                      out_dtype: Any = None, threads: Optional[int] = None,
                      name: str = "", roles: Optional[Sequence[str]] = None) -> Any:
    """One tensor of a base and any number of models (1 to 32) in memory, by a model-set
    method (methods.set_names(): a native recipe, or window by window in numpy) or another
    numpy-window method of one model (arcee_fusion): what merge_models does to each tensor of model folders, bit for
    bit.

    `parameters` are the shared ones (lambda, normalize, rescale, seed, ...), `per_model` one
    mapping per model (weight, density, gamma), `base_parameters` the base's (linear and
    karcher weigh it); `name` and `roles` key DARE's and DELLA's random masks as in a
    checkpoint merge (roles: "model 1", "model 2", ... as merge_models names them; a config of
    one or two models runs as the trio, "domain" and "aligned").  Inputs as merge_tensors'
    (CPU only); out_dtype defaults to base's."""
    from ..methods.core.spec import SET_ROLE

    if not models:
        raise ValueError("merge_set_tensors needs at least one model besides the base")
    labels = ["base"] + [f"model {i + 1}" for i in range(len(models))]
    tensors = [base, *models]
    buffers = [as_buffer(x, label) for x, label in zip(tensors, labels)]
    shapes = {label: tuple(x.shape) for label, x in zip(labels, tensors)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")
    if _common_device(*tensors) != "cpu":
        raise ValueError("merge_set_tensors needs CPU tensors (its passes read host memory)")
    on_sets = methods.set_names()
    one_model = [s.name for s in methods.specs() if s.route == WINDOWS and s.name not in on_sets]
    if method not in on_sets and method not in one_model:
        raise ValueError(f"merge_set_tensors merges by {', '.join(on_sets)} or "
                         f"{', '.join(one_model)} (got {method!r})")
    if method not in on_sets and len(models) != 1:
        raise ValueError(f"{method} merges a base and one model (got {len(models)})")
    roles = tuple(roles or (SET_ROLE.format(i + 1) for i in range(len(models))))
    chosen = set_method(method, parameters, {**dict(zip(roles, per_model or [{}] * len(models))),
                                             "base": base_parameters or {}})
    settings = resolve(chosen, name, layer_position(name, 0), (float("nan"),) * len(models),
                       roles)
    problems = chosen.problems() + settings_problems(settings, f"tensor {name}" if name
                                                     else method)
    if problems:
        raise ValueError("; ".join(problems))
    out_dtype = buffers[0].dtype if out_dtype is None else dtypes.as_dtype(out_dtype)
    if out is None:
        out = _allocate_like(base, out_dtype)
    out_buf = checked_out(out, threads)
    if tuple(out.shape) != shapes["base"] or out_buf.dtype is not out_dtype:
        raise ValueError(f"out must have the inputs' shape {shapes['base']} and dtype "
                         f"{out_dtype.short_name}")
    _check_no_partial_overlap(out_buf, dict(zip(labels, buffers)))
    threads = threads or default_threads()
    if route_of(settings, ()) == IN_WINDOWS:
        _merge_in_windows(settings, buffers, out_buf, name, tuple(shapes["base"]), threads)
        return out
    native = cpu.native()

    def pair_windows(i, j):  # the whole tensor is one window: it is in memory already
        yield cpu.operands(buffers[0], buffers[i + 1], buffers[j + 1], out_buf), lambda: None

    recipe = set_recipe(native, settings, name, out_buf.count,
                        SetPasses(native, pair_windows, len(models), threads))
    native.merge_set(native.SetOperands(buffers[0].address, int(buffers[0].dtype),
                                        [b.address for b in buffers[1:]],
                                        [int(b.dtype) for b in buffers[1:]], out_buf.count,
                                        int(out_dtype), 0),
                     out_buf.address, recipe, threads)
    return out


def _merge_in_windows(settings, buffers, out: Buffer, name: str, shape, threads: int) -> None:
    """A tensor merged window by window in numpy (vector by vector: per_vector.py; a method of
    a method's merge_windows) over in-memory buffers: the windows, passes and roundings of a merge of
    model folders (engine.py), each merged window rounded into `out` by the kernel."""
    from ..io.stream import Chunk, ResidentInput
    from ..methods.windows import per_vector

    by_vectors = route_of(settings, shape) == BY_VECTORS
    elements = window_elements(settings, shape)
    inputs = [ResidentInput(b.address) for b in buffers]

    def windows(placed: bool = False):
        for start in range(0, out.count, elements):
            count = min(elements, out.count - start)
            placed_inputs = tuple((x, start * b.dtype.itemsize, count * b.dtype.itemsize)
                                  for x, b in zip(inputs, buffers))
            yield Chunk(start, count, placed_inputs, tuple(b.dtype for b in buffers),
                        file_offset=0)

    if by_vectors:
        found = per_vector.vector_coefficients(
            settings, per_vector.vector_sums(settings, shape, windows()))
        merged = (per_vector.scaled_chunk(settings, shape, found, chunk) for chunk in windows())
    else:
        tensor = WindowedTensor(name, tuple(shape), out.count, tuple(buffers))
        merged = settings.spec.merge_windows(settings, tensor, windows)
    recipe = per_vector.merge_recipe(cpu.native())
    for chunk in merged:
        held = [Buffer(x.address, DType.F32, chunk.count) for x, _, _ in chunk.inputs]
        target = Buffer(out.address + chunk.start * out.dtype.itemsize, out.dtype, chunk.count)
        cpu.merge_recipe(*held, target, recipe, chunk.start, threads)
