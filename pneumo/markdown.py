"""Text from outside the code (paths, file names, reasons, sources) made safe to put in Prefect's markdown artifacts.

The Prefect UI renders markdown artifacts, the cells of table artifacts and artifact descriptions as
markdown. A workdir named ``a`<img src=x>`` closed the code span the run summary put it in, and the
UI drew the element; a ``|`` in a file name would end a table cell, a newline the table. Prefect's
sanitizer strips handlers, so no script ran, but the page showed something other than the path.
"""

from __future__ import annotations

import re
import unicodedata

# What starts inline markup (emphasis, code, links, HTML, entities, tables, strikethrough, headings): written as a
# literal with CommonMark's backslash escape, which any ASCII punctuation allows.
_MARKUP = re.compile(r"([\\`*_\[\]<>|~&#!])")
_LINE_SEPARATORS = {"\u2028", "\u2029", "\x85"}


def _visible(text: str) -> str:
    """Control characters (newlines, ESC, ...) and Unicode line separators written as Python escapes: one line."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" or ch in _LINE_SEPARATORS else ch
        for ch in str(text)
    )


def text(value: object) -> str:
    """``value`` as literal text in markdown (a heading, a table cell, a description): no markup it holds takes effect."""
    return _MARKUP.sub(r"\\\1", _visible(str(value)))


def code(value: object) -> str:
    """``value`` as an inline code span its own backticks cannot close (CommonMark: the fence is a backtick run
    longer than any inside). Not for table cells, where a ``|`` still splits the cell: use ``text`` there."""
    shown = _visible(str(value))
    longest = max((len(run) for run in re.findall(r"`+", shown)), default=0)
    fence = "`" * (longest + 1)
    # One space each side is stripped again by the renderer; it keeps a leading or trailing backtick off the fence.
    padded = longest or shown.startswith(" ") and shown.endswith(" ")
    return f"{fence} {shown} {fence}" if padded else f"{fence}{shown}{fence}"
