"""Arcee Fusion (mergekit's): base + τ_d where |τ_d|·KL(softmax(domain row) ‖ softmax(base row))
reaches median + 1.5·IQR of that importance over the tensor (exact quartiles: mergekit
estimates them from a random million elements of a larger tensor); the aligned model is not
used.  Numpy, window by window, on the CPU path (methods/windows/fusion.py)."""

from __future__ import annotations

from .core.spec import MergekitForm, MethodSpec, in_windows, others_at_least



METHODS = (MethodSpec(
    "arcee_fusion", "Arcee Fusion (mergekit's): base + τ_d where \\|τ_d\\|·KL(softmax(domain "
    "row) ‖ softmax(base row)) reaches median + 1.5·IQR of that importance over the tensor "
    "(exact quartiles); aligned unused", (), **in_windows("fusion"), mergekit=MergekitForm(
        config_roles=others_at_least("arcee_fusion", 1, exactly=True), registers="theirs"),
    parameters_doc="–"),)
