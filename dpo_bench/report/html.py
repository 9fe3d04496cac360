"""Render the report document as one self-contained HTML file.

Figures are embedded as base64 data: URIs, CSS and the table-sorting script are inline, and
nothing is fetched from the network, so the file can be mailed or archived on its own. Every
string from data or config goes through ``esc`` (html.escape with quote=True).
"""

from __future__ import annotations

import base64
import html

from .document import Bullets, Code, Document, Figure, Findings, Paragraph, TableBlock
from .tables import Table

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
  max-width: 1200px; padding: 1rem 1.5rem 3rem; color: #1b1b1b; line-height: 1.45;
  overflow-wrap: anywhere; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
h4 { margin: 1.2rem 0 .4rem; }
nav a { margin-right: .8rem; white-space: nowrap; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; max-width: 100%; }
caption { caption-side: bottom; text-align: left; font-size: .8rem; color: #555; padding-top: .3rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .5rem; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; word-break: break-word; }
th { background: #f2f2f2; cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: 700; background: #fff3d6; }
li.warning { color: #9a3a00; }
pre { background: #f6f6f6; padding: .75rem; white-space: pre-wrap; overflow-wrap: anywhere;
  font-size: .8rem; max-height: 40rem; overflow: auto; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: .85rem; color: #444; }
"""

# Sorts a table by the clicked header: numeric on data-sort when present, text otherwise.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var i = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    function key(row) {
      var c = row.cells[i], v = c.getAttribute("data-sort");
      if (v === null) { return c.textContent; }
      var f = parseFloat(v);
      return isNaN(f) ? -Infinity : f;
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      var r = (typeof x === "number") ? (x === y ? 0 : (x < y ? -1 : 1))
                                      : String(x).localeCompare(String(y));
      return asc ? r : -r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def table(t: Table) -> str:
    numeric = [any(row[j].sort is not None for row in t.rows) for j in range(len(t.headers))]
    out = ['<table class="sortable">']
    if t.caption:
        out.append(f"<caption>{esc(t.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f'<th scope="col">{esc(h)}</th>' for h in t.headers)
               + "</tr></thead>")
    out.append("<tbody>")
    for row in t.rows:
        cells = []
        for j, c in enumerate(row):
            classes = (["num"] if numeric[j] else []) + (["best"] if c.best else [])
            attrs = f' class="{" ".join(classes)}"' if classes else ""
            if j < len(numeric) and numeric[j]:
                attrs += f' data-sort="{"" if c.sort is None else repr(float(c.sort))}"'
            cells.append(f"<td{attrs}>{esc(c.text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def figure(block: Figure, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="figure-{esc(block.name)}"><img alt="{esc(block.caption)}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(block.caption)}</figcaption></figure>")


def render(doc: Document, figures: dict[str, bytes]) -> str:
    body = [f"<h1>{esc(doc.title)}</h1>", "<nav>" + "".join(
        f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in doc.sections) + "</nav>"]
    for section in doc.sections:
        body.append(f'<section id="{esc(section.anchor)}"><h2>{esc(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Findings):
                body.append("<ul class=\"headline\">" + "".join(
                    f'<li class="warning"><strong>Warning:</strong> {esc(f.text)}</li>'
                    if f.warning else f"<li>{esc(f.text)}</li>" for f in block.items) + "</ul>")
            elif isinstance(block, Paragraph):
                body.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, TableBlock):
                if block.title:
                    body.append(f"<h4>{esc(block.title)}</h4>")
                body.append(table(block.table))
            elif isinstance(block, Figure):
                body.append(figure(block, figures[block.name]))
            elif isinstance(block, Code):
                body.append(f"<pre><code>{esc(block.text)}</code></pre>")
            elif isinstance(block, Bullets):
                body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + "</ul>")
            else:
                raise TypeError(f"unknown block type: {type(block).__name__}")
        body.append("</section>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(doc.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
