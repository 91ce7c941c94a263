"""mergekit 0.1.5 running a config with the engine's kernels registered as its merge methods.

    python benches/mergekit_backend_run.py CONFIG.yml OUT

The config's merge_method gets the mergealign_ prefix (mergealign_fast.mergekit.backend): mergekit
plans, loads and writes as usual, our kernel does each tensor's arithmetic.
"""

import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

from mergealign_fast.mergekit import backend as mergekit_backend


def main(config_path: str, out: str) -> None:
    mergekit_backend.register()
    raw = yaml.safe_load(open(config_path).read())
    raw["merge_method"] = mergekit_backend.PREFIX + raw["merge_method"]
    run_merge(MergeConfiguration.model_validate(raw), out,
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


if __name__ == "__main__":
    main(*sys.argv[1:3])
