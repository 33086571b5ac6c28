"""The report as Markdown: the same sections, tables as pipe tables, figures as PNG files in a
folder beside the .md file (`<name>_files/`), linked by relative paths."""

from __future__ import annotations

from pathlib import Path

from alignkit.files import write_text_atomic
from alignkit.report.document import Document, Figure, Table, Text


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")


def _table(t: Table) -> str:
    lines = [f"*{_cell(t.caption)}*", ""] if t.caption else []
    lines += ["| " + " | ".join(_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def write(doc: Document, path: str | Path) -> list[Path]:
    """Write `path` and its figures; returns the files written (the .md first)."""
    path = Path(path)
    folder = path.parent / f"{path.stem}_files"
    written: list[Path] = []
    if doc.figures():
        folder.mkdir(parents=True, exist_ok=True)
    out = [f"# {doc.title}", "", doc.subtitle, ""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for p in s.parts:
            if isinstance(p, Figure):
                f = folder / f"{p.name}.png"
                f.write_bytes(p.png)
                written.append(f)
                out += [f"![{p.alt}]({folder.name}/{f.name})", ""]
            elif isinstance(p, Table):
                out += [_table(p), ""]
            elif isinstance(p, Text) and p.preformatted:
                out += [f"**{p.summary}**", ""] if p.summary else []
                out += ["```", p.text, "```", ""]
            else:
                out += [p.text, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(out).rstrip() + "\n")
    return [path, *written]
