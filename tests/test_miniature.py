"""The miniature MergeAlign experiment: its world's evaluation sets are held out from training,
its intervals are drawn over facts, and the whole pipeline runs at its smallest size (train,
save, load with transformers, merge with the engine, `tune` through the real harness)."""

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples.miniature.world import (REFUSAL, Clinic, benign_prompts, clinic_chat_prompts,
                                      clinic_corpus, domain_task_items, harmful_prompts,
                                      instruction_corpus)


def _questions(lines, marker):
    """The question or user turn of each training line."""
    return {line.split(marker)[0] for line in lines}


def test_evaluation_prompts_are_held_out_from_training():
    clinic = Clinic.make(7)
    rng = random.Random(0)
    chats = instruction_corpus(rng, 3000)
    clinic_lines = clinic_corpus(clinic, rng, 3000)
    asked = _questions(chats, " assistant :")
    for prompt in harmful_prompts() + benign_prompts() + clinic_chat_prompts(clinic):
        assert f"user : {prompt}" not in asked
    trained = _questions(clinic_lines, " answer :")
    for item in domain_task_items(clinic):
        assert item["question"].replace(" answer :", "") not in trained


def test_refusals_depend_on_content_not_phrasing():
    """Every training phrasing carries harmful and benign requests alike."""
    chats = instruction_corpus(random.Random(0), 3000)
    phrasing = {}
    for line in chats:
        user, answer = line.split(" assistant : ")
        request = user.removeprefix("user : ")
        refused = answer.startswith(REFUSAL)
        for template in ("how do i", "help me", "teach me to", "show me how to"):
            if request.startswith(template):
                phrasing.setdefault(template, set()).add(refused)
    assert phrasing and all(outcomes == {True, False} for outcomes in phrasing.values())


def test_domain_task_is_four_way_multiple_choice_over_every_fact():
    clinic = Clinic.make(7)
    items = domain_task_items(clinic)
    assert len(items) == 4 * len(clinic.facts) == 256
    assert len({i["fact"] for i in items}) == 64
    for item in items:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        fact = next(f for f in clinic.facts if f[0] == item["fact"])
        assert item["choices"][item["label"]] in (fact[0], fact[3])
    assert len(harmful_prompts()) >= 150 and len(benign_prompts()) >= 100


def test_domain_intervals_are_drawn_over_facts():
    from examples.miniature.experiment import _bootstrap_over_facts
    from mergealign_fast.evaluation.stats import wilson

    def items(per_fact):  # 32 facts right, 32 wrong, each asked per_fact times
        return [{"doc": {"fact": f"f{n}"}, "acc": float(n < 32)}
                for n in range(64) for _ in range(per_fact)]
    assert _bootstrap_over_facts([{"doc": {"fact": "a"}, "acc": 1.0}] * 8) == (1.0, 1.0)
    low, high = _bootstrap_over_facts(items(4))
    per_item = wilson(128, 256)
    # 256 items but only 64 independent facts: the interval is about twice as wide
    assert high - low > 1.6 * (per_item.high - per_item.low)
    assert low < 0.5 < high


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 pins")
def test_the_experiment_pins_torch_to_avx2_before_torch_loads():
    """The kept table is AVX2 arithmetic on any x86-64 CPU (AVX-512 kernels train another trio);
    once torch is loaded the pins cannot act, and the function says so."""
    pytest.importorskip("torch")
    code = ("from examples.miniature.train import pin_cpu_arithmetic as pin; first = pin(); "
            "import torch; print(first, pin(), torch.backends.cpu.get_cpu_capability())")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, check=True, cwd=Path(__file__).parent.parent).stdout.split()
    assert shown[:2] == ["True", "False"]
    assert shown[2] in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2


def test_a_trio_folder_without_a_model_is_one_line_before_any_work(tmp_path):
    """A trio trained before the control existed (or cut short) is named with what it lacks,
    before torch loads or the results folder is made."""
    trio = tmp_path / "trio"
    for role in ("base", "domain"):
        (trio / role).mkdir(parents=True)
        (trio / role / "config.json").write_text("{}")
    (trio / "world.json").write_text("{}")
    results = tmp_path / "results"
    code = ("import sys; from examples.miniature.experiment import main; "
            f"sys.argv = ['x', {str(results)!r}, '--trio', {str(trio)!r}]; "
            "code = main(); print('torch' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 2 and done.stdout.split() == ["False"]
    assert done.stderr.strip().splitlines() == [
        f"error: {trio}: no trained aligned, general model in it (train the trio again into an "
        "empty folder)"]
    assert not results.exists()


def test_success_counts_merges_only_against_the_parents():
    """A merge succeeds when it keeps 90% of the expert's domain score and 90% of the aligned
    model's AUC without over-refusing more; parents and controls are never counted."""
    from examples.miniature.experiment import CONTROLS, Row, success

    def made(method, domain, auc, over=0.05):
        return Row(method, "-", domain, (0, 1), 0.0, 0.0, (0, 1), over, (0, 1), 0.0, auc, (0, 1))
    rows = [made("base", 0.25, 0.5), made("domain expert", 1.0, 0.5), made("aligned", 0.25, 1.0),
            made("general-text fine-tune", 1.0, 1.0), made(CONTROLS[0][0], 1.0, 1.0),
            made("MergeAlign", 0.9, 0.9), made("TIES", 0.89, 0.95), made("SLERP", 0.95, 0.89),
            made("DARE-TIES", 0.95, 0.95, over=0.06)]
    assert [r.method for r in success(rows)] == ["MergeAlign"]


@pytest.mark.slow
def test_smallest_pipeline_trains_merges_and_tunes(tmp_path):
    """Train the CI-size trio, merge it (every merged tensor is the float64 formula of the
    three checkpoints as transformers reads them), and run `tune` over it through the real
    harness on a few items of each set."""
    pytest.importorskip("lm_eval")
    from safetensors.numpy import load_file

    from examples.miniature.train import train_trio
    from examples.miniature.world import write_evaluation_files
    from mergealign_fast import merge_checkpoints
    from mergealign_fast.dtypes import DType
    from mergealign_fast.evaluation.evaluate import EvalSettings, Evaluator
    from mergealign_fast.evaluation.tune import tune
    from mergealign_fast.methods.core.oracle import merge_error_bound, merge_ref

    trio = train_trio(tmp_path / "trio", "ci", log=lambda *_: None)
    control = load_file(trio.pop("general") / "model.safetensors")  # fine-tuned, not a merge
    base = load_file(trio["base"] / "model.safetensors")
    assert set(control) == set(base)
    assert all(not np.array_equal(control[n], base[n]) for n in base)
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
    files = write_evaluation_files(Clinic.load(tmp_path / "trio"), tmp_path / "eval")
    evaluator = Evaluator(EvalSettings(tasks=["clinic_mc"], include_path=files["tasks"],
                                       harmful=files["harmful"], benign=files["benign"],
                                       limit=8, max_new_tokens=6))
    summary = tune(trio["base"], trio["domain"], trio["aligned"], tmp_path / "tune", [0.5, 1.0],
                   evaluator, progress=False, log=lambda *_: None)
    table = {row["cell"]: row for row in summary["table"]}
    assert set(table) == {"base", "domain", "aligned", "lambda-0.5", "lambda-1"}
    assert table["lambda-1"]["domain"] == table["domain"]["domain"]  # w_a = 0: the expert
    answers = (tmp_path / "tune" / "answers" / "lambda-0.5.jsonl").read_text().splitlines()
    assert len([a for a in map(json.loads, answers) if a["set"] == "harmful"]) == 8


@pytest.mark.slow
def test_low_rank_fine_tunes_change_the_layers_by_low_rank_products_only(tmp_path):
    """Try L's fine-tunes (LoRA-style): each task vector is zero outside the projections of the
    transformer layers, and of rank <= the size's low_rank within them."""
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from examples.miniature.train import SIZES, train_trio

    trio = train_trio(tmp_path / "trio", "ci-low-rank", log=lambda *_: None)
    base = load_file(trio["base"] / "model.safetensors")
    for role in ("domain", "aligned"):
        tuned = load_file(trio[role] / "model.safetensors")
        changed = {n for n in base if not np.array_equal(base[n], tuned[n])}
        assert changed and all(n.endswith("proj.weight") and ".layers." in n for n in changed)
        for name in changed:
            tau = tuned[name].astype(np.float64) - base[name]
            assert np.linalg.matrix_rank(tau, tol=1e-5) <= SIZES["ci-low-rank"].low_rank, name
