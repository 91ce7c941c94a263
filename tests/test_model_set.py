"""Merges of a base and any number of models (mergekit configs of 3+ models): the native set
kernel against the float64 oracle, against the trio kernel bit for bit, and through
`merge_models` and `run`."""

import json
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

from mergealign_fast import merge_models
from mergealign_fast.dtypes import DType, storage_numpy_dtype
from mergealign_fast.errors import PlanError
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.kernels import cpu
from mergealign_fast.methods.core.spec import KEEP_LARGEST, KEEP_RANDOM
from mergealign_fast.methods.core.settings import resolve
from mergealign_fast.methods.core.parameters import set_method
from mergealign_fast.plan import MAX_SET_MODELS
from mergealign_fast.methods.core.spec import SET_ROLE
from mergealign_fast.methods.core.oracle import decode_to_f64, method_error_bound, method_ref

from conftest import random_values, write_checkpoint

native = cpu.native()

FIELDS = ("weight", "scale", "sparsify", "min_magnitude_bits", "last_tie_index", "keep_below",
          "key_lo", "key_hi")


def _as_set_recipe(recipe):
    """The SetRecipe of two models that a trio Recipe describes."""
    out = native.SetRecipe()
    for name in ("kind", "sign_election", "normalize", "lambda_", "base_weight", "divisor"):
        setattr(out, name, getattr(recipe, name))
    for m, term in enumerate((recipe.domain, recipe.align)):
        for name in FIELDS:
            setattr(out.term(m), name, getattr(term, name))
    return out


def _trio_recipes():
    """Recipes of every kind the set kernel has, with every sparsification."""
    recipes = []
    for kind, election, normalize in [(1, 1, 1), (1, 1, 0), (1, 0, 1), (1, 0, 0), (2, 0, 0)]:
        r = native.Recipe()
        r.kind, r.sign_election, r.normalize = kind, election, normalize
        r.lambda_, r.divisor, r.base_weight = 0.7, 1.3, 0.2
        r.domain.weight, r.align.weight = 0.6, -0.45
        r.domain.sparsify, r.domain.keep_below = KEEP_RANDOM, 1 << 23
        r.domain.key_lo, r.domain.key_hi, r.domain.scale = 5, 9, 2.0
        r.align.sparsify, r.align.min_magnitude_bits = KEEP_LARGEST, 0x3C000000
        recipes.append(r)
    return recipes


@pytest.mark.parametrize("dtype", [DType.BF16, DType.F16, DType.F32])
def test_two_models_give_the_trio_kernels_bits(dtype):
    rng = np.random.default_rng(int(dtype))
    count = 5003  # odd: tiles and thread slices end mid-vector
    b, d, a = (random_values(rng, count, dtype) for _ in range(3))
    out_trio = np.zeros(count, storage_numpy_dtype(dtype))
    out_set = np.zeros_like(out_trio)
    ops = native.Operands(b.ctypes.data, int(dtype), d.ctypes.data, int(dtype), a.ctypes.data,
                          int(dtype), count, int(dtype), 1 << 33)
    set_ops = native.SetOperands(b.ctypes.data, int(dtype), [d.ctypes.data, a.ctypes.data],
                                 [int(dtype)] * 2, count, int(dtype), 1 << 33)
    for recipe in _trio_recipes():
        native.merge_recipe(ops, out_trio.ctypes.data, recipe, 2)
        native.merge_set(set_ops, out_set.ctypes.data, _as_set_recipe(recipe), 2)
        assert out_set.tobytes() == out_trio.tobytes()


def _set_inputs(rng, count, dtypes):
    """A base and models near it (task vectors ~ 2% of the weights, as fine-tunes are)."""
    base = random_values(rng, count, dtypes[0])
    models = []
    for dtype in dtypes[1:]:
        near = decode_to_f64(base, dtypes[0]) + 0.02 * rng.standard_normal(count)
        models.append(near.astype(np.float32).astype(storage_numpy_dtype(dtype))
                      if dtype is not DType.BF16 else
                      random_values(rng, count, dtype))
    return base, models


CASES = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.9}, [0.5, -0.25, 0.75, 0.3]),
    "linear": ("linear", {}, [0.1, 0.2, 0.3, 0.4]),
    "ties": ("ties", {"density": 0.4}, [0.5, 0.8, 0.3, 0.6]),
    "ties-unnormalized": ("ties", {"density": 0.7, "normalize": False, "lambda": 1.3},
                          [1.0, 0.5, 0.5, 0.25]),
    "dare_linear": ("dare_linear", {"density": 0.6, "seed": 4}, [0.5, 0.5, 0.5, 0.5]),
    "dare_ties": ("dare_ties", {"density": 0.5, "rescale": "inverse_density"},
                  [0.4, 0.3, 0.2, 0.1]),
    "breadcrumbs": ("breadcrumbs", {"density": 0.6, "gamma": 0.1, "rescale": "l1"},
                    [0.3, 0.3, 0.2, 0.2]),
    "model_stock": ("model_stock", {}, None),
    "karcher": ("karcher", {"max_iter": 20, "tol": 1e-9}, [0.3, 0.1, 0.2, 0.15]),
}
# Methods that weigh the base model itself (given as the base entry's weight).
BASE_WEIGHTS = {"linear": 0.25, "karcher": 0.25}


def _set_settings(name, shared, weights, models):
    per_model = {SET_ROLE.format(m + 1): {"weight": w} if weights else {}
                 for m, w in enumerate(weights or [None] * models)}
    method = set_method(name, shared, per_model)
    roles = tuple(per_model)
    return resolve(method, "t", 0.0, (float("nan"),) * models, roles)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtypes", [(DType.BF16,) * 5, (DType.F32, DType.BF16, DType.F16,
                                                        DType.F32, DType.BF16)])
def test_four_models_within_the_oracle_bound(case, dtypes, tmp_path):
    """Through the engine (plan, statistics passes by pairs, set kernel, files) against the
    float64 oracle, element by element."""
    name, shared, weights = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    count = 3001
    base, models = _set_inputs(rng, count, dtypes)
    folders = []
    for i, values in enumerate([base, *models]):
        write_checkpoint(tmp_path / f"m{i}", {"t": values.reshape(1, count)})
        folders.append(tmp_path / f"m{i}")
    entries = [(f, {"weight": w} if weights else {})
               for f, w in zip(folders[1:], weights or [None] * 4)]
    base_weight = BASE_WEIGHTS.get(name)
    base_entry = folders[0] if base_weight is None else (folders[0], {"weight": base_weight})
    merge_models(base_entry, entries, tmp_path / "out", method=name, parameters=shared,
                 out_dtype=DType.F32, threads=2)
    got = _read(tmp_path / "out")
    settings = _set_settings(name, shared, weights, 4)
    if base_weight is not None:
        settings = resolve(set_method(name, shared, {
            **{SET_ROLE.format(m + 1): {"weight": w} for m, w in enumerate(weights)},
            "base": {"weight": base_weight}}), "t", 0.0, (float("nan"),) * 4, settings.roles)
        assert settings.w_base == base_weight
    exact, scale = method_ref(settings, "t", decode_to_f64(base, dtypes[0]),
                              *[decode_to_f64(m, dt) for m, dt in zip(models, dtypes[1:])])
    bound = method_error_bound(exact, scale, DType.F32, model_count=4)
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) - bound)


def _read(folder):
    checkpoint = open_checkpoint(folder)
    loc = checkpoint.tensors["t"]
    raw = np.fromfile(loc.file, dtype=np.float32, count=loc.entry.count,
                      offset=loc.entry.begin)
    return raw.astype(np.float64)


def test_the_same_bits_on_any_thread_count_and_chunking(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    count = 40_000
    base, models = _set_inputs(rng, count, (DType.BF16,) * 6)
    folders = []
    for i, values in enumerate([base, *models]):
        write_checkpoint(tmp_path / f"m{i}", {"t": values.reshape(200, 200)})
        folders.append(tmp_path / f"m{i}")
    entries = [(f, {"weight": [{"filter": "t", "value": 0.3}], "density": 0.5})
               for f in folders[1:]]
    outputs = []
    for threads, window in [(1, 1 << 25), (2, 4096)]:
        from mergealign_fast.io import stream
        monkeypatch.setattr(stream, "WINDOW_BYTES", window)
        out = tmp_path / f"out{threads}"
        merge_models(folders[0], entries, out, method="dare_ties", threads=threads)
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_set_limits_and_methods_are_checked_before_anything(tmp_path):
    values = np.ones((2, 2), np.float32)
    folders = []
    for i in range(4):
        write_checkpoint(tmp_path / f"m{i}", {"t": values * i})
        folders.append(tmp_path / f"m{i}")
    with pytest.raises(PlanError) as caught:
        merge_models(folders[0], folders[1:], tmp_path / "out", method="slerp")
    assert "slerp merges two models" in str(caught.value)
    with pytest.raises(PlanError, match="no weight for model 2"):
        merge_models(folders[0], [(folders[1], {"weight": 1.0}), folders[2]], tmp_path / "out")
    with pytest.raises(PlanError, match="parameter 't' does not apply"):
        merge_models(folders[0], folders[1:], tmp_path / "out", method="ties",
                     parameters={"t": 0.5})
    for bad, message in (({"weight": "0.5"}, "'0.5' is not a finite number"),
                         ({"weight": [0.1, None]}, "None is not a finite number"),
                         ({"weight": [{"filter": "mlp"}]}, "a filter rule takes `value`"),
                         ({"density": True}, "True is not a finite number")):
        with pytest.raises(PlanError, match=re.escape(message)):
            merge_models(folders[0], [(f, bad) for f in folders[1:]], tmp_path / "out",
                         method="ties")
    with pytest.raises(PlanError, match="'seed': -1 is not a non-negative integer"):
        merge_models(folders[0], [(f, {"weight": 1.0}) for f in folders[1:]], tmp_path / "out",
                     method="dare_ties", parameters={"seed": -1})
    assert not (tmp_path / "out").exists()
    assert MAX_SET_MODELS == native.MAX_MODELS
    with pytest.raises(ValueError, match="1 to 32 models"):
        native.SetOperands(0, 0, [0] * 33, [0] * 33, 1)


def test_run_merges_a_mergekit_config_of_four_models(tmp_path):
    """`run` with four models besides the base: a model set, each model's parameters its own,
    the same bits as merge_models."""
    rng = np.random.default_rng(5)
    folders = []
    tensors = {"model.layers.0.w": None, "model.layers.1.w": None}
    base = {n: rng.standard_normal((16, 16)).astype(np.float32) for n in tensors}
    for i in range(5):
        values = {n: (v + 0.05 * i * rng.standard_normal(v.shape)).astype(np.float32)
                  for n, v in base.items()}
        write_checkpoint(tmp_path / f"m{i}", values, {"architectures": ["LlamaForCausalLM"]})
        folders.append(tmp_path / f"m{i}")
    config = {"merge_method": "ties", "base_model": str(folders[0]),
              "parameters": {"normalize": True},
              "models": [{"model": str(f), "parameters": {"weight": [0.2, 0.6], "density": 0.5}}
                         for f in folders[1:]]}
    (tmp_path / "c.yml").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "mergealign_fast", "run",
                             str(tmp_path / "c.yml"), str(tmp_path / "out"), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    merge_models(folders[0], [(f, {"weight": [0.2, 0.6], "density": 0.5}) for f in folders[1:]],
                 tmp_path / "api", method="ties", parameters={"normalize": True})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "api" / "model.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "out" / "mergealign-manifest.json").read_text())
    assert list(manifest["inputs"]) == ["base", *(SET_ROLE.format(i) for i in range(1, 5))]


@pytest.mark.parametrize("cast", [DType.BF16, DType.F16])
def test_inputs_cast_first_are_the_merge_of_the_cast_inputs(cast):
    """mergekit's `dtype`: every input rounded to it before the merge.  The trio's kernels
    (tiles, elementwise, statistics) and the set kernel give the bits of the same merge over
    inputs stored in that dtype."""
    rng = np.random.default_rng(int(cast))
    count = 4099
    raws = [random_values(rng, count, DType.F32) for _ in range(4)]
    rounded = [np.asarray(decode_to_f64(_stored(r, cast), cast), np.float32) for r in raws]
    out_cast, out_plain = (np.zeros(count, np.float32) for _ in range(2))
    addresses = [r.ctypes.data for r in raws]
    plain = [r.ctypes.data for r in rounded]
    for recipe in _trio_recipes():
        ops = native.Operands(*_interleave(addresses[:3]), count, 0, 7, int(cast))
        ref = native.Operands(*_interleave(plain[:3]), count, 0, 7)
        native.merge_recipe(ops, out_cast.ctypes.data, recipe, 2)
        native.merge_recipe(ref, out_plain.ctypes.data, recipe, 2)
        assert out_cast.tobytes() == out_plain.tobytes()
        native.merge_elementwise(ops, out_cast.ctypes.data, recipe)
        assert out_cast.tobytes() == out_plain.tobytes()
        assert native.vector_stats(ops, 2) == native.vector_stats(ref, 2)
        set_recipe = _as_set_recipe(recipe)
        native.merge_set(native.SetOperands(addresses[0], 0, addresses[1:3], [0, 0], count, 0, 7,
                                            int(cast)), out_cast.ctypes.data, set_recipe, 2)
        native.merge_set(native.SetOperands(plain[0], 0, plain[1:3], [0, 0], count, 0, 7),
                         out_plain.ctypes.data, set_recipe, 2)
        assert out_cast.tobytes() == out_plain.tobytes()
    with pytest.raises(ValueError, match="input cast"):
        native.Operands(*_interleave(addresses[:3]), count, 0, 0, 9)


def _stored(values, dtype):
    """fp32 values stored in `dtype` (round to nearest even)."""
    from mergealign_fast.dtypes import f32_to_bf16_bits

    return f32_to_bf16_bits(values) if dtype is DType.BF16 else values.astype(np.float16)


def _interleave(addresses):
    """(address, fp32 code) for each input, as Operands takes them."""
    return [x for a in addresses for x in (a, 0)]


def test_a_config_s_dtype_casts_the_inputs_first_as_mergekit_does(tmp_path):
    """fp32 models merged with `dtype: bfloat16` are the merge of the same models stored in
    bf16, bit for bit; without `dtype` the fp32 values are merged as they are."""
    rng = np.random.default_rng(3)
    values = [random_values(rng, 64, DType.F32).reshape(8, 8) for _ in range(3)]
    for kind, convert in (("f32", lambda v: v), ("bf16", lambda v: _stored(v, DType.BF16))):
        for i, v in enumerate(values):
            write_checkpoint(tmp_path / kind / f"m{i}", {"w": convert(v)})
    text = ("merge_method: ties\nbase_model: {0}/m0\nmodels:\n  - model: {0}/m1\n"
            "    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {0}/m2\n"
            "    parameters: {{weight: 0.3, density: 0.5}}\n{1}out_dtype: float32\n")
    outs = {}
    for kind, dtype_line in (("f32", "dtype: bfloat16\n"), ("bf16", ""), ("plain", "")):
        folder = tmp_path / ("f32" if kind == "plain" else kind)
        (tmp_path / f"{kind}.yml").write_text(text.format(folder, dtype_line))
        done = subprocess.run([sys.executable, "-m", "mergealign_fast", "run",
                               str(tmp_path / f"{kind}.yml"), str(tmp_path / f"out-{kind}"),
                               "--quiet"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outs[kind] = (tmp_path / f"out-{kind}" / "model.safetensors").read_bytes()
    assert outs["f32"] == outs["bf16"]
    assert outs["plain"] != outs["f32"]
    # the cast is part of what the merge is: --resume into it without the cast is another merge
    done = subprocess.run([sys.executable, "-m", "mergealign_fast", "run",
                           str(tmp_path / "plain.yml"), str(tmp_path / "out-f32"), "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "option input_dtype: 'bf16' then, 'stored' now" in done.stderr


def test_inputs_cast_first_are_refused_on_the_gpu_path_only_where_the_cast_changes_them(tmp_path):
    from mergealign_fast.io.checkpoint import open_checkpoint
    from mergealign_fast.plan import MergeOptions, _cast_problems, planned_tensor

    write_checkpoint(tmp_path / "m", {"w": np.ones(4, np.float32)})
    location = open_checkpoint(tmp_path / "m").tensors["w"]
    tensors = [planned_tensor("w", (location,) * 3, None)]
    on_gpu = MergeOptions(device="cuda", input_dtype="bfloat16")
    assert "rounds the F32 inputs" in _cast_problems(tensors, on_gpu)[0]
    assert _cast_problems(tensors, MergeOptions(input_dtype="bfloat16")) == []  # the CPU does it
    assert _cast_problems(tensors, MergeOptions(device="cuda", input_dtype="float32")) == []


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_f64_tensors_of_a_set_are_merged_in_float64(tmp_path, method):
    """An F64 tensor (some buffers, research checkpoints) of four models merges in float64
    with the set's weights, summed in model order as the kernels sum."""
    rng = np.random.default_rng(8)
    values = [rng.standard_normal(5) for _ in range(4)]
    folders = []
    for i, v in enumerate(values):
        write_checkpoint(tmp_path / f"m{i}", {"scale": v, "w": v.astype(np.float32)})
        folders.append(tmp_path / f"m{i}")
    weights = [0.5, 0.25, 0.125]
    base = (folders[0], {"weight": 0.5}) if method == "linear" else folders[0]
    merge_models(base, [(f, {"weight": w}) for f, w in zip(folders[1:], weights)],
                 tmp_path / "out", method=method, parameters={"normalize": False})
    loc = open_checkpoint(tmp_path / "out").tensors["scale"]
    assert loc.entry.dtype == "F64"
    got = np.fromfile(loc.file, "<f8", loc.entry.count, offset=loc.entry.begin)
    b, models = values[0], values[1:]
    if method == "linear":
        expected = 0.5 * b
        for w, m in zip(weights, models):
            expected = expected + w * m
    else:
        combined = weights[0] * (models[0] - b)
        for w, m in zip(weights[1:], models[1:]):
            combined = combined + w * (m - b)
        expected = b + 1.0 * combined
    assert np.array_equal(got, expected)


SET_TENSOR_CASES = {
    "task_arithmetic": ({"lambda": 0.8}, [{"weight": w} for w in (0.3, 0.5, -0.2, 0.4)]),
    "ties": ({}, [{"weight": w, "density": 0.5} for w in (0.3, 0.5, 0.2, 0.4)]),
    "dare_ties": ({"seed": 4}, [{"weight": w, "density": 0.5} for w in (0.3, 0.5, 0.2, 0.4)]),
    "breadcrumbs": ({}, [{"weight": w, "density": 0.6, "gamma": 0.1} for w in (0.3, 0.5, 0.2,
                                                                                 0.4)]),
    "model_stock": ({}, [{}] * 4),
    "karcher": ({}, [{"weight": 0.25}] * 4),
    "linear": ({}, [{"weight": w} for w in (0.3, 0.5, 0.2, 0.4)]),
}


@pytest.mark.parametrize("method", SET_TENSOR_CASES)
def test_merge_set_tensors_is_merge_models_in_memory(tmp_path, method):
    """One tensor of four models in memory: the bytes merge_models writes for it (the same
    recipe, DARE's masks keyed by the tensor's name)."""
    from mergealign_fast import merge_models, merge_set_tensors

    shared, per_model = SET_TENSOR_CASES[method]
    rng = np.random.default_rng(len(method))
    base = rng.standard_normal((33, 17)).astype(np.float32)
    models = [(base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)
              for _ in range(4)]
    name = "model.layers.1.mlp.up_proj.weight"
    for i, x in enumerate([base, *models]):
        write_checkpoint(tmp_path / f"m{i}", {name: x})
    merge_models(tmp_path / "m0", [(tmp_path / f"m{i + 1}", per_model[i]) for i in range(4)],
                 tmp_path / "out", method=method, parameters=shared)
    written = read_elements(open_checkpoint(tmp_path / "out").tensors[name])
    merged = merge_set_tensors(base, models, method=method, parameters=shared,
                               per_model=per_model, name=name)
    assert merged.tobytes() == written.tobytes()


def test_merge_set_tensors_refuses_in_one_line():
    from mergealign_fast import merge_set_tensors

    x = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="merges by .*task_arithmetic.*got 'slerp'"):
        merge_set_tensors(x, [x, x, x], method="slerp")
    with pytest.raises(ValueError, match="arcee_fusion merges a base and one model"):
        merge_set_tensors(x, [x, x], method="arcee_fusion")
    with pytest.raises(ValueError, match="shapes differ"):
        merge_set_tensors(x, [x, np.zeros(5, np.float32)])
    with pytest.raises(ValueError, match="no weight for model 2"):
        merge_set_tensors(x, [x, x], method="ties", per_model=[{"weight": 1.0}, {}])
