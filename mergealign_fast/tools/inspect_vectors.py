"""`mergealign-fast inspect`: the domain and alignment vectors, per tensor and per layer.

One streaming pass over the three models (memory-mapped, released as it goes, like a merge)
computes, in fp64 inside the native kernel, for every tensor: ‖τ_d‖, ‖τ_a‖, cos(τ_d, τ_a), the
fraction of elements whose signs conflict, and the distance of the merged model
θ = base + w_d τ_d + w_a τ_a to each parent.  The distances follow from the same three sums:
‖θ - θ_domain‖² = (w_d-1)²‖τ_d‖² + w_a²‖τ_a‖² + 2(w_d-1)w_a τ_d·τ_a, and symmetrically.
Writes JSON and CSV (per tensor and per layer) and a PNG chart per layer.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..dtypes import from_safetensors
from ..io.checkpoint import layer_index
from ..kernels import cpu
from ..kernels.cpu import default_threads
from ..methods.core.parameters import check_weights
from ..sources import download_inputs
from ..plan import ROLES, check_inputs
from ..io.stream import InputMaps, pass_chunks


@dataclass
class Sums:
    """Accumulated fp64 sums of a set of elements (a tensor, a layer, the model)."""

    count: int = 0
    domain_sq: float = 0.0
    align_sq: float = 0.0
    dot: float = 0.0
    conflicts: int = 0
    both_nonzero: int = 0

    def add(self, other: "Sums") -> None:
        for name in ("count", "domain_sq", "align_sq", "dot", "conflicts", "both_nonzero"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def report(self, w_domain: float, w_align: float) -> Dict[str, Optional[float]]:
        """The statistics; the cosine is None (undefined) when a task vector is zero."""
        norms = math.sqrt(self.domain_sq) * math.sqrt(self.align_sq)
        to_domain = ((w_domain - 1) ** 2 * self.domain_sq + w_align ** 2 * self.align_sq
                     + 2 * (w_domain - 1) * w_align * self.dot)
        to_aligned = (w_domain ** 2 * self.domain_sq + (w_align - 1) ** 2 * self.align_sq
                      + 2 * w_domain * (w_align - 1) * self.dot)
        return {
            "elements": self.count,
            "norm_domain": math.sqrt(self.domain_sq),
            "norm_align": math.sqrt(self.align_sq),
            "cosine": self.dot / norms if norms > 0 else None,
            "sign_conflict_fraction": self.conflicts / self.count if self.count else 0.0,
            "conflicts_among_both_changed": (self.conflicts / self.both_nonzero
                                             if self.both_nonzero else 0.0),
            "merged_to_domain": math.sqrt(max(to_domain, 0.0)),
            "merged_to_aligned": math.sqrt(max(to_aligned, 0.0)),
        }


def layer_of(name: str) -> str:
    index = layer_index(name)
    if index is not None:
        return f"layer {index:03d}"
    if "embed" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    return "other"


@dataclass
class Inspection:
    w_domain: float
    w_align: float
    tensors: Dict[str, Sums] = field(default_factory=dict)

    def layers(self) -> Dict[str, Sums]:
        grouped: Dict[str, Sums] = {}
        for name, sums in self.tensors.items():
            grouped.setdefault(layer_of(name), Sums()).add(sums)
        return dict(sorted(grouped.items()))

    def model(self) -> Sums:
        total = Sums()
        for sums in self.tensors.values():
            total.add(sums)
        return total


def inspect_checkpoints(base, domain, aligned, *, domain_weight: float = 0.5,
                        align_weight: float = 0.5, threads: Optional[int] = None) -> Inspection:
    """The per-tensor sums of one streaming pass over the trio (checked first, as a merge)."""
    check_weights(domain_weight, align_weight)
    models = check_inputs(base, domain, aligned)
    download_inputs(f for model in models.values() for f in model.files)  # Hub models
    native = cpu.native()
    threads = threads or default_threads()
    result = Inspection(domain_weight, align_weight)
    with InputMaps(models.values()) as maps:
        maps.check_unchanged()
        for name in models["base"].tensors:
            locations = [models[r].tensors[name] for r in ROLES]
            if from_safetensors(locations[0].entry.dtype) is None:
                continue  # an integer/bool buffer, the same in the three models: no vectors
            result.tensors[name] = _tensor_sums(native, maps, locations, threads)
    return result


def _tensor_sums(native, maps: InputMaps, locations, threads: int) -> Sums:
    """One pass over a tensor in the engine's windows (released as it goes)."""
    sums = Sums()
    for chunk in pass_chunks(locations, maps):
        values = native.vector_stats(chunk.operands(), threads)
        sums.add(Sums(chunk.count, *values[:5]))  # the task-vector sums (not the models')
        chunk.release_inputs()
    return sums


def write_reports(inspection: Inspection, out_dir: Path) -> List[Path]:
    """vectors.json, tensors.csv, layers.csv and (with matplotlib) layers.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    w = (inspection.w_domain, inspection.w_align)
    tensors = {n: s.report(*w) for n, s in inspection.tensors.items()}
    layers = {n: s.report(*w) for n, s in inspection.layers().items()}
    document = {"domain_weight": w[0], "align_weight": w[1],
                "model": inspection.model().report(*w), "layers": layers, "tensors": tensors}
    written = [out_dir / "vectors.json", out_dir / "tensors.csv", out_dir / "layers.csv"]
    written[0].write_text(json.dumps(document, indent=1) + "\n")
    _write_csv(written[1], "tensor", tensors)
    _write_csv(written[2], "layer", layers)
    if _plot_layers(layers, out_dir / "layers.png"):
        written.append(out_dir / "layers.png")
    return written


def _write_csv(path: Path, key: str, rows: Dict[str, Dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        columns = next(iter(rows.values()), {}).keys()
        writer = csv.writer(f)
        writer.writerow([key, *columns])
        for name, row in rows.items():
            writer.writerow([name, *row.values()])


def _plot_layers(layers: Dict[str, Dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, len(names) * 0.35), 6), sharex=True)
    top.plot(names, [layers[n]["norm_domain"] for n in names], "o-", label="‖τ_domain‖")
    top.plot(names, [layers[n]["norm_align"] for n in names], "s-", label="‖τ_aligned‖")
    top.set_ylabel("norm")
    top.legend(fontsize=8)
    cosines = [math.nan if layers[n]["cosine"] is None else layers[n]["cosine"] for n in names]
    bottom.plot(names, cosines, "o-", label="cos(τ_d, τ_a)")
    bottom.plot(names, [layers[n]["sign_conflict_fraction"] for n in names], "s-",
                label="sign-conflict fraction")
    bottom.set_ylabel("fraction / cosine")
    bottom.legend(fontsize=8)
    bottom.tick_params(axis="x", rotation=90, labelsize=7)
    fig.suptitle("domain and alignment vectors per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(inspection: Inspection) -> List[str]:
    model = inspection.model().report(inspection.w_domain, inspection.w_align)
    layers = {n: s.report(inspection.w_domain, inspection.w_align)
              for n, s in inspection.layers().items()}
    worst = sorted(layers, key=lambda n: layers[n]["sign_conflict_fraction"], reverse=True)[:3]
    return [
        f"{len(inspection.tensors)} tensors, {model['elements']:,} elements",
        f"‖τ_domain‖ = {model['norm_domain']:.4g}   ‖τ_aligned‖ = {model['norm_align']:.4g}   "
        "cos = " + ("undefined (a task vector is zero)" if model["cosine"] is None
                    else f"{model['cosine']:.4f}"),
        f"signs conflict on {model['sign_conflict_fraction']:.1%} of elements "
        f"({model['conflicts_among_both_changed']:.1%} of those both fine-tunes changed)",
        f"merged (w_d={inspection.w_domain}, w_a={inspection.w_align}): "
        f"‖θ - θ_domain‖ = {model['merged_to_domain']:.4g}, "
        f"‖θ - θ_aligned‖ = {model['merged_to_aligned']:.4g}",
        "most conflicted: " + ", ".join(
            f"{n} ({layers[n]['sign_conflict_fraction']:.1%})" for n in worst),
    ]
