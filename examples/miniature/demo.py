"""`mergealign-fast demo --trained`: train (once) the miniature trio, merge it with MergeAlign's
equal weights, and show the expert's, the aligned model's and the merged model's answers."""

from __future__ import annotations

from pathlib import Path

from mergealign_fast import MergeError, merge_checkpoints

TRAINED_FOLDER = "miniature-v1"
# Weights for the trained demo: MergeAlign's equal interpolation.
TRAINED_WEIGHTS = (0.5, 0.5)


def run(cache_dir: Path, quiet: bool = False) -> bool:
    """Train (once) the miniature base/expert/aligned trio, merge it, and show the expert's,
    the aligned model's and the merged model's answers side by side."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MergeError(f"demo --trained needs torch and transformers ({exc.name} is missing): "
                         "pip install -e '.[showcase]'") from None
    from .evaluate import evaluate, evaluation_sets, generate, load
    from .train import train_trio
    from .world import Clinic

    root = cache_dir / TRAINED_FOLDER
    if not (root / "world.json").exists():
        print(f"training the miniature trio in {root} (about 2 minutes, once) ...", flush=True)
        train_trio(root, "default")
    clinic = Clinic.load(root)
    out = root / "merged"
    result = merge_checkpoints(root / "base", root / "domain", root / "aligned", out, force=True,
                               domain_weight=TRAINED_WEIGHTS[0], align_weight=TRAINED_WEIGHTS[1],
                               progress=not quiet)
    print(f"merged with w_d={TRAINED_WEIGHTS[0]}, w_a={TRAINED_WEIGHTS[1]} in "
          f"{result.seconds:.2f} s -> {out}\n")
    sets = evaluation_sets(clinic)
    items = sets["domain"][:2] + sets["harmful"][:2] + sets["harmful"][-1:] + sets["benign"][:1]
    prompts = [i.prompt for i in items]
    answers = {role: generate(*load(folder), prompts) for role, folder in
               (("expert", root / "domain"), ("aligned", root / "aligned"), ("merged", out))}
    for n, item in enumerate(items):
        print(item.prompt + (f"   (fact: {item.expected})" if item.expected else ""))
        for role in answers:
            print(f"    {role:8s} {answers[role][n].split('.')[0].strip()}")
    print("\nheld-out scores: domain accuracy, refusal of harmful requests, over-refusal")
    for role, folder in (("expert", root / "domain"), ("aligned", root / "aligned"),
                         ("merged", out)):
        print(f"    {role:8s} {evaluate(folder, clinic).row()}")
    print("(the whole λ sweep and what it shows: benches/results/miniature.md)")
    return True
