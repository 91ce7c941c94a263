"""Arcee Fusion (mergekit's): base + τ_d where |τ_d|·KL(softmax(domain row) ‖ softmax(base row))
reaches median + 1.5·IQR of that importance over the tensor (exact quartiles: mergekit
estimates them from a random million elements of a larger tensor); the aligned model is not
used.  Numpy, window by window, on the CPU path (methods/windows/fusion.py)."""

from __future__ import annotations

from .core.spec import WINDOWS, MergekitForm, MethodSpec, others_at_least


def merge_windows(s, tensor, windows):
    from .windows import fusion

    return fusion.merge_chunks(s, tensor, windows)


def window_elements(shape):
    from .windows import fusion

    return fusion.window_elements(shape)


METHODS = (MethodSpec(
    "arcee_fusion", "Arcee Fusion (mergekit's): base + τ_d where \\|τ_d\\|·KL(softmax(domain "
    "row) ‖ softmax(base row)) reaches median + 1.5·IQR of that importance over the tensor "
    "(exact quartiles); aligned unused", (), route=WINDOWS, merge_windows=merge_windows,
    window_elements=window_elements, mergekit=MergekitForm(
        config_roles=others_at_least("arcee_fusion", 1, exactly=True), registers="theirs"),
    parameters_doc="–"),)
