"""Consensus merging (consensus_ta, consensus_ties: TALL masks, arXiv 2405.07813) against a
float64 statement written from the paper and mergekitty's definition, on sets and the trio,
fp32 and bf16, any window size; against mergekitty itself where it is installed; its own
parameter `k` on the command line and in configs."""

import numpy as np
import pytest

from mergealign_fast import merge_models, merge_set_tensors
from mergealign_fast.cli.main import main
from mergealign_fast.dtypes import DType, bf16_bits_to_f32, f32_to_bf16_bits
from mergealign_fast.errors import PlanError
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements
from mergealign_fast.mergekit.config import load
from mergealign_fast.methods.core.oracle import FP32_UNIT_ROUNDOFF, method_error_bound
from mergealign_fast.methods.core.spec import TRIO_MODELS
from mergealign_fast.methods.windows import consensus

from conftest import write_checkpoint

F32 = np.float32


def _statement(ties, b, xs, weights, densities, lam, k, normalize, rescale):
    """(exact, scale, ambiguous) of a consensus merge in float64.  The discrete decisions the
    definition takes on fp32 values (the trim's order of |τ|, the elected sign of Σ terms) are
    taken on them; an element whose TALL decision lies within the rounding of τ_MTL of its
    threshold is `ambiguous`: either outcome is right.  Also returns base + τ_MTL unmasked."""
    b32 = b.astype(F32)
    taus32 = [x.astype(F32) - b32 for x in xs]
    terms32, terms64 = [], []
    for tau32, w, d in zip(taus32, weights, densities):
        kept, factor = np.ones(tau32.size, dtype=bool), 1.0
        if ties and d < 1.0:
            kept[:] = False
            if d > 0.0:  # the largest max(1, int(d·n)) |τ|, ties in index order
                order = np.argsort(-np.abs(tau32), kind="stable")
                kept[order[:max(1, int(d * tau32.size))]] = True
            magnitude = np.abs(tau32.astype(np.float64))
            before, after = magnitude.sum(), magnitude[kept].sum()
            if rescale == "l1" and before >= 1e-7 and after >= 1e-7:
                factor = before / after
            elif rescale == "inverse_density" and d > 0.0:
                factor = 1.0 / d
        terms32.append(np.where(kept, (tau32 * F32(factor)) * F32(w), F32(0)))
        terms64.append(np.where(kept, tau32.astype(np.float64) * factor * w, 0.0))
    if ties:  # TIES' election: the sign of the fp32 sum (+ at 0); a zero term has no sign
        up = np.sum(terms32, axis=0, dtype=F32) >= 0
        agree = [np.where(up, t > 0, t < 0) for t in terms32]
        mixed = sum(np.where(a, t, 0.0) for a, t in zip(agree, terms64))
        divisor = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(terms64)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    else:
        divisor = 1.0
    mixed_scale = (sum(np.abs(t) for t in terms64)
                   + sum(np.abs(x - b) * abs(w) for x, w in zip(xs, weights))) / np.abs(divisor)
    mixed_error = (6 + len(xs)) * FP32_UNIT_ROUNDOFF * mixed_scale
    taus = [t.astype(np.float64) for t in taus32]
    margins = [np.abs(t) - lam * np.abs(mixed - t) for t in taus]
    votes = sum(m > 0 for m in margins)
    # A margin of exactly 0 is exact arithmetic (bf16 τ summed), decided as it is: not held.
    ambiguous = np.any([(np.abs(m) <= 2 * abs(lam) * mixed_error) & (m != 0)
                        for m in margins], 0)
    kept = votes >= k
    exact = b + np.where(kept, mixed, 0.0)
    return exact, np.abs(b) + mixed_scale, ambiguous, b + mixed


def _inputs(count, shape, seed, bf16=False, quantum=None):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(F32)
    steps = [rng.standard_normal(shape) * 0.05 for _ in range(count)]
    if quantum is not None:  # many equal |τ|: ties at the trim's threshold
        steps = [np.round(s / quantum) * quantum for s in steps]
    models = [(base + s).astype(F32) for s in steps]
    if bf16:
        return [f32_to_bf16_bits(x) for x in [base, *models]]
    return [base, *models]


def _f64(x):
    return (bf16_bits_to_f32(x) if x.dtype == np.uint16 else x).astype(np.float64).ravel()


def _check(out, inputs, ties, weights, densities, lam, k, normalize, rescale, out_dtype,
           ambiguous_share=0.01):
    b, *xs = (_f64(x) for x in inputs)
    exact, scale, ambiguous, unmasked = _statement(ties, b, xs, weights, densities, lam, k,
                                                   normalize, rescale)
    got = _f64(np.asarray(out))
    bound = method_error_bound(exact, scale, out_dtype, model_count=len(xs))
    close = np.abs(got - exact) <= bound
    either = close | (ambiguous & ((np.abs(got - b) <= bound) | (np.abs(got - unmasked) <= bound)))
    assert either.all(), f"{np.count_nonzero(~either)} elements off"
    assert np.count_nonzero(ambiguous) <= ambiguous_share * ambiguous.size  # it can still fail
    return got, b


CASES = [  # method, weights, densities, shared parameters
    ("consensus_ta", (1.0, 1.0, 1.0), None, {"k": 2}),
    ("consensus_ta", (0.3, 0.7), None, {"k": 2, "lambda": 0.5}),
    ("consensus_ta", (0.5, 0.2, 0.9, 0.4), None, {"k": 3, "lambda": 0.8, "normalize": True}),
    ("consensus_ties", (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), {"k": 2}),
    ("consensus_ties", (0.6, 0.4), (0.3, 0.8), {"k": 1, "lambda": 1.5}),
    ("consensus_ties", (0.5, 0.5, 0.5, 0.5), (0.2, 1.0, 0.0, 0.6),
     {"k": 2, "rescale": "l1", "normalize": False}),
    ("consensus_ties", (0.7, -0.3, 0.5), (0.4, 0.4, 0.9), {"k": 2, "rescale": "inverse_density"}),
    ("consensus_ties", (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), {"k": 0}),  # k = 0: TIES itself
]


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("method, weights, densities, shared", CASES)
def test_within_the_fp32_bound_of_the_statement(method, weights, densities, shared, bf16):
    ties = method == "consensus_ties"
    inputs = _inputs(len(weights), (23, 19), seed=len(weights) + 7 * bf16, bf16=bf16)
    per_model = [{"weight": w, **({"density": d} if ties else {})}
                 for w, d in zip(weights, densities or weights)]
    trio = len(weights) == 2
    out = merge_set_tensors(inputs[0], inputs[1:], method=method, parameters=shared,
                            per_model=per_model, roles=TRIO_MODELS if trio else None)
    got, b = _check(out, inputs, ties, weights, densities or (1.0,) * len(weights),
                    shared.get("lambda", 1.0), shared["k"],
                    shared.get("normalize", ties), shared.get("rescale", "none"),
                    DType.BF16 if bf16 else DType.F32)
    masked = np.mean(got == b)
    assert masked < 1.0 and (shared["k"] == 0 or masked > 0.0)  # the masks did something


def test_more_agreement_asked_keeps_fewer_elements():
    inputs = _inputs(4, (40, 30), seed=5)
    kept = []
    for k in range(5):
        out = merge_set_tensors(inputs[0], inputs[1:], method="consensus_ta",
                                parameters={"k": k, "weight": 0.5})
        kept.append(int(np.count_nonzero(np.asarray(out) != inputs[0])))
    assert kept == sorted(kept, reverse=True) and kept[0] == inputs[0].size and kept[4] < kept[1]


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
def test_any_window_gives_the_same_bytes_ties_kept_in_index_order(tmp_path, monkeypatch, method):
    """Quantized τ tie often at the trim's threshold: the same k are kept, the first in index
    order, whether a window holds the tensor or 7 elements; model folders as in memory."""
    inputs = _inputs(3, (30, 20), seed=9, quantum=0.05)
    for i, x in enumerate(inputs):
        write_checkpoint(tmp_path / f"m{i}", {"w": x})
    parameters = {"k": 2, "weight": 1.0, **({"density": 0.35} if method.endswith("ties")
                                            else {})}
    outputs = []
    for window in (1 << 20, 7):
        monkeypatch.setattr(consensus, "WINDOW_ELEMENTS", window)
        out = tmp_path / f"out{window}"
        merge_models(tmp_path / "m0", [tmp_path / f"m{i}" for i in (1, 2, 3)], out,
                     method=method, parameters=parameters)
        outputs.append(read_elements(open_checkpoint(out).tensors["w"]).copy())
    assert outputs[0].tobytes() == outputs[1].tobytes()
    in_memory = merge_set_tensors(inputs[0], inputs[1:], method=method, parameters=parameters)
    assert np.asarray(in_memory).tobytes() == outputs[0].tobytes()
    ties = method.endswith("ties")
    # Quantized τ put many TALL decisions at their threshold (within τ_MTL's rounding).
    _check(outputs[0], inputs, ties, (1.0,) * 3, (0.35 if ties else 1.0,) * 3, 1.0, 2, ties,
           "none", DType.F32, ambiguous_share=0.2)


def test_odd_shapes():
    for shape in [(1,), (7,), (3, 1, 5), (2, 0)]:
        inputs = _inputs(3, shape, seed=1)
        out = merge_set_tensors(inputs[0], inputs[1:], method="consensus_ties",
                                parameters={"k": 2, "weight": 1.0, "density": 0.5})
        assert np.asarray(out).shape == shape
        if inputs[0].size:
            _check(out, inputs, True, (1.0,) * 3, (0.5,) * 3, 1.0, 2, True, "none", DType.F32)


def _folders(root, count=3):
    for i, x in enumerate(_inputs(count, (6, 5), seed=3)):
        write_checkpoint(root / f"m{i}", {"w": x})


def test_command_line_flags(tmp_path, capsys):
    _folders(tmp_path, 2)
    m = [str(tmp_path / f"m{i}") for i in range(3)]
    assert main(["merge", *m, "-o", str(tmp_path / "o"), "--method", "consensus_ties",
                 "--density", "0.5", "--consensus-k", "2", "--lambda", "0.7"]) == 0
    got = read_elements(open_checkpoint(tmp_path / "o").tensors["w"])
    inputs = [read_elements(open_checkpoint(tmp_path / f"m{i}").tensors["w"]) for i in range(3)]
    _check(got, inputs, True, (0.5, 0.5), (0.5, 0.5), 0.7, 2, True, "none", DType.F32)
    assert main(["merge", *m, "-o", str(tmp_path / "o2"), "--method", "ties", "--consensus-k", "2"]) != 0
    assert "--consensus-k does not apply to ties" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", *m, "-o", str(tmp_path / "o3"), "--method", "consensus_ta", "--consensus-k",
              "two"])
    assert main(["merge", *m, "-o", str(tmp_path / "o4"), "--method", "consensus_ta",
                 "--consensus-k", "-1"]) != 0
    assert "'k': -1 is not a non-negative integer" in capsys.readouterr().err
    assert "the TALL masks' λ" in _help(capsys)


def _help(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    return capsys.readouterr().out


def test_configs_as_mergekitty_writes_them(tmp_path):
    _folders(tmp_path)
    config = tmp_path / "c.yml"
    models = "".join(f"  - model: {tmp_path / f'm{i}'}\n    parameters: {{weight: 1.0, "
                     "density: 0.4}\n" for i in (1, 2, 3))
    config.write_text(f"merge_method: consensus_ta\nbase_model: {tmp_path / 'm0'}\n"
                      f"parameters: {{k: 2, lambda: 0.6, int8_mask: true}}\nmodels:\n{models}")
    run = load(config)
    assert {(r.parameter, r.setting) for r in run.method.rules if r.role is None} == \
        {("k", 2), ("lambda", 0.6)}
    assert any("`density` does not apply to consensus_ta" in w for w in run.warnings)
    config.write_text(config.read_text().replace("density: 0.4", "k: 3"))
    # mergekit reads shared parameters from the shared levels only: ignored, with a warning
    assert any("`k` in a model's parameters (a shared parameter" in w
               for w in load(config).warnings)
    config.write_text(config.read_text().replace("k: 2,", "k: 1.5,"))
    with pytest.raises(PlanError, match="parameter `k`: 1.5 is not a non-negative integer"):
        load(config)


def test_refused_off_the_cpu(tmp_path):
    _folders(tmp_path)
    with pytest.raises(PlanError, match="consensus_ta runs on the CPU path"):
        merge_models(tmp_path / "m0", [tmp_path / f"m{i}" for i in (1, 2)], tmp_path / "o",
                     method="consensus_ta", parameters={"weight": 1.0}, device="cuda")


def test_agrees_with_mergekitty():
    """mergekitty's own merge of one tensor (where it is installed: its torch pin keeps it out
    of the test extra, so CI adds it with `pip install --no-deps`)."""
    torch = pytest.importorskip("torch")
    gta = pytest.importorskip("mergekitty.merge_methods.generalized_task_arithmetic")
    from types import SimpleNamespace

    from mergekitty.architecture import WeightInfo
    from mergekitty.common import ImmutableMap, ModelReference
    from mergekitty.merge_methods.registry import REGISTERED_MERGE_METHODS

    inputs = _inputs(3, (33, 21), seed=11)
    refs = [ModelReference.parse(f"m{i}") for i in range(4)]
    weights = (0.9, 0.5, 0.7)
    for method, shared, density in [("consensus_ta", {"k": 2, "lambda": 0.8}, 1.0),
                                    ("consensus_ties", {"k": 2, "lambda": 1.0}, 0.5)]:
        # GTATask.execute reads these fields of its task (a pydantic model of a task graph).
        task = SimpleNamespace(
            method=REGISTERED_MERGE_METHODS[method], base_model=refs[0],
            weight_info=WeightInfo(name="w"), int8_mask=False,
            normalize=method.endswith("ties"), rescale=False,
            tensor_parameters=ImmutableMap({r: ImmutableMap(
                {"weight": w, "density": density, **shared}) for r, w in zip(refs[1:], weights)}))
        theirs = gta.GTATask.execute(task, {r: torch.from_numpy(x.copy())
                                            for r, x in zip(refs, inputs)}).numpy()
        ours = merge_set_tensors(inputs[0], inputs[1:], method=method, parameters=shared,
                                 per_model=[{"weight": w, **({"density": density}
                                                             if density < 1 else {})}
                                            for w in weights])
        assert np.mean(theirs == inputs[0]) > 0.05  # their masks dropped elements too
        # Both in fp32 (ours sums in model order, as they do): within a few roundings, but
        # for a TALL decision at its threshold.
        close = np.abs(np.asarray(ours) - theirs) <= 16 * FP32_UNIT_ROUNDOFF * (
            np.abs(inputs[0]) + 1.0)
        assert np.count_nonzero(~close) <= 2, method
