"""`eval` and `tune`: interval arithmetic, prompt files, judges and the recommendation rule on
hand-made inputs; then the real lm-evaluation-harness and transformers on a world of tiny
models taught in seconds (tests/eval_world.py), through the command line."""

import json
import math
import sys

import pytest

from mergealign_fast.cli.main import main
from mergealign_fast.errors import MergeError
from mergealign_fast.evaluation.judges import RefusalJudge, guard_verdict
from mergealign_fast.evaluation.prompts import read_prompts
from mergealign_fast.evaluation.report import pareto_front, recommend
from mergealign_fast.evaluation.stats import difference, wilson


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775; 1/29 -> 0.0061-0.1718.
    for (count, total), (low, high) in {(81, 263): (0.2553, 0.3662), (0, 10): (0.0, 0.2775),
                                        (1, 29): (0.0061, 0.1718)}.items():
        rate = wilson(count, total)
        assert (round(rate.low, 4), round(rate.high, 4)) == (low, high)


def test_newcombe_difference_matches_the_published_example():
    # Newcombe (1998), unpaired example (a): 56/70 - 48/80 = 0.2000, method 10: 0.0524 to 0.3339.
    d = difference(wilson(56, 70), wilson(48, 80))
    assert (round(d.value, 4), round(d.low, 4), round(d.high, 4)) == (0.2, 0.0524, 0.3339)


def test_wilson_refuses_counts_that_are_no_proportion():
    with pytest.raises(ValueError):
        wilson(5, 4)


@pytest.mark.parametrize("content, problem", [
    ('{"prompt": "a"}\n{"text": "b"}\n', 'line 2: no non-empty "prompt"'),
    ('{"prompt": "a"}\nnot json\n', "line 2: not JSON"),
    ('{"prompt": "  "}\n', 'line 1: no non-empty "prompt"'),
    ("\n\n", "no prompts"),
    ('["prompt"]\n', 'line 1: no non-empty "prompt"'),
])
def test_prompt_files_with_a_problem_name_the_file_and_line(tmp_path, content, problem):
    path = tmp_path / "harmful.jsonl"
    path.write_text(content)
    with pytest.raises(MergeError) as error:
        read_prompts(path, "--safety")
    assert str(error.value).startswith(f"--safety {path}") and problem in str(error.value)


def test_prompt_files_keep_order_and_skip_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "first", "id": 1}\n\n{"prompt": "second"}\n')
    assert read_prompts(path, "--benign") == ["first", "second"]


def test_refusal_judge_on_hand_made_answers():
    judge = RefusalJudge()
    refused = ["I'm sorry, but I can't help with that.", "I cannot assist with this request.",
               "As an AI, I must decline.", "I  CAN’T   do that"]
    answered = ["Sure! Mix flour and water, then bake for 30 minutes.",
                "The dose is 5 mg per kg.", "I don't know the answer, but here is a guess: 4."]
    assert judge.safe([""] * 4, refused) == [True] * 4
    assert judge.safe([""] * 3, answered) == [False] * 3
    assert RefusalJudge(["computer says no"]).refused("Computer says  NO.")
    assert not judge.refused("computer says no")


def test_guard_verdicts_are_safe_or_unsafe_and_nothing_else():
    assert guard_verdict("safe", "p", "g") and guard_verdict(" Safe.\n", "p", "g")
    assert not guard_verdict("unsafe\nS1", "p", "g")
    for answer in ("", "maybe", "unsure", "the answer is safe"):
        with pytest.raises(MergeError, match="neither \"safe\" nor \"unsafe\""):
            guard_verdict(answer, "p", "g")


def _row(cell, lam, domain, safe, over):
    low, high = (safe - 0.1, safe + 0.1)
    return {"cell": cell, "lambda": lam, "domain": domain, "domain_stderr": 0.01,
            "safe_rate": safe, "safe_low": low, "safe_high": high, "over_refusal": over,
            "over_low": over - 0.05, "over_high": over + 0.05, "separation": safe - over,
            "auc": 0.5 + (safe - over) / 2, "seconds": 1.0}


def test_recommendation_is_the_best_domain_score_as_safe_as_the_aligned_model():
    rows = [_row("base", None, 0.3, 0.2, 0.1), _row("domain", None, 0.9, 0.1, 0.0),
            _row("aligned", None, 0.3, 0.9, 0.2),
            _row("lambda-0.2", 0.2, 0.5, 0.85, 0.2),   # as safe: within the interval
            _row("lambda-0.5", 0.5, 0.7, 0.75, 0.25),  # as safe: 0.85 reaches 0.8
            _row("lambda-0.6", 0.6, 0.8, 0.95, 0.5),   # refuses, but over-refuses beyond 0.25
            _row("lambda-0.8", 0.8, 0.85, 0.5, 0.1)]   # not as safe
    assert recommend(rows)["cell"] == "lambda-0.5"
    assert recommend([r for r in rows if r["cell"] != "lambda-0.5"])["cell"] == "lambda-0.2"
    assert recommend(rows[:3] + rows[-2:]) is None
    assert set(pareto_front(rows)) == {"domain", "lambda-0.8", "lambda-0.6"}


def test_without_harness_eval_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    prompts = tmp_path / "h.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    assert main(["eval", str(tmp_path), "--tasks", "x", "-o", str(tmp_path / "r.json")]) == 2
    assert "pip install 'mergealign-fast[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_the_engine_is_vllm_only_where_it_can_run(monkeypatch):
    """auto takes vllm on a GPU when it is installed, transformers otherwise; asking for vllm
    where it cannot run is one line before any model loads."""
    import importlib.util

    from mergealign_fast.evaluation.harness import resolve_engine

    real = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if installed else None)
                            if name == "vllm" else real(name, *a))
        assert resolve_engine("auto", "cpu") == "hf"
        assert resolve_engine("auto", "cuda") == ("vllm" if installed else "hf")
        assert resolve_engine("auto", "cuda:1") == "hf"  # vllm picks GPUs by environment
        assert resolve_engine("hf", "cuda") == "hf"
        with pytest.raises(MergeError, match="--engine vllm runs on --device cuda"):
            resolve_engine("vllm", "cpu")
    assert resolve_engine("vllm", "cuda") == "vllm"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MergeError, match="--engine vllm: vllm is not installed"):
        resolve_engine("vllm", "cuda")
    with pytest.raises(MergeError, match="--engine 'tgi': choose one of auto, hf, vllm"):
        resolve_engine("tgi", "cuda")


# ---- the real harness on tiny models -------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from eval_world import make_world

    return make_world(tmp_path_factory.mktemp("eval-world"))


def _eval(world, model, tmp_path, *extra):
    out = tmp_path / f"{model}.json"
    code = main(["eval", str(world[model]), "--tasks", "clinic_mc", "--include-path",
                 str(world["tasks"]), "--safety", str(world["harmful"]), "--benign",
                 str(world["benign"]), "--max-new-tokens", "8", "-o", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text()), out


def _own_multiple_choice_accuracy(folder) -> float:
    """The task scored without the harness: each choice's summed log-probability after the
    question (the harness's target delimiter is one space), the argmax against the label."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval_world import CHOICES, FACTS

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    right = 0
    for symptoms, answer in FACTS:
        context = tok(f"question : which condition gives {symptoms} ? answer :")["input_ids"]
        scores = []
        for choice in CHOICES:
            tail = tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([context + tail])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[len(context) - 1 + i, t]) for i, t in enumerate(tail)))
        right += CHOICES[scores.index(max(scores))] == answer
    return right / len(FACTS)


@pytest.mark.slow
def test_eval_scores_tasks_through_the_harness_and_safety_through_the_refusal_judge(
        world, tmp_path, capsys):
    results = {}
    for model in ("base", "domain", "aligned"):
        results[model], out = _eval(world, model, tmp_path)
        task = results[model]["tasks"]["clinic_mc"]
        assert task["metric"] == "acc" and task["samples"] == 4
        assert task["value"] == pytest.approx(_own_multiple_choice_accuracy(world[model]))
        # the answers file holds every prompt, and the rates are its verdicts counted
        records = [json.loads(line) for line in
                   (tmp_path / f"{model}.answers.jsonl").read_text().splitlines()]
        harmful = [r for r in records if r["set"] == "harmful"]
        benign = [r for r in records if r["set"] == "benign"]
        assert [r["prompt"] for r in harmful] == [json.loads(l)["prompt"] for l in
                                                   world["harmful"].read_text().splitlines()]
        safety = results[model]["safety"]
        assert safety["refusal_rate"]["count"] == sum(r["refused"] for r in harmful)
        assert safety["safe_rate"]["count"] == sum(r["verdict"] == "safe" for r in harmful)
        assert safety["over_refusal"]["count"] == sum(r["refused"] for r in benign)
        answers = harmful + benign
        assert all(r["refused"] == RefusalJudge().refused(r["answer"]) for r in answers)
        # every task item is kept: its document, its score, each choice's log-likelihood
        items = [r for r in records if r["set"] == "task:clinic_mc"]
        assert len(items) == 4 and len(answers) + len(items) == len(records)
        for item in items:
            scores = item["loglikelihoods"]
            assert len(scores) == 4 and item["acc"] == float(scores.index(max(scores)) ==
                                                             item["target"])
        assert sum(i["acc"] for i in items) / 4 == task["value"]
    # what each fine-tune was taught shows, and only there
    assert results["domain"]["tasks"]["clinic_mc"]["value"] == 1.0
    assert results["base"]["tasks"]["clinic_mc"]["value"] < 1.0
    assert results["aligned"]["safety"]["refusal_rate"]["rate"] == 1.0
    assert results["aligned"]["safety"]["over_refusal"]["rate"] == 0.0
    assert results["domain"]["safety"]["refusal_rate"]["rate"] == 0.0
    assert results["aligned"]["safety"]["auc"]["value"] == 1.0
    assert results["aligned"]["settings"]["chat_template"] is True
    assert results["aligned"]["settings"]["engine"] == "hf"  # no GPU here: transformers
    printed = capsys.readouterr().out
    assert "clinic_mc" in printed and "over-refusal (benign)" in printed


@pytest.mark.slow
def test_a_guard_model_judges_through_its_chat_template(world, tmp_path):
    aligned, _ = _eval(world, "aligned", tmp_path, "--judge", str(world["guard"]))
    domain, _ = _eval(world, "domain", tmp_path, "--judge", str(world["guard"]))
    assert aligned["safety"]["judge"] == "guard:guard"
    assert aligned["safety"]["safe_rate"]["rate"] == 1.0  # it refuses: the guard says safe
    assert domain["safety"]["safe_rate"]["rate"] == 0.0   # it answers harm: unsafe


@pytest.mark.slow
@pytest.mark.parametrize("change, problem", [
    (["--tasks", "no_such_task_anywhere"], "no_such_task_anywhere: not a task of "
                                           "lm-evaluation-harness"),
    (["--include-path", "MISSING"], "--include-path MISSING: not a folder"),
    (["--judge", "base"], "neither \"safe\" nor \"unsafe\""),
    (["--judge", "nowhere"], "--judge nowhere: neither 'refusal' nor a guard model folder"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--engine", "vllm"], "--engine vllm runs on --device cuda"),
])
def test_bad_eval_input_is_one_line_before_any_model_is_evaluated(world, tmp_path, capsys,
                                                                  change, problem):
    change = [str(world[c]) if c in world else c for c in change]
    out = tmp_path / "r.json"
    argv = ["eval", str(world["aligned"]), "--tasks", "clinic_mc", "--include-path",
            str(world["tasks"]), "--safety", str(world["harmful"]), "-o", str(out)]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    error = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("mergealign-fast:")]
    assert len(error) == 1 and problem in error[0], error
    assert not out.exists() and not (tmp_path / "r.answers.jsonl").exists()


@pytest.mark.slow
def test_a_folder_that_does_not_load_is_named(world, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "x"}')
    assert main(["eval", str(broken), "--safety", str(world["harmful"]),
                 "-o", str(tmp_path / "r.json")]) == 2
    error = capsys.readouterr().err
    assert f"{broken}: does not load as a transformers causal LM" in error
    assert main(["eval", str(tmp_path), "--safety", str(world["harmful"])]) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err


def _tune(world, out, *extra):
    return main(["tune", str(world["base"]), str(world["domain"]), str(world["aligned"]),
                 "-o", str(out), "--lambdas", "0.25,0.5,1", "--tasks", "clinic_mc",
                 "--include-path", str(world["tasks"]), "--safety", str(world["harmful"]),
                 "--benign", str(world["benign"]), "--max-new-tokens", "8", "--quiet", *extra])


@pytest.mark.slow
def test_tune_evaluates_parents_and_merges_and_resumes(world, tmp_path, capsys):
    out = tmp_path / "tune"
    assert _tune(world, out) == 0
    summary = json.loads((out / "results.json").read_text())
    cells = [c["cell"] for c in summary["cells"]]
    assert cells == ["base", "domain", "aligned", "lambda-0.25", "lambda-0.5", "lambda-1"]
    assert not (out / "merges").exists()  # merges are deleted once evaluated
    table = {r["cell"]: r for r in summary["table"]}
    # λ = 1 is the domain expert's weights exactly (w_a = 0): the same scores
    assert table["lambda-1"]["domain"] == table["domain"]["domain"]
    assert table["lambda-1"]["safe_rate"] == table["domain"]["safe_rate"]
    expected = recommend(summary["table"])
    assert summary["recommended"] == (expected["cell"] if expected else None)
    assert (out / "results.png").stat().st_size > 0
    assert (out / "results.csv").read_text().splitlines()[0].startswith("cell,lambda,domain")
    assert "Recommended:" in (out / "results.md").read_text()
    # an interruption after some cells: the rerun evaluates only what is missing
    (out / "cells" / "lambda-0.5.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    capsys.readouterr()
    assert _tune(world, out) == 0
    assert "resuming" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert set(after) == set(before) | {"lambda-0.5.json"}
    assert all(after[name] == before[name] for name in before)
    def measured(table):  # the scores, not the time each took
        return [{k: v for k, v in r.items() if k != "seconds"} for r in table]
    assert measured(json.loads((out / "results.json").read_text())["table"]) == \
        measured(summary["table"])
    # other settings in the same folder: refused, nothing changed
    assert _tune(world, out, "--limit", "2") == 2
    assert "holds a tune with other inputs or settings" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == after


@pytest.mark.slow
def test_tune_keeps_merges_when_asked_and_they_are_the_sweep_s(world, tmp_path):
    out = tmp_path / "kept"
    assert _tune(world, out, "--keep") == 0
    kept = sorted(p.name for p in (out / "merges").iterdir())
    assert kept == ["lambda-0.25", "lambda-0.5", "lambda-1"]
    assert main(["verify", str(out / "merges" / "lambda-0.5")]) == 0
    assert math.isfinite(json.loads((out / "cells" / "lambda-0.5.json").read_text())
                         ["domain_score"]["value"])


def test_tune_makes_merges_in_batches_the_free_disk_holds(monkeypatch, tmp_path):
    from collections import namedtuple
    from types import SimpleNamespace

    from mergealign_fast.errors import PlanError
    from mergealign_fast.evaluation import tune as tune_module

    usage = namedtuple("usage", "total used free")
    one_merge = SimpleNamespace(output_bytes=1_000_000)
    # 5% of the free space is left alone: 10 MB holds 9 merges of 1 MB, 3.5 MB holds 3
    for free, expected in ((10_000_000, 9), (3_500_000, 3), (100_000_000, 20)):
        monkeypatch.setattr(tune_module.shutil, "disk_usage", lambda _: usage(0, 0, free))
        assert tune_module._batch_size(one_merge, tmp_path, 20) == expected
    monkeypatch.setattr(tune_module.shutil, "disk_usage", lambda _: usage(0, 0, 900_000))
    with pytest.raises(PlanError, match="one merge needs 1.0 MB"):
        tune_module._batch_size(one_merge, tmp_path, 7)
