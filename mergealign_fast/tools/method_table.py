"""docs/methods.md's table of merge methods, generated from the registry:

    python -m mergealign_fast.tools.method_table > docs/methods.md

tests/test_registry.py checks that the file in the repository is what this prints."""

from __future__ import annotations

import sys

from .. import methods
from ..methods.core.spec import WINDOWS

HEADER = """# Merge methods

Generated from the registry (`python -m mergealign_fast.tools.method_table > docs/methods.md`);
each method is defined in its own module of `mergealign_fast/methods/`.  τ_d = domain − base,
τ_a = aligned − base; every `t` is how far toward the domain expert.  "sets": defined for a base
and any number of models (`merge_models`, mergekit configs of more than two models); "route":
the native recipe kernel (also on the GPU path) or numpy windows on the CPU path.

| `--method` | per element | parameters (default) | sets | route | mergekit |
|---|---|---|---|---|---|
"""


def rows():
    for spec in methods.specs():
        form = spec.mergekit
        inside = {"ours": "registered (ours)", "theirs": "registered (its spec)"}.get(
            form.registers, "configs only")
        route = "numpy windows" if spec.route == WINDOWS else "native recipe"
        if spec.vectors:
            route += ", or by " + "/".join(m for m in spec.vector_modes if m != "tensor")
        yield (f"| `{spec.name}` | {spec.summary} | {spec.parameters_doc or '–'} | "
               f"{'yes' if spec.contract.on_sets else 'no'} | {route} | {inside} |")


def table() -> str:
    return HEADER + "\n".join(rows()) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
