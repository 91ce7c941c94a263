"""The method registry is the one home of what a method is: every consumer reads it."""

import ast
from pathlib import Path

import pytest

from mergealign_fast import methods
from mergealign_fast.methods.core.parameters import PARAMETERS
from mergealign_fast.methods.core.spec import FUSED, WINDOWS
from mergealign_fast.tools.method_table import table

PACKAGE = Path(__file__).resolve().parent.parent / "mergealign_fast"


def test_docs_methods_md_is_the_registry_s_table():
    docs = PACKAGE.parent / "docs" / "methods.md"
    assert docs.read_text(encoding="utf-8") == table(), \
        "regenerate: python -m mergealign_fast.tools.method_table > docs/methods.md"


@pytest.mark.parametrize("spec", methods.specs(), ids=lambda s: s.name)
def test_every_spec_says_how_it_is_merged(spec):
    assert set(spec.parameters) <= set(PARAMETERS), spec.name
    if spec.route == FUSED:
        assert spec.recipe is not None and spec.oracle is not None
        assert spec.set_recipe is not None or not spec.contract.on_sets
    else:
        assert spec.route == WINDOWS and spec.merge_windows and spec.window_elements
    assert methods.get(spec.name) is spec


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown merge method 'tiez': choose one of .*ties"):
        methods.get("tiez")


def _method_literal_comparisons(path: Path):
    """Comparisons of a value with a registered method's name (`name == "ties"`, `in
    ("slerp", ...)`) in one module."""
    names = set(methods.names())
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) \
                else [operand]
            for value in values:
                if isinstance(value, ast.Constant) and value.value in names:
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {value.value!r}"


def test_no_method_name_is_tested_outside_the_method_s_own_module():
    """Outside methods/, code asks a method's spec, never its name; inside, only a method's
    own window module (methods/windows/<it>.py) may."""
    found = [hit for path in PACKAGE.rglob("*.py") if "methods" not in path.parts
             for hit in _method_literal_comparisons(path)]
    assert found == []
