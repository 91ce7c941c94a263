"""What a merge kept: `eval` (domain tasks through lm-evaluation-harness, safety through a judge)
and `tune` (a λ sweep, every merge and the three parents evaluated, a recommended point).

Nothing here is imported by the merge commands: lm-evaluation-harness and transformers load only
when `eval` or `tune` runs (the `eval` extra installs them).
"""
