"""tools/mutate.py stays runnable: every mutation still finds its pattern, exactly once.

(The mutation run itself takes minutes; run `python tools/mutate.py` after changing the
network or its tests.)
"""
import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mutate.py"
_spec = importlib.util.spec_from_file_location("randwire_mutate", TOOL)
mutate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutate  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(mutate)


@pytest.mark.parametrize("mutation", mutate.MUTATIONS, ids=lambda m: m.name)
def test_mutation_pattern_found_once(mutation):
    text = mutate.check_pattern(mutation)
    assert mutation.new != mutation.old and text.replace(mutation.old, mutation.new) != text
    for test in mutation.tests:
        assert (TOOL.parents[1] / test).is_file(), test


def test_stale_pattern_is_reported(tmp_path):
    (tmp_path / "x.py").write_text("a = 1\n")
    stale = mutate.Mutation("m", "w", "x.py", "b = 2", "b = 3", ())
    with pytest.raises(ValueError, match="found 0 times in x.py"):
        mutate.check_pattern(stale, str(tmp_path))
