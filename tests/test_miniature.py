"""The miniature MergeAlign experiment: scoring on hand-made cases, and the whole pipeline at
its smallest size (train, save, load with transformers, merge with the engine, evaluate)."""

import pytest

from mergealign_fast.miniature.evaluate import (Scores, answer_text, is_correct, is_refusal,
                                                score)
from mergealign_fast.miniature.world import (REFUSAL, Clinic, EvalItem, benign_eval,
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

    from mergealign_fast.miniature.world import clinic_corpus, instruction_corpus

    clinic = Clinic.make(7)
    training = set(clinic_corpus(clinic, random.Random(0), 2000)
                   + instruction_corpus(random.Random(0), 2000))
    prompts = [i.prompt for i in domain_eval(clinic) + harmful_eval(clinic) + benign_eval()]
    assert prompts and not any(line.startswith(p) for p in prompts for line in training)


def test_smallest_pipeline_trains_merges_and_evaluates(tmp_path):
    pytest.importorskip("transformers")
    from mergealign_fast import merge_checkpoints
    from mergealign_fast.miniature.evaluate import evaluate
    from mergealign_fast.miniature.train import train_trio

    trio = train_trio(tmp_path / "trio", "ci", log=lambda *_: None)
    out = tmp_path / "merged"
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, domain_weight=0.5,
                      align_weight=0.5)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    scores = evaluate(out, Clinic.load(tmp_path / "trio"))
    assert all(0.0 <= v <= 1.0 for v in (scores.domain_accuracy, scores.refusal_rate,
                                         scores.over_refusal))
