"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no
script and no link to anything outside the file."""

from __future__ import annotations

import base64
from html import escape

from alignkit.report.document import Document, Figure, Table, Text

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5em 2em 4em; color: #1d2329; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d8dee4; padding-bottom: 0.2em; }
.subtitle { color: #57606a; margin-top: 0; }
nav a { margin-right: 1em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; font-size: 0.92em; }
caption { text-align: left; color: #57606a; padding-bottom: 0.3em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top;
         white-space: pre-wrap; word-break: break-word; max-width: 28em; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.4em 0; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(t: Table) -> str:
    caption = f"<caption>{escape(t.caption)}</caption>" if t.caption else ""
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _part(p) -> str:
    if isinstance(p, Figure):
        alt = escape(p.alt)
        return f'<figure id="fig-{escape(p.name)}"><img src="{data_uri(p.png)}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
    if isinstance(p, Table):
        return _table(p)
    if isinstance(p, Text) and p.preformatted:
        pre = f"<pre>{escape(p.text)}</pre>"
        return f"<details><summary>{escape(p.summary)}</summary>{pre}</details>" if p.summary else pre
    return f"<p>{escape(p.text)}</p>"


def render(doc: Document) -> str:
    nav = " ".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in doc.sections)
    body = "\n".join(f'<section id="{s.id}">\n<h2>{escape(s.title)}</h2>\n' + "\n".join(_part(p) for p in s.parts) + "\n</section>"
                     for s in doc.sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{escape(doc.title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{escape(doc.title)}</h1>\n<p class=\"subtitle\">{escape(doc.subtitle)}</p>\n"
            f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")
