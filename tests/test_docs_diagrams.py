"""The state diagrams in docs/ are the transition tables, drawn: a table change
without its diagram (or a hand-edited diagram) fails here.

Run as a script to regenerate every diagram in place::

    .venv/bin/python tests/test_docs_diagrams.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trunkline.common.fsm import blocks, mermaid, replace_blocks
from trunkline.core.autoscale import REPLICA_TRANSITIONS
from trunkline.core.rollout import ROLLOUT_TRANSITIONS
from trunkline.core.states import TRANSITIONS
from trunkline.sip.calls import CALL_TABLE
from trunkline.sip.transaction import TABLES, TxKind

DOCS = Path(__file__).resolve().parents[1] / "docs"

# Which diagram blocks each document must hold, and the table each one draws.
DIAGRAMS: dict[str, dict[str, str]] = {
    "semantics.md": {"job": mermaid(TRANSITIONS)},
    "autoscale.md": {"replica": mermaid(REPLICA_TRANSITIONS)},
    "rollout.md": {"rollout": mermaid(ROLLOUT_TRANSITIONS)},
    "sip.md": {
        "sip-call": mermaid(CALL_TABLE),
        "sip-ist": mermaid(TABLES[TxKind.IST]),
        "sip-nist": mermaid(TABLES[TxKind.NIST]),
        "sip-ict": mermaid(TABLES[TxKind.ICT]),
        "sip-nict": mermaid(TABLES[TxKind.NICT]),
    },
}
REGENERATE = "regenerate with: .venv/bin/python tests/test_docs_diagrams.py"


@pytest.mark.parametrize("doc", sorted(DIAGRAMS))
def test_doc_holds_each_of_its_diagrams(doc: str) -> None:
    """Every table the document is meant to draw has its marked block there, once."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    assert sorted(blocks(text)) == sorted(DIAGRAMS[doc]), REGENERATE
    for name in DIAGRAMS[doc]:
        assert text.count(f"<!-- fsm:{name} -->") == 1, name


@pytest.mark.parametrize("doc", sorted(DIAGRAMS))
def test_doc_diagrams_match_the_tables(doc: str) -> None:
    """Each marked diagram equals its table rendered by trunkline.common.fsm.mermaid."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    assert replace_blocks(text, DIAGRAMS[doc]) == text, REGENERATE


def test_no_other_doc_has_unknown_diagram_blocks() -> None:
    """A marked block in any other document would never be checked: there are none."""
    for path in sorted(DOCS.glob("*.md")):
        if path.name not in DIAGRAMS:
            assert blocks(path.read_text(encoding="utf-8")) == {}, path.name


def main() -> int:
    """Rewrite the diagram blocks of every document; print the ones that changed."""
    for doc, diagrams in DIAGRAMS.items():
        path = DOCS / doc
        text = path.read_text(encoding="utf-8")
        new = replace_blocks(text, diagrams)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
