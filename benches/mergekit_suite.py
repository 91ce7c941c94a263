"""mergekit's own test suite through our runner: every configuration its tests merge.

mergekit's tests build tiny models and call `run_merge(config, ...)` (through their
`tests/common.py` or directly).  This plugin wraps it: each configuration is also written as
YAML and run through `mergealign-fast mergekit-yaml` (with the flags of the test's MergeOptions
that change what is merged: --unsafe-truncate-embeddings, --allow-crimes); accepted ones are
compared tensor by tensor with what mergekit's own run_merge writes, refused ones keep their
one-line reason.  mergekit's test then
goes on with mergekit's output, so its own assertions still run.

    # mergekit's tests, from its source distribution (or a checkout of its repository):
    pip download mergekit==0.1.5 --no-binary :all: --no-deps -d /tmp/mk && tar -xzf ...
    cd /tmp/mk/mergekit-0.1.5 && python -m pytest tests -p mergekit_suite \
        --rootdir . -q  # with benches/ on PYTHONPATH
    # then: python benches/mergekit_suite.py summary mergekit-suite.jsonl

Each configuration becomes one JSON line in $MERGEKIT_SUITE_OUT (default mergekit-suite.jsonl):
the test, the method, ours "accepted" or "refused" (with the reason), and for accepted ones how
many tensors are bit-identical, how many differ and the largest difference relative to the
tensor's largest magnitude.  Outputs whose tensors are named otherwise (mergekit 0.1.5 writes
LLaVA models under transformers' newer names) are compared under that renaming.

With MERGEKIT_SUITE_BACKEND=1 the suite runs the other way: every configuration whose method
mergealign_fast.mergekit.backend registers runs inside mergekit with our kernels (the method
renamed mergealign_<method>), mergekit's test checks that output, and a second run with
mergekit's own method is compared with it as above (records say "via": "backend").
"""

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

from mergealign_fast.vocabulary import VOCABULARY_TENSOR

OUT = Path(os.environ.get("MERGEKIT_SUITE_OUT", "mergekit-suite.jsonl"))
BACKEND = os.environ.get("MERGEKIT_SUITE_BACKEND") == "1"
# transformers' newer LLaVA layout (what mergekit 0.1.5 writes) of the older names.
RENAMED_PREFIXES = (("language_model.model.", "model.language_model."),
                    ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."))
_current_test = {"id": ""}


def pytest_configure(config):
    """Wrap mergekit's run_merge before the test modules import it (some call it directly)."""
    import mergekit.merge

    mergekit.merge.run_merge = _wrapped(mergekit.merge.run_merge)


def pytest_runtest_setup(item):
    _current_test["id"] = item.nodeid
    import tests.common as common  # importable once pytest put mergekit's checkout on the path

    common.run_merge = _wrapped(common.run_merge)


def _wrapped(original):
    """run_merge that also runs the configuration through ours (once: wrapping is idempotent)."""
    if getattr(original, "wrapped_by_mergealign", False):
        return original

    def run_both(merge_config, out_path, options=None, **kwargs):
        if BACKEND:
            return _through_backend(original, merge_config, out_path, options, **kwargs)
        text = merge_config.to_yaml()  # before mergekit rewrites `models` into `modules`
        try:
            original(merge_config, out_path=out_path, options=options, **kwargs)
        except Exception as exc:  # the test expects it: do we refuse it as well?
            _record(merge_config.merge_method, text, None, _flags(options),
                    f"{type(exc).__name__}: {exc}")
            raise
        _record(merge_config.merge_method, text, Path(out_path), _flags(options))

    run_both.wrapped_by_mergealign = True
    return run_both


def _through_backend(run_merge, merge_config, out_path, options, **kwargs) -> None:
    """mergekit's run with our kernels into out_path (the test checks it), compared with a run
    of mergekit's own method."""
    from mergealign_fast.mergekit import backend as mergekit_backend

    method = merge_config.merge_method
    if method not in {s.name for s in mergekit_backend.registered_specs()}:
        return run_merge(merge_config, out_path=out_path, options=options, **kwargs)
    mergekit_backend.register()
    record = {"test": _current_test["id"], "method": method, "via": "backend"}
    with tempfile.TemporaryDirectory() as theirs:
        run_merge(merge_config.model_copy(deep=True), out_path=theirs, options=options, **kwargs)
        ours = merge_config.model_copy(update={"merge_method": mergekit_backend.PREFIX + method})
        try:
            run_merge(ours, out_path=out_path, options=options, **kwargs)
        except Exception as exc:
            record.update(ours="crashed", reason=f"{type(exc).__name__}: {exc}"[:300])
            raise
        finally:
            if "ours" not in record:
                record.update(ours="accepted", **_compare(Path(out_path), Path(theirs)))
            with OUT.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _flags(options) -> list:
    """mergekit-yaml's flags for the MergeOptions of a test that change what is merged."""
    flags = {"unsafe_truncate_embeddings": "--unsafe-truncate-embeddings",
             "allow_crimes": "--allow-crimes"}
    return [flag for option, flag in flags.items() if getattr(options, option, False)]


def _record(method: str, text: str, theirs: Optional[Path], flags: list,
            theirs_refused: Optional[str] = None) -> None:
    """Run the configuration through ours and record how it compares (theirs None: mergekit
    raised `theirs_refused`)."""
    record = {"test": _current_test["id"], "method": method}
    if theirs is None:
        record["mergekit"] = f"raised {theirs_refused}"[:200]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yml"
        config.write_text(text)
        done = subprocess.run([sys.executable, "-m", "mergealign_fast", "mergekit-yaml",
                               str(config), str(Path(tmp) / "ours"), "--quiet", *flags],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            crashed = any(line.startswith("Traceback") for line in lines)  # a defect
            errors = [line for line in lines if "error:" in line] or lines[-1:]
            record.update(ours="crashed" if crashed else "refused",
                          reason=(lines[-1] if crashed else errors[0]) if lines
                          else f"exit {done.returncode}")
        elif theirs is None:
            record.update(ours="accepted")
        else:
            record.update(ours="accepted", **_compare(Path(tmp) / "ours", theirs))
    with OUT.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _compare(ours: Path, theirs: Path) -> dict:
    import numpy as np
    from mergealign_fast.dtypes import DType
    from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
    from mergealign_fast.methods.core.oracle import decode_to_f64

    mine, other = open_checkpoint(ours), open_checkpoint(theirs)
    names = {name: name for name in mine.tensors}
    if not set(other.tensors) <= set(names.values()):
        names = {name: _renamed(name) for name in mine.tensors}
    if not set(other.tensors) <= set(names.values()):
        return {"tensors": "differ", "missing": sorted(set(other.tensors) - set(names.values()))
                [:5], "extra": sorted(set(names.values()) - set(other.tensors))[:5]}
    # mergekit 0.1.5 leaves a LLaVA model's language model out of its output (writing the
    # vision tower and projector only): those are ours alone, the rest is compared.
    only_ours = sorted(name for name, theirs_name in names.items()
                       if theirs_name not in other.tensors)
    equal = differ = 0
    worst = 0.0
    in_their_order = _token_order(ours, theirs)
    for name, loc in mine.tensors.items():
        if name in only_ours:
            continue
        a, b = read_elements(loc), read_elements(other.tensors[names[name]])
        if in_their_order is not None and VOCABULARY_TENSOR.search(name) \
                and loc.entry.shape == other.tensors[name].entry.shape:
            a = a.reshape(loc.entry.shape[0], -1)[in_their_order(loc.entry.shape[0])].ravel()
        their_dtype = other.tensors[names[name]].entry.dtype
        if loc.entry.dtype != their_dtype or a.tobytes() != b.tobytes():
            differ += 1
            x = decode_to_f64(a, DType[loc.entry.dtype]) if loc.entry.dtype in DType.__members__ \
                else a.astype(np.float64)
            y = decode_to_f64(b, DType[their_dtype]) if their_dtype in DType.__members__ \
                else b.astype(np.float64)
            scale = max(float(np.max(np.abs(y))) if y.size else 0.0, 1e-30)
            worst = max(worst, float(np.max(np.abs(x - y))) / scale if x.size else 0.0)
        else:
            equal += 1
    renamed = any(name != theirs_name for name, theirs_name in names.items())
    return {"equal": equal, "differ": differ, "worst_relative": worst, "renamed": renamed,
            "only_ours": len(only_ours), "only_ours_example": only_ours[:1]}


def _renamed(name: str) -> str:
    for old, new in RENAMED_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _token_order(ours: Path, theirs: Path):
    """For outputs whose tokenizers hold the same tokens under other ids (a union: mergekit
    adds tokens in its hash map's order, we in each model's id order), a function giving, for a
    vocabulary tensor of n rows, our row of each of their rows; None when the ids agree."""
    import numpy as np
    from mergealign_fast.vocabulary import token_ids

    try:
        mine, other = token_ids(ours / "tokenizer.json"), token_ids(theirs / "tokenizer.json")
    except (OSError, ValueError):
        return None
    if mine == other or set(mine) != set(other):
        return None

    def order(rows: int):
        index = np.arange(rows)
        for token, their_id in other.items():
            if their_id < rows:
                index[their_id] = mine[token]
        return index

    return order


def summary(path: Path) -> None:
    """Counts of a results file: accepted (bitwise / within 1e-2 relative / more), refused by
    reason."""
    every = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    through_backend = [r for r in every if r.get("via") == "backend"]
    if through_backend:
        _backend_summary(through_backend)
    records = [r for r in every if r.get("via") != "backend" and "mergekit" not in r]
    _refused_by_mergekit([r for r in every if "mergekit" in r])
    if not records:
        return
    accepted = [r for r in records if r["ours"] == "accepted"]
    refused = [r for r in records if r["ours"] != "accepted"]
    bitwise = sum(1 for r in accepted if r.get("differ") == 0)
    close = sum(1 for r in accepted if r.get("differ") and r["worst_relative"] <= 1e-2)
    renamed = sum(1 for r in accepted if r.get("renamed"))
    partial = [r for r in accepted if r.get("only_ours")]
    print(f"{len(records)} configurations: {len(accepted)} accepted ({bitwise} bitwise "
          f"mergekit's, {close} within 1% of the largest magnitude, "
          f"{len(accepted) - bitwise - close} further; {renamed} compared under transformers' "
          f"newer LLaVA tensor names), {len(refused)} refused")
    if partial:
        print(f"  {len(partial)} of them: mergekit's output lacks tensors ours has (e.g. "
              f"{partial[0]['only_ours']} of {partial[0]['test'].split('::')[-1]}, such as "
              f"{partial[0]['only_ours_example'][0]}); the tensors both wrote are compared")
    for method, count in Counter(r["method"] for r in refused).most_common():
        reasons = Counter(f"{r['ours']}: {r['reason'].split('.yml: ', 1)[-1][:100]}"
                          for r in refused if r["method"] == method)
        print(f"  {method}: {count} ({'; '.join(f'{n} x {why}' for why, n in reasons.items())})")
    for r in accepted:
        if r.get("differ") and r["worst_relative"] > 1e-2 or r.get("tensors"):
            detail = f"worst {r['worst_relative']:.3g} of the largest magnitude, {r['differ']} " \
                f"tensors" if "differ" in r else f"other tensor names, e.g. {r['missing'][:2]}"
            print(f"  differs: {r['test'].split('::')[-1]} ({r['method']}): {detail}")


def _refused_by_mergekit(records) -> None:
    """Configurations mergekit raised on (its tests expect it): ours should refuse them too."""
    if not records:
        return
    both = [r for r in records if r["ours"] == "refused"]
    print(f"{len(records)} configurations mergekit refuses (its tests expect an error): "
          f"{len(both)} refused by ours too")
    for r in records:
        print(f"  {r['test'].split('::')[-1]}: mergekit {r['mergekit'][:90]}; ours "
              f"{r['ours']}{': ' + r['reason'].split('error: ')[-1][:90] if 'reason' in r else ''}")


def _backend_summary(records) -> None:
    ran = [r for r in records if r["ours"] == "accepted"]
    bitwise = sum(1 for r in ran if r.get("differ") == 0)
    print(f"{len(records)} configurations inside mergekit with our kernels: {len(ran)} ran "
          f"({bitwise} bitwise mergekit's own method's output), "
          f"{len(records) - len(ran)} failed")
    for r in records:
        if r["ours"] != "accepted":
            print(f"  failed: {r['test'].split('::')[-1]} ({r['method']}): {r['reason']}")
        elif r.get("differ"):
            print(f"  differs: {r['test'].split('::')[-1]} ({r['method']}): worst "
                  f"{r['worst_relative']:.3g} of the largest magnitude, {r['differ']} tensors")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "summary":
    summary(Path(sys.argv[2]))
