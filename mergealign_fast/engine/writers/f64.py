"""Tensors stored as F64 in every model, merged in float64.

The native kernels compute in fp32; a float64 tensor that differs between the models (rare:
some research checkpoints, some buffers) is merged here instead, with numpy, in float64 and
stored as F64, for the methods whose recipe needs no statistics pass (those whose spec has an f64 formula).  It is
read with pread, window by window (bounded memory; a file truncated meanwhile gives a short
read, not a crash).
"""

from __future__ import annotations

import os
from typing import List, Sequence

from ...io import stream
from ...methods.core.settings import TensorSettings
from ...output import ShardFile, write_fully
from ...plan import PlannedTensor
from ...io.stream import InputChanged

F64_ITEMSIZE = 8


def merge_f64(settings: TensorSettings, b, *models):
    """The method's value in float64 (numpy arrays; the models in the order of
    settings.weights), by its spec's f64 formula (task arithmetic, linear)."""
    return _canonical_nan(settings.spec.f64(settings, b, *models))


def _canonical_nan(merged):
    """NaN stored as numpy's one quiet NaN (0x7ff8000000000000), as the kernels store theirs."""
    import numpy as np

    return np.where(np.isnan(merged), np.nan, merged)


def _read_window(files, tensor: PlannedTensor, start: int, count: int) -> List:
    import numpy as np

    windows = []
    for f, loc in zip(files, tensor.sources):
        data = os.pread(f.fileno(), count * F64_ITEMSIZE, loc.entry.begin + start * F64_ITEMSIZE)
        if len(data) != count * F64_ITEMSIZE:
            raise InputChanged(f"{loc.file}: tensor {tensor.name} shrank while it was being read")
        windows.append(np.frombuffer(data, dtype="<f8"))
    return windows


def write_f64_tensor(targets: Sequence[ShardFile], tensor: PlannedTensor,
                     settings: Sequence[TensorSettings], file_offset: int) -> None:
    """targets[j] gets `tensor` merged with settings[j] (one per plan of a sweep) at
    file_offset, checksummed in file order: the writer must have drained first."""
    import numpy as np

    from ...kernels import cpu

    native = cpu.native()
    step = stream.WINDOW_BYTES // F64_ITEMSIZE
    files = [open(loc.file, "rb") for loc in tensor.sources]
    try:
        for start in range(0, tensor.count, step):
            count = min(step, tensor.count - start)
            inputs = _read_window(files, tensor, start, count)
            for target, s in zip(targets, settings):
                merged = np.ascontiguousarray(merge_f64(s, *inputs), dtype="<f8")
                nbytes = merged.nbytes
                crc = native.crc32c(merged.ctypes.data, nbytes)
                write_fully(target.fd, memoryview(merged).cast("B"),
                            file_offset + start * F64_ITEMSIZE, target.path)
                target.checksum.add(crc, nbytes)
                target.add_nonfinite(tensor.name, int(np.count_nonzero(~np.isfinite(merged))))
    finally:
        for f in files:
            f.close()
