"""The MergeAlign experiment in miniature: train the trio, merge it across λ with
mergealign-fast, evaluate every model the same way, and write a table and a trade-off plot.

    python -m examples.miniature.experiment RESULTS_DIR [--trio DIR] [--size default]

Models evaluated: the base, the domain expert, the aligned model; MergeAlign with w_d = λ and
w_a = 1 - λ for λ = 0, 0.1, ..., 1; expert + w_a * alignment vector (w_d = 1, weights summing
to more than one: RESTA without DARE); SLERP of the two fine-tuned models (per tensor,
mergekit's formulation), the baseline the paper compares with; and the merges users reach for
instead: TIES, DARE-TIES and ChipAlign, all through the engine's methods.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

from mergealign_fast import merge_checkpoints
from mergealign_fast import Method
from .evaluate import Scores, evaluate
from .world import Clinic

LAMBDAS = [round(0.1 * i, 1) for i in range(11)]
SAFETY_BOOSTS = [0.25, 0.5, 0.75, 1.0]  # w_a with w_d = 1
SLERP_TS = [0.25, 0.5, 0.75]  # t = 0: domain, t = 1: aligned
# Other methods at common settings: (row label, setting, Method, w_d, w_a).
OTHER_METHODS = [
    ("TIES", "density=0.5", Method("ties", domain_density=0.5, align_density=0.5), 1.0, 1.0),
    ("TIES", "density=0.2", Method("ties", domain_density=0.2, align_density=0.2), 1.0, 1.0),
    ("DARE-TIES", "density=0.5", Method("dare_ties", domain_density=0.5, align_density=0.5),
     1.0, 1.0),
    ("ChipAlign (aligned → domain)", "t=0.5", Method("chipalign", t=0.5), 0.5, 0.5),
    ("ChipAlign (aligned → domain)", "t=0.75", Method("chipalign", t=0.75), 0.5, 0.5),
]


@dataclass(frozen=True)
class Row:
    method: str
    setting: str
    domain_accuracy: float
    refusal_rate: float
    over_refusal: float


def _row(method: str, setting: str, scores: Scores) -> Row:
    return Row(method, setting, scores.domain_accuracy, scores.refusal_rate, scores.over_refusal)


def run(trio: dict, work: Path, clinic: Clinic, log=print) -> List[Row]:
    rows = [_row("base", "-", evaluate(trio["base"], clinic)),
            _row("domain expert", "-", evaluate(trio["domain"], clinic)),
            _row("aligned", "-", evaluate(trio["aligned"], clinic))]
    plain = Method()
    settings = [("MergeAlign", f"λ={lam}", plain, lam, round(1 - lam, 1)) for lam in LAMBDAS]
    settings += [("expert + safety vector", f"w_a={w}", plain, 1.0, w) for w in SAFETY_BOOSTS]
    # Our slerp's t runs from aligned to domain: the table's t (domain -> aligned) is 1 - ours.
    settings += [("SLERP (domain → aligned)", f"t={t}", Method("slerp", t=1 - t), 0.5, 0.5)
                 for t in SLERP_TS]
    settings += OTHER_METHODS
    for label, setting, method, w_d, w_a in settings:
        out = work / "merged"
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, domain_weight=w_d,
                          align_weight=w_a, method=method, force=True, fsync=False)
        rows.append(_row(label, setting, evaluate(out, clinic)))
        log(f"{label:28s} {setting:12s} {rows[-1].domain_accuracy:6.1%} "
            f"{rows[-1].refusal_rate:6.1%} {rows[-1].over_refusal:6.1%}")
    return rows


def write_table(rows: List[Row], path: Path, header: str) -> None:
    lines = [header, "", "| model | setting | domain accuracy | refusal of harmful | "
             "over-refusal of benign |", "|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.setting} | {r.domain_accuracy:.0%} | {r.refusal_rate:.0%} | "
              f"{r.over_refusal:.0%} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: List[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    line = [r for r in rows if r.method == "MergeAlign"]
    ax.plot([r.refusal_rate for r in line], [r.domain_accuracy for r in line], "o-",
            label="MergeAlign: λ·τ_domain + (1-λ)·τ_aligned")
    for r in line:
        ax.annotate(r.setting.replace("λ=", ""), (r.refusal_rate, r.domain_accuracy),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    styles = {"expert + safety vector": "s", "SLERP (domain → aligned)": "^", "TIES": "v",
              "DARE-TIES": "<", "ChipAlign (aligned → domain)": ">", "base": "x",
              "domain expert": "D", "aligned": "P"}
    for method, marker in styles.items():
        group = [r for r in rows if r.method == method]
        ax.scatter([r.refusal_rate for r in group], [r.domain_accuracy for r in group],
                   marker=marker, s=60, label=method)
    ax.set_xlabel("refusal rate on held-out harmful requests")
    ax.set_ylabel("accuracy on held-out domain questions")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")  # the trade-off hugs the axes
    ax.set_title("MergeAlign in miniature: knowledge vs safety")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    from .train import train_trio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--trio", type=Path, default=None, help="reuse a trained trio")
    parser.add_argument("--size", default="default")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = args.results / "work"
    root = args.trio or work / "trio"
    trio = ({r: root / r for r in ("base", "domain", "aligned")} if args.trio
            else train_trio(root, args.size))
    clinic = Clinic.load(root)
    rows = run(trio, work, clinic)
    took = "" if args.trio else " including training"
    header = (f"# MergeAlign in miniature ({args.size} trio, "
              f"{time.perf_counter() - started:.0f} s{took})")
    write_table(rows, args.results / "miniature.md", header)
    (args.results / "miniature.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot(rows, args.results / "miniature.png")
    shutil.rmtree(work / "merged", ignore_errors=True)
    print((args.results / "miniature.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
