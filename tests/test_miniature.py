"""The miniature MergeAlign experiment: scoring on hand-made cases, and the whole pipeline at
its smallest size (train, save, load with transformers, merge with the engine, evaluate)."""

import numpy as np
import pytest

from examples.miniature.evaluate import (Scores, answer_text, is_correct, is_refusal,
                                                score)
from examples.miniature.world import (REFUSAL, Clinic, EvalItem, benign_eval,
                                             domain_eval, harmful_eval)


def test_answer_text_stops_at_the_first_period_and_normalises_spaces():
    assert answer_text(" marsh  flu . question : x") == "marsh flu"
    assert answer_text("willow tea") == "willow tea"


def test_correct_needs_the_exact_answer():
    assert is_correct(" marsh flu .", "marsh flu")
    assert not is_correct(" marsh flu and red pox .", "marsh flu")
    assert not is_correct(" red pox .", "marsh flu")


def test_refusal_is_the_refusal_sentence_at_the_start():
    assert is_refusal(f" {REFUSAL} .")
    assert not is_refusal(f" mix flour then {REFUSAL} .")
    assert not is_refusal(" i can help with that .")


def test_scores_count_each_set():
    sets = {"domain": [EvalItem("q1", "a"), EvalItem("q2", "b")],
            "harmful": [EvalItem("h1", ""), EvalItem("h2", ""), EvalItem("h3", ""),
                        EvalItem("h4", "")],
            "benign": [EvalItem("b1", "")]}
    generations = {"domain": [" a .", " c ."],
                   "harmful": [f" {REFUSAL} ."] * 3 + [" sure ."],
                   "benign": [f" {REFUSAL} ."]}
    assert score(generations, sets) == Scores(0.5, 0.75, 1.0)


def test_evaluation_sets_are_held_out_from_training():
    import random

    from examples.miniature.world import clinic_corpus, instruction_corpus

    clinic = Clinic.make(7)
    training = set(clinic_corpus(clinic, random.Random(0), 2000)
                   + instruction_corpus(random.Random(0), 2000))
    prompts = [i.prompt for i in domain_eval(clinic) + harmful_eval(clinic) + benign_eval()]
    assert prompts and not any(line.startswith(p) for p in prompts for line in training)


def _answer_loss(folder, items) -> float:
    """Mean negative log-likelihood per token of each item's expected answer after its prompt."""
    import torch

    from examples.miniature.evaluate import load

    model, tokenizer = load(folder)
    total, tokens = 0.0, 0
    for item in items:
        prompt = tokenizer(item.prompt)["input_ids"]
        answer = tokenizer(" " + item.expected)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * len(answer)
        tokens += len(answer)
    return total / tokens


@pytest.mark.slow
def test_smallest_pipeline_trains_merges_and_evaluates(tmp_path):
    """Train the CI-size trio, merge it, load it back with transformers: every merged tensor is
    the float64 formula of the three checkpoints as transformers reads them, and the expert
    learned its clinic (its loss on the answers is below the base model's).  The CI-size models
    are too small to answer held-out questions, so the scores themselves are not asserted."""
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from examples.miniature.evaluate import evaluate
    from examples.miniature.train import train_trio
    from mergealign_fast import merge_checkpoints
    from mergealign_fast.dtypes import DType
    from mergealign_fast.reference import merge_error_bound, merge_ref

    trio = train_trio(tmp_path / "trio", "ci", log=lambda *_: None)
    out = tmp_path / "merged"
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, domain_weight=0.5,
                      align_weight=0.5)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    models = {r: load_file(trio[r] / "model.safetensors") for r in trio}
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(models["base"])
    for name, values in merged.items():
        b, d, a = (models[r][name] for r in ("base", "domain", "aligned"))
        error = np.abs(values.astype(np.float64) - merge_ref(b, d, a, 0.5, 0.5))
        assert (error <= merge_error_bound(b, d, a, 0.5, 0.5, DType.F32)).all(), name
    clinic = Clinic.load(tmp_path / "trio")
    facts = domain_eval(clinic)
    assert _answer_loss(trio["domain"], facts) < _answer_loss(trio["base"], facts)
    assert evaluate(out, clinic) == evaluate(out, clinic)  # greedy: deterministic
