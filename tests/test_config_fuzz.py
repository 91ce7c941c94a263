"""Configs mutated as a hostile (or hurried) user would write them: every published shape of
tests/published_configs.py with a value replaced by one of the wrong kind, a key dropped, an
unknown key or method added.  Each is planned (read, checked, its models opened, no tensor
merged): it plans, or it is a MergeError whose lines each name the config or a model — never
another exception (a traceback)."""

import random
import traceback

import pytest
import yaml

import published_configs as published
from mergealign_fast.dtypes import DType
from mergealign_fast.errors import MergeError
from mergealign_fast.mergekit.run import plan_config
from mergealign_fast import methods

HOSTILE = [None, [], {}, "", "x", "true", "1e-3", 0, 1, -1, 2.5, 1e308, float("nan"), True,
           [0.1, "q"], [{"filter": "mlp"}], [{"value": {"deep": [1, {"x": None}]}}],
           {"filter": "mlp", "value": 0.5}, {"value": [0.3, 0.6]}, [[1, 2]], "./nowhere",
           "hub/missing-repo"]
EXTRA_KEYS = ["name", "surprise", "tokenizer_sorce", "modules", "pad_to_multiple_of"]


def _paths(value, path=()):
    """Every (path, value) inside a parsed config."""
    yield path, value
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, path + (key,))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, path + (index,))


def _set(document, path, value):
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def _mutated(document: dict, rng: random.Random) -> dict:
    import copy

    document = copy.deepcopy(document)
    kind = rng.randrange(4)
    paths = [p for p, _ in _paths(document) if p]
    path = rng.choice(paths)
    if kind == 0:
        _set(document, path, copy.deepcopy(rng.choice(HOSTILE)))
    elif kind == 1:
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    elif kind == 2:
        document[rng.choice(EXTRA_KEYS)] = copy.deepcopy(rng.choice(HOSTILE))
    else:
        document["merge_method"] = rng.choice(list(methods.names()) + ["passthrough", "nope"])
    return document


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio

    return ensure_synthetic_trio(tmp_path_factory.mktemp("fuzz-set"), LLAMA_TINY, seed=3,
                                 roles=published.SET, dtype=DType.BF16)


def _fuzz(models, tmp_path, count: int, seed: int) -> dict:
    rng = random.Random(seed)
    sources = [yaml.safe_load(published.write_config(tmp_path, models, name, "bfloat16")
                              .read_text()) for name in published.CONFIGS]
    outcomes = {"planned": 0, "refused": 0}
    for case in range(count):
        document = _mutated(rng.choice(sources), rng)
        config = tmp_path / "mutated.yml"
        config.write_text(yaml.safe_dump(document))
        try:
            plan_config(config, tmp_path / "out", tell=lambda kind, text: None)
            outcomes["planned"] += 1
        except MergeError as exc:
            lines = str(exc).splitlines()
            assert lines and all(line.strip() for line in lines), (case, document)
            outcomes["refused"] += 1
        except Exception as exc:  # a traceback: the case fails, naming the config
            where = traceback.format_exc().strip().splitlines()[-3:]
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n{yaml.safe_dump(document)}"
                        + "\n".join(where))
    return outcomes


def test_mutated_published_configs_plan_or_are_clear_errors(models, tmp_path):
    outcomes = _fuzz(models, tmp_path, 150, seed=1)
    assert outcomes["planned"] and outcomes["refused"]  # the mutations reach both outcomes


@pytest.mark.slow
def test_many_more_mutations(models, tmp_path):
    outcomes = _fuzz(models, tmp_path, 5000, seed=2)
    assert outcomes["planned"] and outcomes["refused"]
