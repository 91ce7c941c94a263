"""DELLA (della.py), RAM and RAM+ (ram.py) and Arcee Fusion (fusion.py) against their float64
statements, on any window size, through `run` and the command line, and refused where they
cannot run."""

import numpy as np
import pytest

from mergealign_fast.methods.windows import della, fusion, ram
from mergealign_fast import merge_checkpoints, merge_models
from mergealign_fast.dtypes import DType, bf16_bits_to_f32, f32_to_bf16_bits
from mergealign_fast.errors import PlanError
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.mergekit.config import load
from mergealign_fast.methods.core.parameters import Method, set_method
from mergealign_fast.methods.core.settings import resolve
from mergealign_fast.methods.core.spec import SET_ROLE
from mergealign_fast.methods.core.oracle import decode_to_f64, della_ref, method_error_bound

from conftest import write_checkpoint

SHAPES = {"w": (37, 29), "v": (29,), "e": (3, 11, 5)}  # a matrix, a vector, a 3-D tensor


def _models(root, count, seed, changed=1.0, bf16=False):
    """A base and `count` fine-tunes (each element changed with probability `changed`) as
    folders, fp32 or bf16; returns their values (float64) by name, base first."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in SHAPES.items():
        base = rng.standard_normal(shape).astype(np.float32)
        tensors[name] = [base] + [
            (base + rng.standard_normal(shape) * 0.05 * (rng.random(shape) < changed)
             ).astype(np.float32) for _ in range(count)]
    if bf16:
        tensors = {name: [f32_to_bf16_bits(x) for x in xs] for name, xs in tensors.items()}
    for i in range(count + 1):
        write_checkpoint(root / f"m{i}", {name: xs[i] for name, xs in tensors.items()})
    return {name: [(bf16_bits_to_f32(x) if bf16 else x).astype(np.float64) for x in xs]
            for name, xs in tensors.items()}


def _merged(out, name):
    loc = open_checkpoint(out).tensors[name]
    return decode_to_f64(read_elements(loc), DType[loc.entry.dtype])


def _settings(method, shared, per_model, count, name):
    roles = tuple(SET_ROLE.format(i + 1) for i in range(count))
    chosen = set_method(method, shared, {r: per_model for r in roles})
    return resolve(chosen, name, 0.0, (float("nan"),) * count, roles)


def _merge_set(root, out, count, method, shared, per_model):
    merge_models(root / "m0", [(root / f"m{i + 1}", per_model) for i in range(count)], out,
                 method=method, parameters=shared)


DELLA_CASES = [  # method, shared parameters, each model's
    ("della", {"lambda": 0.9}, {"weight": 0.6, "density": 0.5, "epsilon": 0.2}),
    ("della", {"normalize": False}, {"weight": 0.4, "density": 0.3, "epsilon": 0.1}),
    ("della_linear", {"seed": 3}, {"weight": 0.5, "density": 0.7}),
    ("della_linear", {"rescale": "none"}, {"weight": 0.3, "density": 0.5}),
]


@pytest.mark.parametrize("method, shared, per_model", DELLA_CASES)
def test_della_within_the_fp32_bound_of_its_statement(tmp_path, method, shared, per_model):
    tensors = _models(tmp_path, 3, seed=len(str(shared)))
    _merge_set(tmp_path, tmp_path / "out", 3, method, shared, per_model)
    for name, shape in SHAPES.items():
        base, *models = (x.ravel() for x in tensors[name])
        s = _settings(method, shared, per_model, 3, name)
        exact, scale = della_ref(s, name, shape, base, models)
        bound = method_error_bound(exact, scale, DType.F32, model_count=3)
        assert np.all(np.abs(_merged(tmp_path / "out", name) - exact) <= bound), name


def test_della_keeps_by_rank_within_each_row(tmp_path):
    """The keep rate runs from density - ε (a row's smallest |τ|) to density + ε (its largest),
    row by row: a row of small changes loses as many as a row of large ones."""
    rng = np.random.default_rng(5)
    rows = np.repeat(np.array([1e-3, 1.0])[:, None], 20_000, axis=1)  # two scales of row
    tau = (rng.standard_normal((2, 20_000)) * rows).astype(np.float32)
    s = _settings("della", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.3}, 1, "w")
    keep = della.kept(s, "w", (2, 20_000), 0, 0, tau.ravel()).reshape(2, 20_000)
    for row in range(2):
        order = np.argsort(np.abs(tau[row]))
        lowest, highest = keep[row, order[:2000]].mean(), keep[row, order[-2000:]].mean()
        # p over the lowest tenth is 0.2..0.26 (mean 0.23), over the highest 0.74..0.8: five
        # binomial standard deviations of 2000 draws are 0.05.
        assert abs(lowest - 0.23) < 0.05 and abs(highest - 0.77) < 0.05
    assert abs(keep.mean() - 0.5) < 0.02


@pytest.mark.parametrize("shape", [(6, 9), (9,), (2, 7, 3), (4, 1)])
def test_della_ranks_lines_as_a_stable_sort_does(shape):
    """Ranks along mergekit's line (dimension 1; the whole of a 1-D tensor), ties (±0 and
    repeated values) in index order, against numpy's stable argsort."""
    rng = np.random.default_rng(1)
    tau = (np.round(rng.standard_normal(shape) * 2) / 2).astype(np.float32)
    tau.ravel()[::5] *= -1
    lines = np.moveaxis(np.abs(tau).reshape(-1, *tau.shape[1:2], *tau.shape[2:]), 1, -1) \
        if tau.ndim > 1 else np.abs(tau)[None]
    order = np.argsort(lines, axis=-1, kind="stable")
    expected = np.empty(lines.shape)
    np.put_along_axis(expected, order, np.arange(lines.shape[-1]) / max(1, lines.shape[-1] - 1),
                      axis=-1)
    expected = np.moveaxis(expected, -1, 1).reshape(-1) if tau.ndim > 1 else expected[0]
    length = della.line_shape(shape)[0]
    found = della.by_rank(tau.ravel(), shape, np.arange(length) / max(1, length - 1))
    assert np.array_equal(found, expected)


@pytest.mark.parametrize("method", ["della", "ram", "arcee_fusion"])
def test_any_window_size_gives_the_same_bytes(tmp_path, monkeypatch, method):
    count = 1 if method == "arcee_fusion" else 3
    _models(tmp_path, count, seed=8, changed=0.5)
    module = {"della": della, "ram": ram, "arcee_fusion": fusion}[method]
    per_model = {"weight": 0.5, "density": 0.4} if method == "della" else {}
    outputs = []
    for window, held in ((1 << 20, True), (7, True), (7, False)):
        monkeypatch.setattr(module, "WINDOW_ELEMENTS", window)
        if method == "della":  # the masks held between the passes, or computed again
            monkeypatch.setattr(della, "MASK_CACHE_BYTES", 1 << 30 if held else 0)
        elif not held:
            continue
        out = tmp_path / f"out{window}{held}"
        if method == "arcee_fusion":
            merge_checkpoints(tmp_path / "m0", tmp_path / "m1", tmp_path / "m0", out,
                              method=Method("arcee_fusion"))
        else:
            _merge_set(tmp_path, out, count, method, {}, per_model)
        outputs.append((out / "model.safetensors").read_bytes())
    assert all(output == outputs[0] for output in outputs[1:])


@pytest.mark.parametrize("method, shared", [("ram", {}), ("ram", {"epsilon": 0.03}),
                                            ("ramplus_tl", {}),
                                            ("ramplus_tl", {"r": 0.5, "alpha": 2.0})])
@pytest.mark.parametrize("out_dtype", [DType.F32, DType.BF16])
def test_ram_within_the_fp32_bound_of_its_statement(tmp_path, method, shared, out_dtype):
    """Sparse fine-tunes (each changes about half the elements): elements changed by one
    model, by several and by none."""
    tensors = _models(tmp_path, 3, seed=11, changed=0.5, bf16=out_dtype is DType.BF16)
    _merge_set(tmp_path, tmp_path / "out", 3, method, shared, {})
    for name in SHAPES:
        base, *models = (x.ravel() for x in tensors[name])
        s = _settings(method, shared, {}, 3, name)
        exact, scale = ram.reference(method, s.epsilons[0], s.r, s.alpha, base, models)
        bound = method_error_bound(exact, scale, out_dtype, model_count=3)
        assert np.all(np.abs(_merged(tmp_path / "out", name) - exact) <= bound), name


def test_ramplus_scales_only_unshared_changes(tmp_path):
    """Two models, one changes every element, the other half: the shared half is their mean,
    the rest the first model's change times λ = 1 + r·min(ρ, α), ρ = shared/unshared = 1."""
    base = np.zeros((4, 8), np.float32)
    first = np.full((4, 8), 0.5, np.float32)
    second = first.copy()
    second[:, 4:] = 0.0
    second[:, :4] = 0.25
    for i, x in enumerate([base, first, second]):
        write_checkpoint(tmp_path / f"m{i}", {"w": x})
    _merge_set(tmp_path, tmp_path / "out", 2, "ramplus_tl", {"r": 0.4, "alpha": 0.5}, {})
    merged = _merged(tmp_path / "out", "w").reshape(4, 8)
    assert np.all(merged[:, :4] == 0.375)
    assert np.all(merged[:, 4:] == np.float32(0.5 * (1 + 0.4 * 0.5)))


def test_arcee_fusion_within_the_fp32_bound_of_its_statement(tmp_path):
    tensors = _models(tmp_path, 1, seed=12)
    merge_checkpoints(tmp_path / "m0", tmp_path / "m1", tmp_path / "m0", tmp_path / "out",
                      method=Method("arcee_fusion"))
    for name, shape in SHAPES.items():
        base, model = (x.ravel() for x in tensors[name])
        exact = fusion.reference(shape, base, model)
        merged = _merged(tmp_path / "out", name)
        bound = method_error_bound(exact, np.abs(base) + np.abs(model - base), DType.F32, 1)
        assert np.all(np.abs(merged - exact) <= bound), name
        kept = np.count_nonzero(merged != base)
        assert 0 < kept < base.size / 2  # the fence keeps the outliers only


def test_order_statistics_are_exact(tmp_path):
    """The two histogram passes find the same values as a sort, with heavy ties and both
    signs, on windows of any size."""
    from mergealign_fast.methods.windows.order_stats import OrderStatistics, sortable_bits, value_of

    rng = np.random.default_rng(2)
    values = np.round(rng.standard_normal(2_003) * 4) / 4  # many equal values
    values = np.concatenate([values, [-0.0, 0.0, np.inf, -np.inf]]).astype(np.float32)
    for window in (2_011, 64, 7):
        stats = OrderStatistics(lambda: (sortable_bits(values[i:i + window])
                                         for i in range(0, values.size, window)))
        ranks = [0, 1, 500, 1003, 1509, values.size - 1]
        ordered = np.sort(values)
        for r, found in zip(ranks, stats.at(ranks)):
            assert value_of(found.key) == ordered[r]
            assert found.below == np.count_nonzero(values < ordered[r]) or ordered[r] == 0
            assert found.equal == np.count_nonzero(values == ordered[r]) or ordered[r] == 0


def test_run_configs(tmp_path):
    """mergekit's configs of its suite's shapes: della's epsilon per model, ram's r and alpha
    shared; arcee_fusion lists the base among its models; each merges."""
    _models(tmp_path, 2, seed=4)
    m = [tmp_path / f"m{i}" for i in range(3)]
    configs = {
        "della": f"merge_method: della\nbase_model: {m[0]}\nparameters: {{density: 0.66, "
                 f"epsilon: 0.05, lambda: 0.5}}\nmodels:\n  - model: {m[1]}\n    parameters: "
                 f"{{weight: 0.6}}\n  - model: {m[2]}\n    parameters: {{weight: 0.4, "
                 f"epsilon: 0.1}}\n",
        "ramplus_tl": f"merge_method: ramplus_tl\nbase_model: {m[0]}\nparameters: {{r: 0.05, "
                      f"alpha: 1.0}}\nmodels:\n  - model: {m[1]}\n    parameters: {{weight: "
                      f"0.6}}\n  - model: {m[2]}\n",
        "arcee_fusion": f"merge_method: arcee_fusion\nbase_model: {m[0]}\nmodels:\n  - model: "
                        f"{m[0]}\n  - model: {m[1]}\n",
    }
    for name, text in configs.items():
        config = tmp_path / f"{name}.yml"
        config.write_text(text)
        run = load(config)
        s = resolve(run.method, "w", 0.0, (float("nan"),) * 2)
        if name == "della":
            assert s.epsilons == (0.05, 0.1) and s.densities == (0.66, 0.66)
        if name == "ramplus_tl":
            assert (s.r, s.alpha) == (0.05, 1.0)
            assert any("`weight` does not apply to ramplus_tl" in w for w in run.warnings)
        from mergealign_fast.cli.main import main

        assert main(["run", str(config), str(tmp_path / f"out-{name}")]) == 0
        assert (tmp_path / f"out-{name}" / "model.safetensors").exists()


def test_bad_parameters_are_one_line_each(tmp_path):
    _models(tmp_path, 2, seed=6)
    m = [tmp_path / f"m{i}" for i in range(3)]
    config = tmp_path / "c.yml"
    # mergekit's test_della_invalid_epsilon: density 0.66 ± 1.35 leaves (0, 1).
    config.write_text(f"merge_method: della\nbase_model: {m[0]}\nparameters: {{density: 0.66, "
                      f"epsilon: 1.35, lambda: 0.5}}\nmodels:\n  - model: {m[1]}\n    "
                      f"parameters: {{weight: 0.6}}\n  - model: {m[2]}\n    parameters: "
                      f"{{weight: 0.4}}\n")
    with pytest.raises(PlanError, match=r"density 0.66 ± epsilon 1.35 must stay inside"):
        merge_checkpoints(*m, tmp_path / "o", method=load(config).method)
    assert not (tmp_path / "o").exists()
    config.write_text(f"merge_method: arcee_fusion\nbase_model: {m[0]}\nmodels:\n  - model: "
                      f"{m[1]}\n  - model: {m[2]}\n")
    with pytest.raises(PlanError, match="arcee_fusion takes base_model and exactly one other"):
        load(config)
    config.write_text(f"merge_method: ram\nbase_model: {m[0]}\nmodels:\n  - model: {m[1]}\n"
                      f"    parameters: {{epsilon: 0.1}}\n  - model: {m[2]}\n")
    assert any("`epsilon` in a model's parameters (a shared parameter" in w
               for w in load(config).warnings)  # mergekit ignores it there
    assert Method("ram", epsilon=-1.0).problems() == [
        "ram: epsilon must be a finite number of at least 0 (got -1.0)"]
    with pytest.raises(PlanError, match="della runs on the CPU path"):
        merge_checkpoints(*m, tmp_path / "o", method=Method("della"), device="cuda")


@pytest.mark.parametrize("method", ["sce", "della", "della_linear", "ram", "ramplus_tl",
                                    "arcee_fusion"])
def test_flat_buffers_merge_as_model_folders_do(tmp_path, method):
    """merge_tensors on the trio in memory (as the mergekit backend calls it) gives the bytes
    of merge_checkpoints, windows of 7 elements included; merge_set_tensors those of
    merge_models."""
    from mergealign_fast import merge_set_tensors, merge_tensors

    tensors = _models(tmp_path, 3, seed=9, changed=0.5)["w"]
    b, d, a, extra = (x.astype(np.float32) for x in tensors)
    aligned = b if method == "arcee_fusion" else a
    method_of = Method(method, domain_density=0.5, align_density=0.5) \
        if method.startswith("della") else Method(method)
    merge_checkpoints(tmp_path / "m0", tmp_path / "m1",
                      tmp_path / ("m0" if method == "arcee_fusion" else "m2"), tmp_path / "out",
                      method=method_of, domain_weight=0.4, align_weight=0.6)
    merged = merge_tensors(b, d, aligned, method=method_of, domain_weight=0.4,
                           align_weight=0.6, name="w")
    written = read_elements(open_checkpoint(tmp_path / "out").tensors["w"])
    assert merged.tobytes() == written.tobytes()
    if method == "arcee_fusion":
        return
    per_model = {"weight": 0.5, "density": 0.4} if method.startswith("della") else {}
    _merge_set(tmp_path, tmp_path / "set", 3, method, {}, per_model)
    merged = merge_set_tensors(b, [d, a, extra], method=method, per_model=[per_model] * 3,
                               name="w")
    assert merged.tobytes() == \
        read_elements(open_checkpoint(tmp_path / "set").tensors["w"]).tobytes()


def test_a_della_sweep_is_its_merges(tmp_path):
    """A λ sweep varies della's weights: each output is the merge of its own weights."""
    from mergealign_fast import sweep_checkpoints

    _models(tmp_path, 2, seed=7)
    m = [tmp_path / f"m{i}" for i in range(3)]
    method = Method("della", domain_density=0.5, align_density=0.5)
    sweep_checkpoints(*m, tmp_path / "sweep", [0.25, 0.75], method=method)
    for lam in (0.25, 0.75):
        merge_checkpoints(*m, tmp_path / f"one{lam}", method=method, domain_weight=lam,
                          align_weight=1 - lam)
        folder = next(p for p in (tmp_path / "sweep").iterdir() if str(lam) in p.name)
        assert (folder / "model.safetensors").read_bytes() == \
            (tmp_path / f"one{lam}" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["sce", "della", "ram", "ramplus_tl", "arcee_fusion"])
def test_odd_shapes(tmp_path, method):
    """A scalar, a column, an empty tensor and a one-row tensor beside an ordinary one: each
    within the fp32 bound of its statement (the empty one empty)."""
    from mergealign_fast.methods.windows import sce

    shapes = {"scalar": (), "column": (5, 1), "empty": (0, 4), "row": (1, 7), "w": (6, 5)}
    count = 1 if method == "arcee_fusion" else 3
    rng = np.random.default_rng(13)
    tensors = {}
    for name, shape in shapes.items():
        base = np.asarray(rng.standard_normal(shape), np.float32)
        tensors[name] = [base] + [np.asarray(base + rng.standard_normal(shape) * 0.05,
                                             np.float32) for _ in range(count)]
    for i in range(count + 1):
        write_checkpoint(tmp_path / f"m{i}", {n: xs[i] for n, xs in tensors.items()})
    per_model = {"weight": 0.5, "density": 0.6} if method == "della" else {}
    shared = {"select_topk": 0.5} if method == "sce" else {}
    if method == "arcee_fusion":
        merge_checkpoints(tmp_path / "m0", tmp_path / "m1", tmp_path / "m0", tmp_path / "out",
                          method=Method(method))
    else:
        _merge_set(tmp_path, tmp_path / "out", count, method, shared, per_model)
    for name, shape in shapes.items():
        base, *models = (x.astype(np.float64).ravel() for x in tensors[name])
        s = _settings("della" if method == "arcee_fusion" else method, shared, per_model,
                      count, name)
        if method == "sce":
            exact = sce.reference(0.5, base, models)
            scale = np.abs(base) + (np.max(np.abs(np.stack(models) - base), axis=0)
                                    if base.size else 0)
        elif method == "della":
            exact, scale = della_ref(s, name, shape, base, models)
        elif method == "arcee_fusion":
            exact = fusion.reference(shape, base, models[0])
            scale = np.abs(base) + np.abs(models[0] - base)
        else:
            exact, scale = ram.reference(method, s.epsilons[0], s.r, s.alpha, base, models)
        merged = _merged(tmp_path / "out", name)
        assert merged.shape == exact.shape == (int(np.prod(shape)),), name
        bound = method_error_bound(exact, scale, DType.F32, model_count=count)
        assert np.all(np.abs(merged - exact) <= bound), name
