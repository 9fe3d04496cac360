"""Render the report document as markdown (GitHub flavour).

Data text is escaped: emphasis and code punctuation gets a backslash, '<' before a tag name and
'&' before an entity name become entities (so a renderer that passes raw HTML through cannot run
a script from a dataset), '](' cannot form a link, and inside table cells '|' is escaped and
newlines become <br> so rows keep their column count.
"""

from __future__ import annotations

import re

from .document import Bullets, Code, Document, Figure, Findings, Paragraph, TableBlock
from .tables import Table

_MD_SPECIAL = re.compile(r"([\\`*_|])")


def _escape(line: str) -> str:
    # Only what could open an HTML tag or entity is turned into an entity ('<' before a tag
    # name, '&' before an entity name), so raw markdown stays readable ('p < 0.001').
    line = re.sub(r"&(?=#?\w+;)", "&amp;", line)
    line = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", line)
    line = _MD_SPECIAL.sub(r"\\\1", line)
    return line.replace("](", "]\\(")


def inline(text: object) -> str:
    """Escape text for one markdown line (newlines become spaces)."""
    return _escape(" ".join(str(text).splitlines()))


def cell(text: object) -> str:
    """Escape text for a table cell: newlines become <br>, pipes are escaped."""
    return "<br>".join(_escape(line) for line in (str(text).splitlines() or [""]))


def table(t: Table) -> str:
    out = ["| " + " | ".join(cell(h) for h in t.headers) + " |",
           "|" + "|".join(" --- " for _ in t.headers) + "|"]
    for row in t.rows:
        cells = [f"**{cell(c.text)}**" if c.best and c.text.strip() else cell(c.text) for c in row]
        out.append("| " + " | ".join(cells) + " |")
    text = "\n".join(out)
    if t.caption:
        text += f"\n\n*{inline(t.caption)}*"
    return text


def code_block(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}json\n{text}\n{fence}"


def render(doc: Document) -> str:
    parts = [f"# {inline(doc.title)}", ""]
    parts.append(" · ".join(f"[{s.title}](#{s.anchor})" for s in doc.sections))
    for section in doc.sections:
        parts += ["", f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Findings):
                parts.append("\n".join(
                    f"- **Warning:** {inline(f.text)}" if f.warning else f"- {inline(f.text)}"
                    for f in block.items))
            elif isinstance(block, Paragraph):
                parts.append(inline(block.text))
            elif isinstance(block, TableBlock):
                if block.title:
                    parts += [f"#### {inline(block.title)}", ""]
                parts.append(table(block.table))
            elif isinstance(block, Figure):
                parts.append(f"![{inline(block.name)}](figures/{block.name}.png)\n\n"
                             f"*{inline(block.caption)}*")
            elif isinstance(block, Code):
                parts.append(code_block(block.text))
            elif isinstance(block, Bullets):
                parts.append("\n".join(f"- {inline(item)}" for item in block.items))
            else:
                raise TypeError(f"unknown block type: {type(block).__name__}")
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"
