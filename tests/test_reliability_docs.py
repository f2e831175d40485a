"""The failure-mode table of the docs is the generated one, and every row names a test that exists."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import failure_modes

REPO = Path(__file__).resolve().parents[1]


def test_every_row_names_an_existing_test():
    for _, situation, _, test in failure_modes.rows():
        file, _, name = test.partition("::")
        func, _, param = name.partition("[")
        module = importlib.import_module(Path(file).stem)
        assert callable(getattr(module, func, None)), f"{situation}: {test} does not exist"
        if param:
            cases = [getattr(module, n) for n in ("REFUSALS", "CONVERSIONS", "DATASET_REFUSALS")]
            assert any(c.id == param.rstrip("]") for lst in cases for c in lst), test


def test_docs_hold_the_current_table():
    checked = 0
    for doc in (REPO / "README.md",):
        if doc.is_file() and failure_modes.BEGIN in doc.read_text(encoding="utf-8"):
            text = doc.read_text(encoding="utf-8")
            assert failure_modes.update(text) == text, \
                f"{doc}: run python tests/failure_modes.py --update {doc.relative_to(REPO)}"
            checked += 1
    assert checked >= 1


def test_generated_blocks_are_replaced_whole_and_missing_markers_named():
    from regharm_ext.markdown_blocks import cell, replace_block
    text = "intro\n<!-- x:begin -->\nold\nrows\n<!-- x:end -->\nafter\n"
    new = replace_block(text, "<!-- x:begin -->", "<!-- x:end -->", "| a | b |")
    assert new == "intro\n<!-- x:begin -->\n| a | b |\n<!-- x:end -->\nafter\n"
    assert replace_block(new, "<!-- x:begin -->", "<!-- x:end -->", "| a | b |") == new
    with pytest.raises(ValueError, match="no <!-- y:begin --> ... <!-- y:end --> block"):
        replace_block(text, "<!-- y:begin -->", "<!-- y:end -->", "t")
    appended = replace_block("intro\n", "<!-- y:begin -->", "<!-- y:end -->", "t", append=True)
    assert appended == "intro\n\n<!-- y:begin -->\nt\n<!-- y:end -->\n"
    assert cell(" a|b\nc ") == "a\\|b c"
