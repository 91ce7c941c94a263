"""Long run of the kill test: SIGKILL real merges at random moments, check, then --resume.

    python benches/kill_harness.py --kills 60

Each round starts `merge --resume --force` on the demo-sized trio (311 MB per model, 16 shards
of 20 MB) and kills it after a random delay within one merge's duration (interpreter start
included); afterwards OUT must be absent (or complete and
verified, if the merge won the race) and the partial folder the recognisable one.  At the end
`--resume` must finish the job with an output bitwise identical to an uninterrupted merge.
Prints the counts recorded in benches/RESULTS.md.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mergealign_fast.tools.synthetic import LLAMA_DEMO, ensure_synthetic_trio  # noqa: E402
from test_engine import all_tensors_bytes  # noqa: E402
from test_resilience import kill_and_resume, merge_cmd  # noqa: E402

SHARD = "20MB"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trio = ensure_synthetic_trio(tmp / "trio", LLAMA_DEMO, seed=5)
        subprocess.run(merge_cmd(trio, tmp / "reference", shard=SHARD), check=True)
        reference = all_tensors_bytes(tmp / "reference")
        counts = kill_and_resume(trio, tmp / "out", reference, args.kills, args.seed, SHARD)
    print(f"kills: {counts['rounds']} rounds; {counts['killed']} killed before OUT appeared (OUT "
          f"absent each time; {counts['with_completed_shards']} of them left completed shards), "
          f"{counts['killed_after_publish']} killed after (OUT complete and "
          f"verified), {counts['finished_first']} finished first; final --resume bitwise "
          f"identical: {'yes' if counts['resumed_ok'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
