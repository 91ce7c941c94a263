"""--compute-dtype mergekit: each merged tensor computed whole, in torch, by its method's
mergekit form (MergekitForm.arithmetic; the shared pieces in methods/core/in_torch.py), in the
dtype mergekit computes in — the config's `dtype`, else the inputs' promoted dtype — and
written in the dtype mergekit writes: `out_dtype`, else the method's result dtype (the plan
set it: plan/mergekit_arithmetic.py).

Not streamed: every input of a tensor is held whole, with the method's temporaries (a few
times the tensor in memory, as in mergekit).  The inputs are read as the other routes read
them (a vocabulary gathered by token, an adapter folded in), so only the arithmetic differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from ...dtypes import DType, to_torch
from ...errors import MergeError
from ...io.stream import InputMaps, tensor_chunks
from ...methods.core.in_torch import MergekitGroup
from ...output import ShardFile, write_fully
from ...plan import MergePlan, PlannedTensor
from ...plan.mergekit_arithmetic import compute_dtype_of


def _whole_inputs(tensor: PlannedTensor, maps: InputMaps, compute: DType) -> List[object]:
    """Each source of `tensor` (base first) as a torch tensor of its shape, in `compute`."""
    import torch

    from ...methods.windows.per_vector import decoded

    if tensor.count == 0:
        return [torch.zeros(tensor.shape, dtype=to_torch(compute)) for _ in tensor.sources]
    chunk = next(iter(tensor_chunks(tensor.sources, maps, tensor.count, rows=tensor.rows)))
    # decoded: the exact float32 value of each stored element (bf16, fp16 and fp32 widen
    # exactly), so casting it to `compute` rounds as casting the stored value would.
    return [torch.from_numpy(x).reshape(tensor.shape).to(to_torch(compute), copy=True)
            for x in decoded(chunk)]  # (copied out of the reused workspace)


def mergekit_group(plan: MergePlan, settings, inputs: Sequence[object]) -> MergekitGroup:
    """The inputs by model, as mergekit's method sees them: each model once (a role that
    repeats another's folder is the same model), in mergekit's order, base_model apart (none
    when the config has no base_model: the base role only stood in)."""
    roles = ("base", *plan.model_roles)
    of_role = dict(zip(roles, inputs))
    parameters = {"base": (settings.w_base, 1.0, 0.0, 0.0)}
    for i, role in enumerate(settings.roles):
        parameters[role] = (settings.weights[i], settings.densities[i], settings.gammas[i],
                            settings.epsilons[i] if settings.epsilons else 0.0)
    base = "base" if plan.options.mergekit_has_base else None
    folder_of = {role: plan.inputs[role].folder.resolve() for role in roles}
    # A folder in two roles is one model, with the parameters of the role that holds them:
    # the base role, unless it only stands in for a model (no base_model, and the method does
    # not weigh the base: linear and karcher do).
    stands_in = base is None and not settings.spec.contract.weighs_base
    distinct: Dict[Path, str] = {}
    for role in (*roles[1:], "base") if stands_in else roles:
        distinct.setdefault(folder_of[role], role)
    order = [folder_of[r] for r in plan.options.mergekit_order if r in folder_of]
    entries = list(dict.fromkeys(distinct[f] for f in order + list(distinct)))
    others = [r for r in entries if r != base]

    def each(field: int, of: List[str]) -> List[float]:
        return [parameters[r][field] for r in of]

    return MergekitGroup(
        base=of_role[base] if base is not None else None,
        others=[of_role[r] for r in others], entries=[of_role[r] for r in entries],
        other_weights=each(0, others), entry_weights=each(0, entries),
        other_densities=each(1, others), other_gammas=each(2, others),
        other_epsilons=each(3, others))


def _computed(settings, group: MergekitGroup, name: str):
    """The method's mergekit form on one tensor; where mergekit would raise (antipodal models
    under multislerp, ...), a one-line MergeError naming the tensor."""
    try:
        return settings.spec.mergekit.arithmetic(settings, group)
    except (ValueError, RuntimeError) as exc:
        raise MergeError(f"tensor {name}: {settings.name} in mergekit's arithmetic: "
                         f"{str(exc).splitlines()[0]}") from None


def write_mergekit_tensor(targets: Sequence[ShardFile], tensor: PlannedTensor,
                          plans: Sequence[MergePlan], maps: InputMaps, file_offset: int) -> None:
    """targets[j] gets `tensor` merged by plans[j]'s method in mergekit's arithmetic, at
    file_offset, checksummed in file order (the writer must have drained first)."""
    import torch

    from ...kernels import cpu

    native = cpu.native()
    if plans[0].options.threads:  # as mergekit's -j sets them: torch splits long sums by them
        torch.set_num_threads(plans[0].options.threads)
    inputs = _whole_inputs(tensor, maps, compute_dtype_of(plans[0].options, tensor))
    for target, plan in zip(targets, plans):
        settings = plan.settings[tensor.name]
        group = mergekit_group(plan, settings, inputs)
        if tensor.count == 0:
            merged = torch.zeros(tensor.shape)
        else:
            merged = _computed(settings, group, tensor.name)
        stored = merged.to(to_torch(tensor.out_dtype)).contiguous().reshape(-1)
        raw = stored.view(torch.uint8).numpy()
        write_fully(target.fd, memoryview(raw), file_offset, target.path)
        target.checksum.add(native.crc32c(raw.ctypes.data, raw.nbytes), raw.nbytes)
        target.add_nonfinite(tensor.name, int((~torch.isfinite(stored)).sum()))
