"""Methods vector by vector (per_vector.py): mergekit's nuslerp with nuslerp_flatten false (rows,
or columns with nuslerp_row_wise) and Model Stock with filter_wise, against the whole-tensor
float64 oracle applied to each vector, on any window and thread count, and refused where the
engine cannot run them."""

import zlib

import numpy as np
import pytest

from mergealign_fast import merge_checkpoints, merge_tensors, sweep_checkpoints
from mergealign_fast.methods.windows import per_vector
from mergealign_fast.dtypes import DType
from mergealign_fast.errors import PlanError
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.mergekit.config import load
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.methods.core.settings import resolve
from mergealign_fast.plan import MergeOptions, plan_set
from mergealign_fast.methods.core.oracle import decode_to_f64, method_error_bound, method_ref

from conftest import write_checkpoint

CASES = [("nuslerp", "rows"), ("nuslerp", "columns"), ("nuslerp_models", "rows"),
         ("nuslerp_models", "columns"), ("model_stock", "rows")]
# Shapes with the dtype each is stored in: a matrix, a 3-D tensor, a 1-D one (one vector).
SHAPES = [((7, 33), DType.BF16), ((3, 5, 4), DType.F32), ((13,), DType.BF16)]
WEIGHTS = (0.3, 0.7)


def _trio(root, shape, dtype, seed):
    """Base and two fine-tunes of it as model folders; their values as float64."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    values = [base] + [(base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
                       for _ in range(2)]
    stored = [(v.view(np.uint32) >> 16).astype(np.uint16) if dtype is DType.BF16 else v
              for v in values]
    for name, v in zip("bda", stored):
        write_checkpoint(root / name, {"w": v})
    return [decode_to_f64(v, dtype).reshape(shape) for v in stored]


def _vectors_of(x: np.ndarray, vectors: str) -> np.ndarray:
    """Each vector as a row: the last dimension's, or the first's (a 1-D tensor is one)."""
    if x.ndim < 2:
        return x.reshape(1, -1)
    if vectors == "rows":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1).T


def _merged(out, shape) -> np.ndarray:
    loc = open_checkpoint(out).tensors["w"]
    return decode_to_f64(read_elements(loc), DType[loc.entry.dtype]).reshape(shape)


@pytest.mark.parametrize("shape, dtype", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_each_vector_within_the_oracle_bound(case, shape, dtype, tmp_path):
    name, vectors = case
    b, d, a = _trio(tmp_path, shape, dtype, zlib.crc32(f"{case}{dtype}{shape}".encode()))
    merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", tmp_path / "out",
                      method=Method(name, vectors=vectors), domain_weight=WEIGHTS[0],
                      align_weight=WEIGHTS[1])
    got = _vectors_of(_merged(tmp_path / "out", shape), vectors)
    whole = resolve(Method(name), "w", 0.0, WEIGHTS)  # the oracle of one vector
    for v, (bv, dv, av) in enumerate(zip(*(_vectors_of(x, vectors) for x in (b, d, a)))):
        exact, scale = method_ref(whole, "w", bv, dv, av)
        bound = method_error_bound(exact, scale, dtype)
        assert np.all(np.abs(got[v] - exact) <= bound), (v, np.max(np.abs(got[v] - exact)))


def test_vectors_are_not_the_whole_tensor(tmp_path):
    """The mode changes the result (the test above would pass a kernel ignoring it only if
    every row had the tensor's angle)."""
    _trio(tmp_path, (6, 40), DType.F32, 3)
    outs = {}
    for vectors in ("tensor", "rows", "columns"):
        outs[vectors] = tmp_path / vectors
        merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", outs[vectors],
                          method=Method("nuslerp", vectors=vectors), domain_weight=0.3,
                          align_weight=0.7)
    merged = {k: _merged(v, (6, 40)) for k, v in outs.items()}
    assert not np.array_equal(merged["tensor"], merged["rows"])
    assert not np.array_equal(merged["rows"], merged["columns"])


def test_inputs_cast_first_are_the_merge_of_the_cast_inputs(tmp_path):
    """mergekit's `dtype` (input_dtype here): fp32 models cast to bf16 merge as their bf16
    copies do (rounded to nearest even), vector by vector too."""
    from mergealign_fast.dtypes import f32_to_bf16_bits

    values = _trio(tmp_path, (6, 20), DType.F32, 13)
    for name, x in zip("bda", values):
        write_checkpoint(tmp_path / f"bf16-{name}", {"w": f32_to_bf16_bits(x.astype(np.float32))})
    method = Method("nuslerp", vectors="rows")
    merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", tmp_path / "cast",
                      method=method, input_dtype=DType.BF16, out_dtype=DType.BF16)
    merge_checkpoints(*(tmp_path / f"bf16-{n}" for n in "bda"), tmp_path / "copies",
                      method=method, out_dtype=DType.BF16)
    assert (tmp_path / "cast" / "model.safetensors").read_bytes() == \
        (tmp_path / "copies" / "model.safetensors").read_bytes()


def test_the_same_bits_on_any_window_and_thread_count(tmp_path, monkeypatch):
    _trio(tmp_path, (9, 31), DType.BF16, 5)
    outputs = []
    for window, threads in ((1 << 20, 2), (7, 1), (64, 2)):
        monkeypatch.setattr(per_vector, "WINDOW_ELEMENTS", window)
        out = tmp_path / f"out-{window}-{threads}"
        merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", out,
                          method=Method("nuslerp", vectors="columns"), domain_weight=0.4,
                          align_weight=0.6, threads=threads)
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_a_sweep_is_each_merge(tmp_path):
    _trio(tmp_path, (5, 12), DType.BF16, 7)
    sweep_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", tmp_path / "sweep",
                      [0.25, 0.75], method=Method("nuslerp", vectors="rows"))
    for lam in (0.25, 0.75):
        one = tmp_path / f"one-{lam}"
        merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", one,
                          method=Method("nuslerp", vectors="rows"), domain_weight=lam,
                          align_weight=1 - lam)
        swept = next((tmp_path / "sweep").glob(f"*{lam}*"))
        assert (swept / "model.safetensors").read_bytes() == \
            (one / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", [Method("nuslerp", vectors="rows"),
                                    Method("nuslerp", vectors="columns"),
                                    Method("model_stock", vectors="rows")])
def test_flat_buffers_merge_as_model_folders_do(tmp_path, monkeypatch, method):
    """merge_tensors (in memory, as the mergekit backend calls it) gives the bytes of a
    checkpoint merge, vector by vector, windows of a few lines included."""
    monkeypatch.setattr(per_vector, "WINDOW_ELEMENTS", 40)  # windows of 3 rows of 13
    rng = np.random.default_rng(4)
    b = rng.standard_normal((9, 13)).astype(np.float32)
    d, a = ((b + 0.1 * rng.standard_normal(b.shape)).astype(np.float32) for _ in range(2))
    for label, x in zip("bda", (b, d, a)):
        write_checkpoint(tmp_path / label, {"w": x})
    merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", tmp_path / "out",
                      method=method, domain_weight=0.3, align_weight=0.7)
    loc = open_checkpoint(tmp_path / "out").tensors["w"]
    merged = merge_tensors(b, d, a, method=method, domain_weight=0.3, align_weight=0.7,
                           name="w")
    assert merged.tobytes() == read_elements(loc).tobytes()


def test_what_cannot_run_vector_by_vector_is_refused(tmp_path):
    _trio(tmp_path, (4, 8), DType.F32, 9)
    assert Method("ties", vectors="rows").problems() == [
        "ties: vectors 'rows': it takes tensor"]
    assert "takes tensor, rows" in Method("model_stock", vectors="columns").problems()[0]
    with pytest.raises(PlanError, match="runs on the CPU path"):
        merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", tmp_path / "o",
                          method=Method("nuslerp", vectors="rows"), device="cuda")
    with pytest.raises(PlanError, match="merges two models besides the base"):
        plan_set(tmp_path / "b", [tmp_path / "d", tmp_path / "a", tmp_path / "d"],
                 tmp_path / "o", MergeOptions(method=Method("model_stock", vectors="rows")))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options, method, vectors", [
    ("nuslerp_flatten: false", "nuslerp", "rows"),
    ("nuslerp_flatten: false, nuslerp_row_wise: true", "nuslerp", "columns"),
    ("nuslerp_row_wise: true", "nuslerp", "tensor"),  # flattened: row_wise means nothing
    ("filter_wise: true", "model_stock", "rows"),
])
def test_mergekit_s_options_choose_the_vectors(tiny_trio, tmp_path, options, method, vectors):
    weights = "\n    parameters: {weight: 0.5}" if method == "nuslerp" else ""
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: {method}\nbase_model: {tiny_trio['base']}\n"
                      f"parameters: {{{options}}}\nmodels:\n"
                      f"  - model: {tiny_trio['domain']}{weights}\n"
                      f"  - model: {tiny_trio['aligned']}{weights}\n")
    assert load(config).method.vectors == vectors


def test_an_option_of_another_method_is_ignored_with_a_warning(tiny_trio, tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: ties\nbase_model: {tiny_trio['base']}\n"
                      "parameters: {filter_wise: true, density: 0.5}\nmodels:\n"
                      f"  - model: {tiny_trio['domain']}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {tiny_trio['aligned']}\n    parameters: {{weight: 0.5}}\n")
    run = load(config)
    assert run.method.vectors == "tensor"
    assert any("`filter_wise` does not apply to ties" in w for w in run.warnings)
