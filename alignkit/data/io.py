"""Read user data files into rows (dicts), each with the location it came from.

Locations read `file:LINE` (JSONL, 1-based), `file:item N` (JSON list, 0-based),
`file:row N` (Parquet and `datasets` directories, 0-based, so that `ds[N]` finds it),
`owner/name[split]:row N` (a Hugging Face Hub data set, read by `datasets.load_dataset`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from alignkit.files import write_jsonl_atomic

log = logging.getLogger("alignkit")

SUPPORTED = ".jsonl, .json, .parquet, or a directory written by datasets' save_to_disk"
MAX_SHOWN = 50


class DataError(ValueError):
    """Bad input data: every problem found, one `file:line: field: problem` per entry."""

    def __init__(self, problems: list[str], source: str = "data"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in {source}:", *self.problems[:MAX_SHOWN]]
        if n > MAX_SHOWN:
            lines.append(f"... and {n - MAX_SHOWN} more")
        super().__init__("\n".join(lines))


class Location(str):
    """Where a row came from, as the messages print it (`file:3`, `file:item 3`, `file:row 3`),
    keeping its parts: `file` and `line` (an int for JSONL, 'item N' or 'row N' otherwise)."""

    file: str
    line: int | str

    def __new__(cls, file: str, line: int | str) -> Location:
        obj = super().__new__(cls, f"{file}:{line}")
        obj.file, obj.line = file, line
        return obj


class RowProblem(str):
    """One problem of one row, `location: text`, keeping its `loc` (a Location) and `text`."""

    loc: Location
    text: str

    def __new__(cls, loc: Location, text: str) -> RowProblem:
        obj = super().__new__(cls, f"{loc}: {text}")
        obj.loc, obj.text = loc, text
        return obj


SKIPPED_FILE = "skipped.jsonl"


def write_skipped(run_dir: str | os.PathLike, skipped: list[dict]) -> Path | None:
    """Write the rows a loader skipped (`on_invalid: skip`) to `<run_dir>/skipped.jsonl`, one JSON
    object a row: {"file", "line", "reason"}; `reason` holds the texts the DataError would give
    (`field: problem`, several joined by '; '). Written whole or not at all; nothing is written
    when no row was skipped. Returns the file's path, or None."""
    if not skipped:
        return None
    target = write_jsonl_atomic(Path(run_dir) / SKIPPED_FILE, skipped)
    log.warning("%d skipped row(s) listed in %s", len(skipped), target)
    return target


def json_type(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def read_rows(path: str, split: str | None = None) -> list[tuple[str, dict]]:
    """All rows of `path` with their locations; raise DataError listing every unreadable row."""
    problems: list[str] = []
    rows = list(iter_rows(path, problems, split))
    if problems:
        raise DataError(problems, str(path))
    return rows


def iter_rows(path: str, problems: list[str], split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield `(location, row)`; unreadable rows go to `problems` as they are met, in order.

    A source that cannot be read at all raises DataError. `split` picks a split of a
    DatasetDict directory or of a Hub data set (default "train"); other sources have no splits.
    A path that does not exist and reads `owner/name` (no data file extension) is a Hub data set.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        if is_hub_id(path) and os.path.splitext(path)[1].lower() not in _READERS:
            yield from _hub_rows(path, split or "train")
            return
        raise DataError([f"{path}: no such file or directory"], path)
    if os.path.isdir(path):
        yield from _dataset_rows(path, split)
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise DataError([f"{path}: unsupported file type {ext or '(none)'!r} (supported: {SUPPORTED})"], path)
    if split is not None:
        raise DataError([f"{path}: split {split!r} given, but a {ext} file has no splits"], path)
    yield from _READERS[ext](path, problems)


def _jsonl_rows(path: str, problems: list[str]) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc = Location(path, lineno)
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                problems.append(RowProblem(loc, f"invalid UTF-8: {e.reason} at byte {e.start + 1}"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip())
            except json.JSONDecodeError as e:
                problems.append(RowProblem(loc, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting too deep
                problems.append(RowProblem(loc, f"invalid JSON: {_json_limit(e)}"))
                continue
            if not isinstance(row, dict):
                problems.append(RowProblem(loc, f"not a JSON object (got {json_type(row)})"))
                continue
            yield loc, row


def _json_limit(err: Exception) -> str:
    """What a JSON value beyond Python's limits is, in a few words."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return "a number too long to read" if "digits" in str(err) else " ".join(str(err).split())


def _json_rows(path: str, problems: list[str]) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError([f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}"], path) from None
    except UnicodeDecodeError as e:
        raise DataError([f"{path}: invalid UTF-8: {e.reason} at byte {e.start + 1}"], path) from None
    except (ValueError, RecursionError) as e:
        raise DataError([f"{path}: invalid JSON: {_json_limit(e)}"], path) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            found = ", ".join(lists) or "none"
            problem = f"expected a list of objects or an object with one list field (list fields: {found})"
            raise DataError([f"{path}: {problem}"], path)
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError([f"{path}: expected a list of objects, got {json_type(data)}"], path)
    for i, row in enumerate(data):
        loc = Location(path, f"item {i}")
        if isinstance(row, dict):
            yield loc, row
        else:
            problems.append(RowProblem(loc, f"not a JSON object (got {json_type(row)})"))


def _parquet_rows(path: str, problems: list[str]) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError([f"{path}: cannot read Parquet: {e}"], path) from None
    for i, row in enumerate(table.to_pylist()):
        yield Location(path, f"row {i}"), row


def _dataset_rows(path: str, split: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(
            [f"{path}: a directory, but not one written by datasets' save_to_disk (supported: {SUPPORTED})"],
            path,
        ) from None
    prefix = path
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError([f"{path}: no split {name!r} (splits: {', '.join(ds)})"], path)
        ds, prefix = ds[name], f"{path}[{name}]"
    elif split is not None:
        raise DataError([f"{path}: split {split!r} given, but this dataset has no splits"], path)
    for i, row in enumerate(ds):
        yield Location(prefix, f"row {i}"), row


def is_hub_id(spec: str) -> bool:
    """`owner/name` as the Hugging Face Hub spells a repository: what transformers and datasets
    look up on the Hub when no local path has that name."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if spec.count("/") != 1 or spec.startswith((".", "~")):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _hub_rows(repo_id: str, split: str) -> Iterator[tuple[str, dict]]:
    """Rows of split `split` of Hub data set `repo_id`: from the `datasets` cache when it holds
    them (always so with HF_HUB_OFFLINE=1 or without a network), else downloaded into it."""
    import datasets

    where = f"{repo_id}: not a local path, and the Hugging Face Hub data set '{repo_id}'"
    cached = f"is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE})"
    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except ConnectionError as err:
        if datasets.config.HF_HUB_OFFLINE:
            problem = (f"{where} {cached} and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE to "
                       "download it (it is cached for later offline runs), or give a local file")
        else:
            problem = (f"{where} {cached} and the Hub cannot be reached ({' '.join(str(err).split())}): run once with "
                       "a network (it is cached then), or give a local file")
        raise DataError([problem], repo_id) from None
    except FileNotFoundError as err:  # datasets' DatasetNotFoundError: no such (public) data set
        problem = f"{where} does not exist (or is private or gated: log in with `hf auth login`): {' '.join(str(err).split())}"
        raise DataError([problem], repo_id) from None
    except ValueError as err:  # an unknown split, a data set with several configurations
        raise DataError([f"{repo_id}: {' '.join(str(err).split())}"], repo_id) from None
    prefix = f"{repo_id}[{split}]"
    for i, row in enumerate(ds):
        yield Location(prefix, f"row {i}"), row


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
