"""The library owns its words: levels, gates and scores are defined in hf_flop, and the command line's copies
(hf_flop_cli.choices, literal so that ``hf-flop --help`` never imports torch) are equal to them."""

import ast
from pathlib import Path

import hf_flop_cli.choices as choices
from hf_flop.config import GATES, LEVELS
from hf_flop.gates import GATE_TYPES
from hf_flop.groups import GROUP_LEVELS
from hf_flop.scores import SCORE_TYPES, SCORES


def test_the_command_line_copies_equal_the_library_vocabularies():
    assert choices.LEVELS == LEVELS
    assert choices.GATES == GATES
    assert choices.SCORES == SCORES
    assert choices.COMPACT_RECOVERY_LEVELS == GROUP_LEVELS


def test_the_library_vocabularies_are_what_it_builds():
    assert tuple(GATE_TYPES) == GATES  # every gate FlopConfig accepts is one gates.py builds, and no other
    assert SCORES == tuple(SCORE_TYPES)[: len(SCORES)]  # the built-in scores, in registration order


def test_the_modules_that_define_them_never_import_the_command_line():
    import hf_flop.config
    import hf_flop.gates
    import hf_flop.scores

    for module in (hf_flop.config, hf_flop.gates, hf_flop.scores):
        path = Path(module.__file__)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "hf_flop_cli" for n in names), f"{path.name} imports {names}"
