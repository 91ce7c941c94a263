"""Our methods against mergekit 0.1.5's on the same tensors (skipped when mergekit is absent).

Deterministic methods: ours and mergekit's both compute in fp32, so each lies within
method_error_bound of the float64 value and the two within twice that of each other.  The masks
are taken on identical fp32 values, so TIES keeps the same elements (continuous random data has
no ties at the threshold).  DARE's masks come from different generators: there the kept
fraction and the rescaled L1 norm must agree statistically.
"""

import zlib

import numpy as np
import pytest
import torch

from mergealign_fast import merge_tensors
from mergealign_fast.dtypes import DType
from mergealign_fast.io.checkpoint import open_checkpoint
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.methods.core.recipes import keep_count
from mergealign_fast.methods.core.settings import resolve
from mergealign_fast.methods.core.oracle import method_error_bound, method_ref

mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

COUNT = 50_000


def trio(seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(COUNT, generator=g)
    return [base, base + 0.02 * torch.randn(COUNT, generator=g),
            base + 0.02 * torch.randn(COUNT, generator=g)]


def theirs(name: str, tensors, base_index, parameters) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, base_index=base_index, name="w")
    return mergekit_registry.get(name)([group], parameters=parameters)[0]


# (our method, w_d, w_a, mergekit name, mergekit parameters, inputs as mergekit sees them)
CASES = {
    "task_arithmetic": (Method("task_arithmetic", lambda_=0.8), 0.6, 0.9, "task_arithmetic",
                        {"weight": [0.6, 0.9], "lambda": 0.8}, "bda"),
    "linear": (Method("linear", base_weight=0.2), 0.3, 0.9, "linear",
               {"weight": [0.2, 0.3, 0.9]}, "bda"),
    "ties": (Method("ties", domain_density=0.4, align_density=0.7), 0.6, 0.9, "ties",
             {"weight": [0.6, 0.9], "density": [0.4, 0.7]}, "bda"),
    "ties-unnormalized": (Method("ties", domain_density=0.2, align_density=0.5,
                                 normalize=False, lambda_=1.5), 1.0, 0.5, "ties",
                          {"weight": [1.0, 0.5], "density": [0.2, 0.5], "normalize": False,
                           "lambda": 1.5}, "bda"),
    # mergekit's t runs from its base model (our aligned here) to the other (our domain).
    "slerp": (Method("slerp", t=0.3), 0.5, 0.5, "slerp", {"t": 0.3}, "ad"),
    # nuslerp's t is the second model's share of the weights: our domain's.
    "nuslerp": (Method("nuslerp"), 0.3, 0.7, "nuslerp", {"weight": [0.7, 0.3]}, "bad"),
    "model_stock": (Method("model_stock"), 0.5, 0.5, "model_stock", {}, "bda"),
    "breadcrumbs": (Method("breadcrumbs", domain_density=0.4, align_density=0.7, gamma=0.05),
                    0.6, 0.9, "breadcrumbs", {"weight": [0.6, 0.9], "density": [0.4, 0.7],
                                              "gamma": [0.05, 0.05]}, "bda"),
    "multislerp": (Method("multislerp"), 0.7, 0.4, "multislerp", {"weight": [0.7, 0.4]}, "bda"),
    # NearSwap: |τ| of the trio is ~0.02, so t = 0.01 swaps some elements fully, blends others.
    "nearswap": (Method("nearswap", t=0.01), 0.5, 0.5, "nearswap", {"t": 0.01}, "bd"),
    "breadcrumbs_ties": (Method("breadcrumbs_ties", domain_density=0.5, align_density=0.5,
                                gamma=0.2, rescale="l1"), 0.5, 0.8, "breadcrumbs_ties",
                         {"weight": [0.5, 0.8], "density": [0.5, 0.5], "gamma": [0.2, 0.2],
                          "rescale": True}, "bda"),
}


@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(case):
    method, w_d, w_a, name, parameters, order = CASES[case]
    b, d, a = trio(zlib.crc32(case.encode()))
    if method.name == "ties":  # premise: no tie at a threshold (mergekit's pick would be random)
        for x, density in ((d, method.domain_density), (a, method.align_density)):
            top = (x - b).abs().sort(descending=True).values
            k = keep_count(density, COUNT)
            assert top[k - 1] != top[k]
    ours = merge_tensors(b, d, a, domain_weight=w_d, align_weight=w_a, method=method, name="w")
    inputs = {"b": b, "d": d, "a": a}
    reference = theirs(name, [inputs[k] for k in order], 0, parameters)
    exact, scale = method_ref(resolve(method, "w", 0.0, (w_d, w_a)), "w",
                              *(x.double().numpy() for x in (b, d, a)))
    bound = method_error_bound(exact, scale, DType.F32)
    assert np.all(np.abs(ours.double().numpy() - exact) <= bound)
    difference = np.abs(ours.double().numpy() - reference.double().numpy())
    assert np.all(difference <= 2 * bound), f"worst {np.max(difference / bound):.1f} x bound"


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_statistically_the_same_as_mergekit(name):
    b, d, a = trio(7)
    density = (0.3, 0.6)
    ours = merge_tensors(b, d, a, domain_weight=0.7, align_weight=0.5, name="w",
                         method=Method(name, domain_density=density[0],
                                       align_density=density[1], seed=5))
    torch.manual_seed(5)
    reference = theirs(name, [b, d, a], 0, {"weight": [0.7, 0.5], "density": list(density)})
    # Fraction of elements that moved: binomial, so within 5 standard deviations of each other.
    moved_ours = (ours != b).double().mean().item()
    moved_theirs = (reference != b).double().mean().item()
    assert abs(moved_ours - moved_theirs) < 5 * np.sqrt(2 * 0.25 / COUNT)
    # L1 rescale: the merged update has the same size in both.
    l1_ours = (ours - b).abs().sum().item()
    l1_theirs = (reference - b).abs().sum().item()
    assert abs(l1_ours / l1_theirs - 1) < 0.02


# Four models besides the base (a model set): (method, shared parameters, per-model weights,
# per-model densities or None).
SET_CASES = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.8}, [0.6, 0.9, -0.3, 0.4], None),
    "linear": ("linear", {}, [0.3, 0.9, 0.2, 0.5], None),
    "ties": ("ties", {}, [0.6, 0.9, 0.5, 0.7], [0.4, 0.7, 0.5, 0.3]),
    "model_stock": ("model_stock", {}, [], None),
    "multislerp": ("multislerp", {}, [0.6, 0.9, 0.5, 0.7], None),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"gamma": 0.1}, [0.6, 0.9, 0.5, 0.7],
                         [0.4, 0.7, 0.5, 0.3]),
}


@pytest.mark.parametrize("case", SET_CASES)
def test_four_models_the_same_as_mergekit(case, tmp_path):
    from mergealign_fast import merge_models
    from mergealign_fast.methods.core.parameters import set_method
    from mergealign_fast.methods.core.spec import SET_ROLE

    from conftest import write_checkpoint

    name, shared, weights, densities = SET_CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    base = torch.randn(COUNT, generator=g)
    models = [base + 0.02 * torch.randn(COUNT, generator=g) for _ in range(4)]
    weights = weights or [None] * 4
    per_model = [({"weight": w} if w is not None else {})
                 | ({"density": densities[i]} if densities else {})
                 for i, w in enumerate(weights)]
    folders = []
    for i, x in enumerate([base, *models]):
        write_checkpoint(tmp_path / f"m{i}", {"w": x.numpy()})
        folders.append(tmp_path / f"m{i}")
    # mergekit's linear merges every listed model: the base is one of them (weight 0.1).
    base_entry = (folders[0], {"weight": 0.1}) if name == "linear" else folders[0]
    merge_models(base_entry, list(zip(folders[1:], per_model)), tmp_path / "out", method=name,
                 parameters=shared)
    loc = open_checkpoint(tmp_path / "out").tensors["w"]
    ours = np.fromfile(loc.file, np.float32, loc.entry.count, offset=loc.entry.begin)
    linear = name == "linear"
    parameters = {**shared}
    if weights[0] is not None:
        parameters["weight"] = ([0.1] if linear else []) + weights
    if densities:
        parameters["density"] = densities
    reference = theirs(name, [base, *models], 0, parameters)
    roles = tuple(SET_ROLE.format(i + 1) for i in range(len(weights)))
    rules = {r: p for r, p in zip(roles, per_model)}
    if linear:
        rules["base"] = {"weight": 0.1}
    settings = resolve(set_method(name, shared, rules), "w", 0.0, (float("nan"),) * 4, roles)
    exact, scale = method_ref(settings, "w", *(x.double().numpy() for x in (base, *models)))
    bound = method_error_bound(exact, scale, DType.F32, model_count=4)
    assert np.all(np.abs(ours - exact) <= bound)
    difference = np.abs(ours - reference.double().numpy())
    assert np.all(difference <= 2 * bound), f"worst {np.max(difference / bound):.1f} x bound"


def test_karcher_of_five_models_through_run_the_same_as_mergekit(tmp_path):
    """A config of base_model and four models: a model set, each weighing 1/5 as in mergekit;
    within the oracle bound of the float64 iteration, and of mergekit's fp32 iteration."""
    import json
    import subprocess
    import sys

    from conftest import write_checkpoint

    g = torch.Generator().manual_seed(29)
    base = torch.randn(COUNT, generator=g)
    models = [base + 0.02 * torch.randn(COUNT, generator=g) for _ in range(4)]
    folders = []
    for i, x in enumerate([base, *models]):
        write_checkpoint(tmp_path / f"m{i}", {"w": x.numpy()})
        folders.append(str(tmp_path / f"m{i}"))
    config = {"merge_method": "karcher", "base_model": folders[0],
              "models": [{"model": f} for f in folders[1:]]}
    (tmp_path / "k.yml").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "mergealign_fast", "run", str(tmp_path / "k.yml"),
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loc = open_checkpoint(tmp_path / "out").tensors["w"]
    ours = np.fromfile(loc.file, np.float32, loc.entry.count, offset=loc.entry.begin)
    reference = theirs("karcher", [base, *models], 0, {}).double().numpy()
    from mergealign_fast.methods.core.parameters import set_method
    from mergealign_fast.methods.core.spec import SET_ROLE

    roles = tuple(SET_ROLE.format(i + 1) for i in range(4))
    fifth = {"weight": 0.2}
    settings = resolve(set_method("karcher", {}, {**{r: fifth for r in roles}, "base": fifth}),
                       "w", 0.0, (float("nan"),) * 4, roles)
    exact, scale = method_ref(settings, "w", *(x.double().numpy() for x in (base, *models)))
    bound = method_error_bound(exact, scale, DType.F32, model_count=4)
    assert np.all(np.abs(ours - exact) <= bound)
    iteration_rounding = 2.0**-17 * np.max(np.abs(exact))
    assert np.all(np.abs(ours - reference) <= 2 * bound + iteration_rounding)


# Vector by vector (per_vector.py): (our method, vectors, mergekit name, its parameters besides
# the weights, inputs as mergekit sees them).
PER_VECTOR_CASES = {
    "nuslerp-rows": ("nuslerp", "rows", "nuslerp", {"nuslerp_flatten": False}, "bad"),
    "nuslerp-columns": ("nuslerp", "columns", "nuslerp",
                        {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "bad"),
    "nuslerp_models-rows": ("nuslerp_models", "rows", "nuslerp", {"nuslerp_flatten": False},
                            "ad"),
    "model_stock-rows": ("model_stock", "rows", "model_stock", {"filter_wise": True}, "bda"),
}


@pytest.mark.parametrize("case", PER_VECTOR_CASES)
def test_vector_by_vector_the_same_as_mergekit(case, tmp_path):
    """Each row (or column) its own angle, against mergekit on the same 2-D tensors."""
    from mergealign_fast import merge_checkpoints

    from conftest import write_checkpoint

    ours_name, vectors, name, options, order = PER_VECTOR_CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    b = torch.randn(24, 50, generator=g)
    d, a = (b + 0.05 * torch.randn(24, 50, generator=g) for _ in range(2))
    for label, x in zip("bda", (b, d, a)):
        write_checkpoint(tmp_path / label, {"w": x.numpy()})
    merge_checkpoints(tmp_path / "b", tmp_path / "d", tmp_path / "a", tmp_path / "out",
                      method=Method(ours_name, vectors=vectors), domain_weight=0.3,
                      align_weight=0.7)
    loc = open_checkpoint(tmp_path / "out").tensors["w"]
    ours = np.fromfile(loc.file, np.float32, loc.entry.count, offset=loc.entry.begin)
    weights = {"weight": [0.7, 0.3]} if name == "nuslerp" else {}
    inputs = [dict(zip("bda", (b, d, a)))[k] for k in order]
    base_index = 0 if "b" in order else None
    reference = theirs(name, inputs, base_index, {**weights, **options}).double().numpy()
    flattened = theirs(name, inputs, base_index, weights).double().numpy()

    def vectors_of(x):  # each vector a row
        x = np.asarray(x).reshape(24, 50)
        return x if vectors == "rows" else x.T

    whole = resolve(Method(ours_name), "w", 0.0, (0.3, 0.7))  # the oracle of one vector
    bounds = []
    for got, theirs_v, bv, dv, av in zip(*map(vectors_of, (ours, reference, b, d, a))):
        exact, scale = method_ref(whole, "w", *(np.asarray(x, np.float64) for x in (bv, dv, av)))
        bound = method_error_bound(exact, scale, DType.F32)
        assert np.all(np.abs(got - exact) <= bound)
        assert np.all(np.abs(got - theirs_v) <= 2 * bound)
        bounds.append(bound)
    # Not the whole tensor's merge: that one is off by more than the bound somewhere.
    assert np.any(np.abs(vectors_of(ours) - vectors_of(flattened)) > 2 * np.stack(bounds))


@pytest.mark.parametrize("select_topk", [1.0, 0.4])
def test_sce_the_same_as_mergekit(select_topk, tmp_path):
    """mergekit's sce over a base and three models, fp32.  Its variances are torch's fp32
    reduction, ours fp32 sums in model order: an element at the selection's threshold may fall
    on the other side, so all but a handful of elements must agree within the fp32 bound."""
    from mergealign_fast import merge_models
    from mergealign_fast.methods.windows import sce

    from conftest import write_checkpoint

    g = torch.Generator().manual_seed(31)
    base = torch.randn(COUNT, generator=g)
    models = [base + 0.02 * torch.randn(COUNT, generator=g) for _ in range(3)]
    for i, x in enumerate([base, *models]):
        write_checkpoint(tmp_path / f"m{i}", {"w": x.numpy()})
    merge_models(tmp_path / "m0", [tmp_path / f"m{i}" for i in (1, 2, 3)], tmp_path / "out",
                 method="sce", parameters={"select_topk": select_topk})
    loc = open_checkpoint(tmp_path / "out").tensors["w"]
    ours = np.fromfile(loc.file, np.float32, loc.entry.count, offset=loc.entry.begin)
    reference = theirs("sce", [base, *models], 0, {"select_topk": select_topk}).double().numpy()
    exact = sce.reference(select_topk, base.double().numpy(),
                          [(x - base).double().numpy() + base.double().numpy() for x in models])
    taus = torch.stack([x - base for x in models]).double().numpy()
    scale = np.abs(base.double().numpy()) + np.max(np.abs(taus), axis=0)
    bound = method_error_bound(exact, scale, DType.F32, model_count=3)
    assert np.all(np.abs(ours - exact) <= bound)
    assert np.count_nonzero(np.abs(ours - reference) > 2 * bound) <= 5


def test_multislerp_without_a_base_the_same_as_mergekit():
    """mergekit's multislerp without base_model: over the models themselves.  Nearly parallel
    vectors (a model and its fine-tune): mergekit's tangent step sums vectors whose exact sum is
    zero in fp32, leaving its rounding (~1e-6 of the values here) in the result, which our
    closed form does not have; ours is within the fp32 bound of the float64 definition."""
    b, d, a = trio(19)
    method = Method("multislerp_models", normalize=False)
    ours = merge_tensors(b, d, a, domain_weight=0.6, align_weight=0.3, name="w", method=method)
    reference = theirs("multislerp", [a, d], None, {"weight": [0.3, 0.6],
                                                    "normalize_weights": False})
    exact, scale = method_ref(resolve(method, "w", 0.0, (0.6, 0.3)), "w",
                              *(x.double().numpy() for x in (b, d, a)))
    bound = method_error_bound(exact, scale, DType.F32)
    assert np.all(np.abs(ours.double().numpy() - exact) <= bound)
    tangent_rounding = 64 * 2.0**-24 * np.abs(exact)
    assert np.all(np.abs(ours.double().numpy() - reference.double().numpy())
                  <= 2 * bound + tangent_rounding)


def test_nuslerp_without_a_base_the_same_as_mergekit():
    """mergekit's nuslerp without base_model: the slerp of the models themselves."""
    b, d, a = trio(17)
    d = d * 1.3  # models of other norms: the slerp is not a plain blend
    ours = merge_tensors(b, d, a, domain_weight=0.6, align_weight=0.2, name="w",
                         method=Method("nuslerp_models"))
    reference = theirs("nuslerp", [a, d], None, {"weight": [0.2, 0.6]})
    exact, scale = method_ref(resolve(Method("nuslerp_models"), "w", 0.0, (0.6, 0.2)), "w",
                              *(x.double().numpy() for x in (b, d, a)))
    bound = method_error_bound(exact, scale, DType.F32)
    assert np.all(np.abs(ours.double().numpy() - exact) <= bound)
    assert np.all(np.abs(ours.double().numpy() - reference.double().numpy()) <= 2 * bound)


def test_karcher_the_same_as_mergekit_within_its_fp32_iteration():
    """mergekit's Karcher mean of base, domain and aligned (each 1/3).  Ours iterates on the
    Gram matrix in float64 and rounds once; mergekit iterates on the fp32 vectors (ten steps,
    each renormalizing), a few 1e-6 of the largest magnitude apart here."""
    b, d, a = trio(23)
    third = 1.0 / 3.0
    method = Method("karcher", base_weight=third)
    ours = merge_tensors(b, d, a, domain_weight=third, align_weight=third, name="w",
                         method=method)
    reference = theirs("karcher", [b, d, a], 0, {})
    exact, scale = method_ref(resolve(method, "w", 0.0, (third, third)), "w",
                              *(x.double().numpy() for x in (b, d, a)))
    bound = method_error_bound(exact, scale, DType.F32)
    assert np.all(np.abs(ours.double().numpy() - exact) <= bound)
    iteration_rounding = 2.0**-17 * np.max(np.abs(exact))
    assert np.all(np.abs(ours.double().numpy() - reference.double().numpy())
                  <= 2 * bound + iteration_rounding)


def _sparse_set(tmp_path, count, seed, shape=(COUNT,)):
    """A base and `count` fine-tunes each changing about half the elements, as folders."""
    from conftest import write_checkpoint

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.02 * torch.randn(shape, generator=g)
              * (torch.rand(shape, generator=g) < 0.5) for _ in range(count)]
    for i, x in enumerate([base, *models]):
        write_checkpoint(tmp_path / f"m{i}", {"w": x.numpy()})
    return base, models


def _ours(tmp_path, count, method, parameters, per_model=None):
    from mergealign_fast import merge_models

    merge_models(tmp_path / "m0", [(tmp_path / f"m{i + 1}", per_model or {})
                                   for i in range(count)], tmp_path / "out", method=method,
                 parameters=parameters)
    loc = open_checkpoint(tmp_path / "out").tensors["w"]
    return np.fromfile(loc.file, np.float32, loc.entry.count, offset=loc.entry.begin)


@pytest.mark.parametrize("name, parameters", [("ram", {}), ("ram", {"epsilon": 0.01}),
                                              ("ramplus_tl", {"r": 0.05, "alpha": 1.0})])
def test_ram_the_same_as_mergekit(name, parameters, tmp_path):
    """RAM and RAM+ over a base and three sparse fine-tunes, fp32: deterministic in both."""
    from mergealign_fast.methods.windows import ram

    base, models = _sparse_set(tmp_path, 3, seed=len(name) + len(parameters))
    ours = _ours(tmp_path, 3, name, parameters)
    reference = theirs(name, [base, *models], 0, parameters).double().numpy()
    full = {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2} | parameters
    exact, scale = ram.reference(name, full["epsilon"], full["r"], full["alpha"],
                                 base.double().numpy(), [x.double().numpy() for x in models])
    bound = method_error_bound(exact, scale, DType.F32, model_count=3)
    assert np.all(np.abs(ours - exact) <= bound)
    assert np.all(np.abs(ours - reference) <= 2 * bound)


def test_arcee_fusion_the_same_as_mergekit(tmp_path):
    """Rows of 200 (the KL is per row).  mergekit takes the KL in fp32, ours in float64
    rounded to fp32: an element whose importance lies at the fence may fall on the other side,
    so all but a handful agree; the fence is exact in both below a million elements."""
    base, (model,) = _sparse_set(tmp_path, 1, seed=3, shape=(250, 200))
    from mergealign_fast import merge_checkpoints

    merge_checkpoints(tmp_path / "m0", tmp_path / "m1", tmp_path / "m0", tmp_path / "out",
                      method=Method("arcee_fusion"))
    loc = open_checkpoint(tmp_path / "out").tensors["w"]
    ours = np.fromfile(loc.file, np.float32, loc.entry.count, offset=loc.entry.begin)
    reference = theirs("arcee_fusion", [base, model], 0, {}).numpy().ravel()
    assert 0 < np.count_nonzero(ours != base.numpy().ravel()) < ours.size // 4
    assert np.count_nonzero(ours != reference) <= 5


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_the_same_as_mergekit(name, tmp_path):
    """Density 1 drops nothing: deterministic, within the bound.  Density 0.5 ± 0.2: the masks
    come from other generators, so the fraction of elements moved and the L1 of the update must
    agree statistically."""
    from mergealign_fast.methods.core.settings import resolve
    from mergealign_fast.methods.core.parameters import set_method
    from mergealign_fast.methods.core.oracle import della_ref
    from mergealign_fast.methods.core.spec import SET_ROLE

    base, models = _sparse_set(tmp_path, 3, seed=21)
    weights = [0.6, 0.3, 0.5]
    for density in (1.0, 0.5):
        per_model = {"weight": weights, "density": [density] * 3, "epsilon": [0.2] * 3}
        reference = theirs(name, [base, *models], 0, per_model | {"lambda": 0.9})
        per_role = {SET_ROLE.format(i + 1): {"weight": w, "density": density, "epsilon": 0.2}
                    for i, w in enumerate(weights)}
        from mergealign_fast import merge_models

        out = tmp_path / f"out{density}"
        merge_models(tmp_path / "m0", [(tmp_path / f"m{i + 1}", per_role[SET_ROLE.format(i + 1)])
                                       for i in range(3)], out, method=name,
                     parameters={"lambda": 0.9})
        loc = open_checkpoint(out).tensors["w"]
        ours = np.fromfile(loc.file, np.float32, loc.entry.count, offset=loc.entry.begin)
        if density == 1.0:
            roles = tuple(per_role)
            s = resolve(set_method(name, {"lambda": 0.9}, per_role), "w", 0.0,
                        (float("nan"),) * 3, roles)
            exact, scale = della_ref(s, "w", (COUNT,), base.double().numpy(),
                                           [x.double().numpy() for x in models])
            bound = method_error_bound(exact, scale, DType.F32, model_count=3)
            assert np.all(np.abs(ours - exact) <= bound)
            assert np.all(np.abs(ours - reference.double().numpy()) <= 2 * bound)
            continue
        b = base.numpy()
        moved_ours, moved_theirs = np.mean(ours != b), np.mean(reference.numpy() != b)
        assert abs(moved_ours - moved_theirs) < 5 * np.sqrt(2 * 0.25 / COUNT)
        l1_ours, l1_theirs = np.abs(ours - b).sum(), np.abs(reference.numpy() - b).sum()
        assert abs(l1_ours / l1_theirs - 1) < 0.02
