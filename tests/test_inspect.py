"""`inspect`: fp64 task-vector statistics against a numpy float64 oracle, reports, CLI."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mergealign_fast.dtypes import DType
from mergealign_fast.tools.inspect_vectors import inspect_checkpoints, layer_of, write_reports
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.methods.core.oracle import decode_to_f64
from mergealign_fast.tools.synthetic import LLAMA_TINY, write_synthetic_model

from conftest import small_model, write_checkpoint


def oracle(trio, name, w_d, w_a):
    b, d, a = (decode_to_f64(read_elements(open_checkpoint(trio[r]).tensors[name]),
                             DType[open_checkpoint(trio[r]).tensors[name].entry.dtype])
               for r in ("base", "domain", "aligned"))
    td, ta = d - b, a - b
    merged = b + w_d * td + w_a * ta
    return {"norm_domain": np.linalg.norm(td), "norm_align": np.linalg.norm(ta),
            "cosine": td @ ta / (np.linalg.norm(td) * np.linalg.norm(ta)),
            "sign_conflict_fraction": np.mean(td * ta < 0),
            "merged_to_domain": np.linalg.norm(merged - d),
            "merged_to_aligned": np.linalg.norm(merged - a)}


def test_statistics_match_the_float64_oracle(tiny_trio, tmp_path):
    trio = dict(tiny_trio)  # mixed dtypes: the domain model in fp16
    trio["domain"] = write_synthetic_model(tmp_path / "d16", LLAMA_TINY, "domain", seed=3,
                                           dtype=DType.F16)
    inspection = inspect_checkpoints(trio["base"], trio["domain"], trio["aligned"],
                                     domain_weight=0.3, align_weight=0.9, threads=2)
    assert set(inspection.tensors) == set(open_checkpoint(trio["base"]).tensors)
    for name, sums in inspection.tensors.items():
        got, want = sums.report(0.3, 0.9), oracle(trio, name, 0.3, 0.9)
        for key, value in want.items():
            # fp64 sums of <= 25k terms in a different order: agreement to ~1e-12 relative
            assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-12), (name, key)


def test_reports_and_layers(tiny_trio, tmp_path):
    inspection = inspect_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"])
    written = {p.name for p in write_reports(inspection, tmp_path / "report")}
    assert {"vectors.json", "tensors.csv", "layers.csv"} <= written
    document = json.loads((tmp_path / "report" / "vectors.json").read_text())
    assert set(document["layers"]) == {"embeddings", "layer 000", "layer 001", "lm_head", "other"}
    assert document["model"]["elements"] == LLAMA_TINY.parameters
    rows = list(csv.DictReader(open(tmp_path / "report" / "tensors.csv")))
    assert len(rows) == len(LLAMA_TINY.tensors()) and "cosine" in rows[0]
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "layer 012"


def test_cli_prints_a_summary_and_rejects_mismatched_models(tiny_trio, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mergealign_fast", "inspect",
                           tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                           "-o", tmp_path / "report"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cos =" in proc.stdout and "signs conflict on" in proc.stdout
    for seed, role in enumerate(("base", "domain", "aligned")):
        write_checkpoint(tmp_path / role, small_model(seed, vocab=40 if role == "aligned" else 32))
    proc = subprocess.run([sys.executable, "-m", "mergealign_fast", "inspect",
                           *(tmp_path / r for r in ("base", "domain", "aligned"))],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "aligned has 8 extra rows" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("threads", [1, 3])
def test_statistics_do_not_depend_on_chunking(tiny_trio, monkeypatch, threads):
    from mergealign_fast.io import stream

    whole = inspect_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                                threads=threads)
    monkeypatch.setattr(stream, "WINDOW_BYTES", 4 * 1000)  # 1000-element windows
    chunked = inspect_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                                  threads=threads)
    for name in whole.tensors:
        a, b = whole.tensors[name], chunked.tensors[name]
        assert (a.conflicts, a.count) == (b.conflicts, b.count)
        assert math.isclose(a.dot, b.dot, rel_tol=1e-12, abs_tol=1e-15)
