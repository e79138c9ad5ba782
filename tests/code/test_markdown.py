"""Paths and names put in Prefect's markdown are shown as written, never as markup (issue 23, item 11).

Checked with a CommonMark renderer (markdown-it, tables on, raw HTML passed through as the Prefect UI's
renderer does before its sanitizer): an element, a closed code span or a split table cell would show."""

from __future__ import annotations

import html

import pytest
from markdown_it import MarkdownIt

from pneumo import markdown as md
from pneumo.summary import summary_markdown

RENDER = MarkdownIt("commonmark", {"html": True}).enable("table")
HOSTILE = [
    "/work/a`<img src=x onerror=alert(1)>`b",
    "/work/``double`` and `single`",
    "/work/pipe|cell<b>bold</b>",
    "/work/*star* _under_ [link](http://x) ![p](http://x/p.png) &lt;img&gt; ~~gone~~ # not a heading",
    "/work/new\nline\u2028and\x1b]8;;http://x\x07",
    "`leading and trailing`",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_path_in_a_code_span_is_one_code_element_holding_the_path(value):
    rendered = RENDER.render(f"- card: {md.code(value)}\n")
    assert "<img" not in rendered and "<b>" not in rendered and "<a " not in rendered
    assert rendered.count("<code>") == 1
    shown = rendered.split("<code>")[1].split("</code>")[0]
    expected = value.replace("\n", "\\n").replace("\u2028", "\\u2028").replace("\x1b", "\\x1b").replace("\x07", "\\x07")
    assert html.unescape(shown) == expected


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_name_as_text_is_the_same_text_in_a_heading_and_in_a_table_cell(value):
    expected = value.replace("\n", "\\n").replace("\u2028", "\\u2028").replace("\x1b", "\\x1b").replace("\x07", "\\x07")
    heading = RENDER.render(f"# scored {md.text(value)}\n")
    assert heading.startswith("<h1>") and html.unescape(heading[4:-6]) == f"scored {expected}"
    table = RENDER.render(f"| a | b |\n|---|---|\n| {md.text(value)} | after |\n")
    cells = table.split("<tbody>")[1].split("<td>")[1:]
    assert len(cells) == 2 and html.unescape(cells[0].split("</td>")[0]) == expected
    assert "<img" not in table and "<b>" not in table and "<code>" not in table and "<em>" not in table


def _summary(workdir: str, registered: bool) -> dict:
    metrics = {split: {"n": 300, "accuracy": 0.9, "precision": 0.9, "recall": 0.9, "specificity": 0.9, "f1": 0.9,
                       "roc_auc": 0.95} for split in ("val", "test")}
    return {
        "model": "tinynet v0003", "version": "v0003", "registered": registered,
        "champion": f"tinynet broken: {workdir}/registry/tinynet/aliases/champion.json names v9999", "metrics": metrics,
        "card": f"{workdir}/registry/tinynet/v0003/card.json", "report": f"{workdir}/registry/tinynet/v0003/report.html",
        "registry": f"{workdir}/registry", "shards_index": f"{workdir}/shards/abc/index.json", "images": 5216,
        "quarantined": 1, "quarantine_report": f"{workdir}/reports/quarantine-abc.json",
    }


def test_the_run_summary_shows_a_hostile_workdir_as_written():
    workdir = HOSTILE[0]
    rendered = RENDER.render(summary_markdown(_summary(workdir, registered=True)))
    assert "<img" not in rendered
    codes = [html.unescape(part.split("</code>")[0]) for part in rendered.split("<code>")[1:]]
    assert f"{workdir}/registry/tinynet/v0003/card.json" in codes and f"{workdir}/reports/quarantine-abc.json" in codes
    assert f"Champion: <strong>tinynet broken: {html.escape(workdir, quote=False)}/registry" in rendered


def test_the_run_summary_heading_of_a_cache_hit_is_whole():
    markdown = summary_markdown(_summary("/work", registered=False))
    heading = RENDER.render(markdown.splitlines()[0])
    assert heading == ("<h1>nothing new registered (cache hit; tinynet v0003 unchanged; --retrain to train anyway)</h1>\n")
