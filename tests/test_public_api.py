"""torch_ext's public names (``torch_ext.__all__``): each exists and is documented with a short
example that runs. Functions and classes carry their own docstring with an ``Example::`` block;
the constants (tuples, a dict, ``__version__``), which cannot, are documented in the package's
docstring, whose examples run too. Every example runs through doctest with ``torch`` and
``torch_ext`` in its globals."""
from __future__ import annotations

import doctest
import inspect
import io

import pytest
import torch

import torch_ext

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
DOCUMENTED_OBJECTS = [n for n in torch_ext.__all__ if inspect.isclass(getattr(torch_ext, n, None))
                      or inspect.isfunction(getattr(torch_ext, n, None))]
CONSTANTS = [n for n in torch_ext.__all__ if n not in DOCUMENTED_OBJECTS]


def _run_examples(obj, name: str) -> int:
    """Runs the >>> examples of obj's own docstring; returns how many there were."""
    finder = doctest.DocTestFinder(recurse=False, exclude_empty=True)
    tests = finder.find(obj, name, module=False, globs={"torch": torch, "torch_ext": torch_ext})
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    torch.manual_seed(0)
    failed = attempted = 0
    for test in tests:
        result = runner.run(test, out=out.write)
        failed, attempted = failed + result.failed, attempted + result.attempted
    assert failed == 0, f"{name}: {failed} of its examples failed:\n{out.getvalue()}"
    return attempted


def test_all_names_exist_once():
    assert len(set(torch_ext.__all__)) == len(torch_ext.__all__), "a name is listed twice in __all__"
    missing = [n for n in torch_ext.__all__ if not hasattr(torch_ext, n)]
    assert not missing, f"in torch_ext.__all__ but not defined: {missing}"


def test_public_functions_and_classes_are_in_all():
    """A function or class of torch_ext reachable as torch_ext.<public name> is listed in __all__."""
    unlisted = [
        name for name, obj in vars(torch_ext).items()
        if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "").startswith("torch_ext") and name not in torch_ext.__all__
    ]
    assert not unlisted, f"public but not in torch_ext.__all__: {unlisted}"


@pytest.mark.parametrize("name", DOCUMENTED_OBJECTS)
def test_docstring_has_an_example_that_runs(name):
    obj = getattr(torch_ext, name)
    doc = inspect.getdoc(obj) if obj.__doc__ else None  # a class's own, not inherited
    assert doc, f"torch_ext.{name} has no docstring"
    assert "Example::" in doc, f"torch_ext.{name}'s docstring has no Example:: block"
    assert _run_examples(obj, f"torch_ext.{name}") >= 1, f"torch_ext.{name}'s example has no >>> line"


def test_constants_are_documented_in_the_package_docstring():
    doc = torch_ext.__doc__
    examples = doctest.DocTestParser().get_examples(doc)
    for name in CONSTANTS:
        assert f"``{name}``" in doc, f"torch_ext.{name} is not described in torch_ext's docstring"
        assert any(name in e.source for e in examples), f"torch_ext.{name} has no example in torch_ext's docstring"
    assert _run_examples(torch_ext, "torch_ext") >= len(CONSTANTS)
