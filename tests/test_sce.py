"""SCE (sce.py) against its float64 statement, on any window size, with ties at the selection's
threshold, through `run`, and refused off the CPU path."""

import numpy as np
import pytest

from mergealign_fast import merge_checkpoints, merge_models
from mergealign_fast.methods.windows import sce
from mergealign_fast.dtypes import DType
from mergealign_fast.errors import PlanError
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.mergekit.config import load
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.methods.core.oracle import method_error_bound

from conftest import write_checkpoint


def _models(root, count, shape, seed, quantum=None):
    """A base and `count` fine-tunes as folders; the fine-tunes' τ in fp32 (as the merge rounds
    them) and the base, in float64.  quantum: τ multiples of it, so variances tie often."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    models = []
    for _ in range(count):
        step = rng.standard_normal(shape) * 0.05
        if quantum is not None:
            step = np.round(step / quantum) * quantum
        models.append((base + step).astype(np.float32))
    for i, x in enumerate([base, *models]):
        write_checkpoint(root / f"m{i}", {"w": x})
    taus = [(x - base).astype(np.float64) for x in models]  # fp32 differences
    return base.astype(np.float64), taus


def _merged(out):
    return read_elements(open_checkpoint(out).tensors["w"]).astype(np.float64)


def _reference(select_topk, base, taus):
    flat = base.ravel()
    return sce.reference(select_topk, flat, [flat + t.ravel() for t in taus])


@pytest.mark.parametrize("count, select_topk", [(2, 1.0), (2, 0.3), (4, 0.5), (3, 0.0)])
def test_within_the_fp32_bound_of_the_statement(tmp_path, count, select_topk):
    base, taus = _models(tmp_path, count, (41, 23), seed=count)
    merge_models(tmp_path / "m0", [tmp_path / f"m{i + 1}" for i in range(count)],
                 tmp_path / "out", method="sce", parameters={"select_topk": select_topk})
    exact = _reference(select_topk, base, taus)
    # Each output: base + a weighted mean of kept τ, in fp32: a few roundings of the largest
    # of |base| and the τ, bounded as the kernels' weighted sums are.
    scale = np.abs(base.ravel()) + np.max(np.abs(np.stack(taus)), axis=0).ravel()
    bound = method_error_bound(exact, scale, DType.F32, model_count=count)
    assert np.all(np.abs(_merged(tmp_path / "out") - exact) <= bound)


def test_ties_at_the_threshold_kept_in_index_order_on_any_window(tmp_path, monkeypatch):
    """Quantized τ make many equal variances: exactly k are kept, the first in index order,
    whether a window holds the tensor or 7 elements."""
    base, taus = _models(tmp_path, 3, (30, 20), seed=9, quantum=0.05)
    outputs = []
    for window in (1 << 20, 7):
        monkeypatch.setattr(sce, "WINDOW_ELEMENTS", window)
        out = tmp_path / f"out{window}"
        merge_models(tmp_path / "m0", [tmp_path / f"m{i}" for i in (1, 2, 3)], out,
                     method="sce", parameters={"select_topk": 0.35})
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
    exact = _reference(0.35, base, taus)
    scale = np.abs(base.ravel()) + np.max(np.abs(np.stack(taus)), axis=0).ravel()
    bound = method_error_bound(exact, scale, DType.F32, model_count=3)
    assert np.all(np.abs(_merged(tmp_path / f"out{1 << 20}") - exact) <= bound)


def test_selection_counts_exactly_k(tmp_path):
    """The threshold passes find the k-th largest variance exactly (ties included)."""
    from mergealign_fast.methods.core.settings import resolve
    from mergealign_fast.methods.core.spec import SET_ROLE
    from mergealign_fast.io.stream import InputMaps, tensor_chunks

    _, taus = _models(tmp_path, 3, (50, 40), seed=4, quantum=0.02)
    var = np.stack(taus).var(axis=0).astype(np.float32)
    k = int(np.count_nonzero(var) * 0.4)
    roles = tuple(SET_ROLE.format(i + 1) for i in range(3))
    settings = resolve(Method("sce", select_topk=0.4), "w", 0.0, (float("nan"),) * 3, roles)
    checkpoints = [open_checkpoint(tmp_path / f"m{i}") for i in range(4)]
    sources = tuple(c.tensors["w"] for c in checkpoints)
    with InputMaps(checkpoints) as maps:
        def windows(placed=False):
            return tensor_chunks(sources, maps, 113)

        mask = sce.Mask(sce.select(settings, windows))
        kept = sum(int(mask(sce._task_vectors(chunk)).sum()) for chunk in windows())
    assert kept == k


def test_run_reads_select_topk_and_ignores_weights(tmp_path):
    _models(tmp_path, 2, (8, 8), seed=2)
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: sce\nbase_model: {tmp_path / 'm0'}\n"
                      "parameters: {select_topk: 0.25}\nmodels:\n"
                      f"  - model: {tmp_path / 'm1'}\n    parameters: {{weight: 0.3}}\n"
                      f"  - model: {tmp_path / 'm2'}\n")
    run = load(config)
    from mergealign_fast.methods.core.settings import resolve

    assert resolve(run.method, "w", 0.0, (float("nan"),) * 2).select_topk == 0.25
    assert any("`weight` does not apply to sce" in w for w in run.warnings)


def test_refused_off_the_cpu_and_out_of_range(tmp_path):
    _models(tmp_path, 2, (4, 4), seed=3)
    with pytest.raises(PlanError, match="sce runs on the CPU path"):
        merge_checkpoints(tmp_path / "m0", tmp_path / "m1", tmp_path / "m2", tmp_path / "o",
                          method=Method("sce"), device="cuda")
    assert Method("sce", select_topk=1.5).problems() == [
        "sce: select_topk must be between 0 and 1 (got 1.5)"]
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: sce\nbase_model: {tmp_path / 'm0'}\n"
                      "parameters: {select_topk: 1.5}\nmodels:\n"
                      f"  - model: {tmp_path / 'm1'}\n  - model: {tmp_path / 'm2'}\n")
    with pytest.raises(PlanError, match=r"select_topk must be between 0 and 1 \(got 1.5\)"):
        merge_checkpoints(*(tmp_path / f"m{i}" for i in range(3)), tmp_path / "o2",
                          method=load(config).method)
    assert not (tmp_path / "o2").exists()
