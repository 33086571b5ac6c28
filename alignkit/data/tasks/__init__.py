"""Built-in task families: arithmetic problems and the instruction mixture's tasks."""

from __future__ import annotations

import difflib

from alignkit.data.tasks.instructions import FAMILIES, TaskFamily, TaskItem

TASKS: dict[str, TaskFamily] = {family.name: family for family in FAMILIES}

__all__ = ["TASKS", "TaskFamily", "TaskItem", "get_task"]


def get_task(name: str) -> TaskFamily:
    """The registered family called `name`; a ValueError names the nearest valid one."""
    if name in TASKS:
        return TASKS[name]
    nearest = difflib.get_close_matches(name, TASKS, n=1, cutoff=0.0)
    hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
    raise ValueError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(TASKS)}")
