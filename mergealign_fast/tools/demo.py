"""`mergealign-fast demo`: the main job on a built-in example.

Builds (once, in a cache folder) a deterministic Llama-shaped base/domain/aligned trio of ~156M
parameters each, merges it with the paper's equal weights, checks sampled tensors against the
float64 oracle, and prints time, throughput and peak memory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from ..api import merge_checkpoints
from ..errors import MergeError
from .oracle_check import check_against_oracle
from ..units import human_bytes
from .synthetic import LLAMA_DEMO, ensure_synthetic_trio

DEMO_FOLDER = "demo-llama-156m-v1"


def default_cache_dir() -> Path:
    if os.environ.get("MERGEALIGN_CACHE"):
        return Path(os.environ["MERGEALIGN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mergealign-fast"


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """VmHWM of this process: resident-set peak, mapped file pages included."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_demo(cache_dir: Optional[os.PathLike] = None, threads: Optional[int] = None,
             quiet: bool = False) -> bool:
    root = Path(cache_dir or default_cache_dir()) / DEMO_FOLDER
    if not (root / "COMPLETE").exists():
        print(f"building the demo trio ({LLAMA_DEMO.parameters / 1e6:.0f}M parameters x 3, "
              f"bf16) in {root} ...", flush=True)
        started = time.perf_counter()
        ensure_synthetic_trio(root, LLAMA_DEMO)
        print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    folders = {role: root / role for role in ("base", "domain", "aligned")}
    out = root / "merged"
    weights = dict(domain_weight=0.5, align_weight=0.5)
    peak_known = reset_peak_rss()
    result = merge_checkpoints(folders["base"], folders["domain"], folders["aligned"], out,
                               force=True, threads=threads, progress=not quiet, **weights)
    peak = peak_rss_bytes() if peak_known else None
    report = check_against_oracle(folders["base"], folders["domain"], folders["aligned"], out,
                                  weights["domain_weight"], weights["align_weight"])
    print(f"merged   {result.tensors} tensors, {human_bytes(result.output_bytes)} -> {out}")
    print(f"time     {result.seconds:.3f} s  ({result.gb_per_s:.1f} GB/s counting 3 inputs read "
          f"+ 1 output written)")
    print("memory   peak RSS during the merge: "
          + (human_bytes(peak) if peak else "unknown on this OS"))
    verdict = "PASS" if report.passed else "FAIL"
    print(f"oracle   {verdict}: {report.elements_checked:,} elements in "
          f"{report.tensors_checked} tensors; worst error {report.worst_error_ratio:.2f} x the "
          f"derived bound ({report.worst_tensor})")
    return report.passed


def run_trained_demo(cache_dir: Optional[os.PathLike] = None, quiet: bool = False) -> bool:
    """`demo --trained`: the miniature MergeAlign experiment's demo (examples/miniature/demo.py).
    It is research code, not installed with the package: it runs from a source checkout."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    if not (examples / "miniature" / "demo.py").is_file():
        raise MergeError("demo --trained runs the miniature experiment of the source repository "
                         "(examples/miniature), which is not installed with the package: clone "
                         "the repository and install it with pip install -e '.[showcase]'")
    if str(examples.parent) not in sys.path:
        sys.path.insert(0, str(examples.parent))
    from examples.miniature.demo import run

    return run(Path(cache_dir or default_cache_dir()), quiet)
