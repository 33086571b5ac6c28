"""The report as plain data: sections of paragraphs, tables and figures (PNG bytes), which
`html.py` and `markdown.py` render. Nothing here knows HTML or Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Figure:
    name: str  # a file stem, unique in the report: the Markdown version writes <name>.png
    png: bytes
    alt: str  # what the figure shows, in one line


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Text:
    text: str
    preformatted: bool = False  # a config, a log: shown as it is, in a fixed-width font
    summary: str = ""  # a preformatted text with a summary is folded under it (HTML <details>)


@dataclass
class Section:
    id: str  # an anchor: letters, digits and dashes
    title: str
    parts: list[Figure | Table | Text] = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]

    def figures(self) -> list[Figure]:
        return [p for s in self.sections for p in s.parts if isinstance(p, Figure)]


def parse_markdown_table(text: str) -> tuple[str, Table | None]:
    """(the lines outside the table, the first pipe table in `text` or None): reads the
    `table.md` files that the commands write."""
    lines = text.strip().splitlines()
    rows = [ln for ln in lines if ln.lstrip().startswith("|")]
    other = "\n".join(ln for ln in lines if not ln.lstrip().startswith("|")).strip()
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows]
    cells = [c for c in cells if not all(set(x) <= set("-: ") and x for x in c)]  # drop the |---| line
    if len(cells) < 1:
        return other, None
    width = len(cells[0])
    return other, Table(cells[0], [(c + [""] * width)[:width] for c in cells[1:]])
