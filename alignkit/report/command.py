"""`alignkit report RUN_DIR [RUN_DIR ...] -o report.html [--markdown report.md]`."""

from __future__ import annotations

import argparse
import os
import sys

from alignkit.files import write_text_atomic
from alignkit.report import html, markdown
from alignkit.report.collect import ReportError, read_runs
from alignkit.report.sections import build

DESCRIPTION = """One self-contained HTML page (figures inlined, no network) of one run or a comparison of runs,
built from what the run directories hold: metrics.jsonl, result.json, table.md, the train stages'
sub-directories, best-of-n's sweep.jsonl, a reward model's report.json, sample files. Sections:
runs, pipeline (alignkit pipeline's stages), training curves, reward vs KL, best of N, reward
model, iterations, sample replies; each appears when some run has its data."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit report", description=DESCRIPTION)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (train.output_dir or output_dir of a command)")
    p.add_argument("-o", "--output", default="report.html", help="the HTML page to write (default: report.html)")
    p.add_argument("--markdown", metavar="REPORT_MD", help="also write a Markdown version, its figures in REPORT_MD's <name>_files/")
    p.add_argument("--title", help="the page's title (default: the runs' names)")
    return p


def _readable(path) -> None:
    """Files written atomically start private (0600); a report is for reading: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed)
        return int(stop.code or 0)
    try:
        doc = build(read_runs(args.runs), args.title)
        write_text_atomic(args.output, html.render(doc))
        written = [args.output]
        if args.markdown:
            written += [str(markdown.write(doc, args.markdown)[0])]
        for path in written:
            _readable(path)
    except (ReportError, OSError) as err:
        print(f"alignkit report: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(written))
    return 0
