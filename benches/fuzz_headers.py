"""Coverage-guided fuzz of the safetensors/index parsing and the merge path, with atheris.

    python benches/fuzz_headers.py -runs=100000

Each input drives the generator of tests/hostile_files.py (valid files, and files broken in
every way the format can break); the rule checked is the suite's: a clear one-line error naming
the folder, or a merge whose output verifies.  A crash, hang or any other exception is a failure
(atheris stops and saves the input).  Prints the count of cases and how they ended.
"""

import sys
import tempfile
from collections import Counter
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

with atheris.instrument_imports():
    import mergealign_fast.io.checkpoint  # noqa: F401
    import mergealign_fast.io.safetensors_format  # noqa: F401
    import mergealign_fast.plan  # noqa: F401
    from hostile_files import build_folder, check_folder

OUTCOMES = Counter()
WORKDIR = Path(tempfile.mkdtemp(prefix="mergealign-fuzz-"))


def chooser(provider):
    def choose(kind, *args):
        if kind == "bool":
            return provider.ConsumeBool()
        return provider.ConsumeIntInRange(*args)
    return choose


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    case = WORKDIR / "case"
    import shutil

    shutil.rmtree(case, ignore_errors=True)
    build_folder(chooser(provider), case / "model")
    OUTCOMES[check_folder(case / "model", case / "out")] += 1
    total = sum(OUTCOMES.values())
    if total % 10000 == 0:  # libFuzzer exits without running atexit handlers
        print(f"fuzz: {total} cases, {dict(OUTCOMES)}", flush=True)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
