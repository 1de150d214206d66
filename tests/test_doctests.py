"""Every docstring example in src/cliptune runs: one test per module that has examples.

Examples run in a fresh temporary folder (the current directory, also given as ``tmp_path``), so
relative paths such as ``Path("data/fashion")`` write nowhere else. Examples that speak of a loaded
``backbone`` get a tiny random CLIP (tests/tiny_models.py): loading the packaged 26M-parameter one for
each would add seconds per module; the line that loads it in the docstring is marked ``+SKIP``.
A line marked ``+SKIP`` is kept for one reason only: it needs a real file or run folder to say anything.
"""

from __future__ import annotations

import copy
import doctest
import importlib
from pathlib import Path
from typing import Any

import pytest

import cliptune

from .tiny_models import make_tiny_clip

_SRC = Path(cliptune.__file__).parent


def _modules_with_examples() -> list[str]:
    """Module names whose source holds a ``>>>`` example (found without importing them)."""
    names = []
    for path in sorted(_SRC.rglob("*.py")):
        if path.name == "__main__.py" or ">>>" not in path.read_text(encoding="utf-8"):
            continue
        parts = path.relative_to(_SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cliptune.models.factory import load_backbone

    return load_backbone(make_tiny_clip(tmp_path_factory.mktemp("clip")))


def test_modules_with_examples_are_found() -> None:
    names = _modules_with_examples()
    assert "cliptune.ranking.bootstrap" in names and "cliptune.data.synthetic" in names
    assert len(names) > 40


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    examples = [t for t in tests if t.examples]
    assert examples, f"{name}: '>>>' in the source but no docstring example found"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in examples:
        if any("backbone." in ex.source or "(backbone" in ex.source for ex in test.examples):
            # a copy: an example may change it in place (apply_lora)
            test.globs["backbone"] = copy.deepcopy(request.getfixturevalue("tiny_backbone"))
        test.globs["tmp_path"] = tmp_path
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
