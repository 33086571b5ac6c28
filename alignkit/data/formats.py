"""Turn rows of user data into typed records, detecting each row's format.

Every loader checks all rows and raises one DataError that lists each problem as
`location: field: problem`. Parsers take `bad(field, problem)` to report problems and
return None for a value they could not read.

With `on_invalid="skip"` a loader drops the rows it cannot use instead (those that are not
readable JSON objects, and those with a problem), warns once with the count, and appends one
{"file", "line", "reason"} dict per dropped row to the caller's `skipped` list (`io.write_skipped`
writes it to a run directory). A source that cannot be read at all, or in which no row is
usable, is still a DataError.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable

from .io import DataError, RowProblem, iter_rows, json_type
from .records import (
    RATINGS,
    ROLES,
    SAFETY_LABELS,
    Message,
    PreferencePair,
    Problem,
    RankedResponses,
    SFTExample,
    normalise_rating,
)

log = logging.getLogger("alignkit")

Bad = Callable[[str, str], None]
Messages = tuple[Message, ...]

SFT_FORMATS = "messages | prompt+completion | text (Anthropic HH) | instruction+output (Alpaca)"
PREFERENCE_FORMATS = (
    "prompt+chosen+rejected | chosen+rejected conversations | chosen+rejected Anthropic HH text"
)
RANKED_FORMATS = "prompt+responses+scores (or completions, rewards)"
PROBLEM_FORMATS = "question+answer (GSM8K '####') | problem+answer"

HH_HINT = "expected Anthropic HH text ('\\n\\nHuman: ...\\n\\nAssistant: ...')"
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"
ON_INVALID = ("error", "skip")
# Every top-level field some format reads; other fields are ignored (metadata columns such as id
# or source are common), but one that is close to a missing field is named in its problem.
KNOWN_FIELDS = frozenset(("messages", "prompt", "completion", "text", "chosen", "rejected", "instruction", "input",
                          "output", "system", "rating", "safety", "prompt_unsafe", "is_unsafe", "unsafe", "responses",
                          "completions", "scores", "rewards", "question", "problem", "answer", "solution", "id"))


def load_sft(path: str, split: str | None = None, on_invalid: str = "error",
             skipped: list[dict] | None = None) -> list[SFTExample]:
    """Conversations to imitate: messages, prompt/completion, HH text or Alpaca rows.

    HH text (`text`, or HH-RLHF's `chosen` column) may hold empty Assistant turns, as the
    published files do: they are kept as assistant messages with empty content (see `parse_hh`).
    An empty final reply still has a target: the chat template renders it as the end-of-turn
    token, so the model learns to stop (an example whose template renders no target token is
    dropped and counted at tokenization). One warning per file counts the examples whose final
    reply is empty. Message lists, prompt/completion and Alpaca rows still need reply text."""
    examples = _load(path, split, _sft, on_invalid, skipped)
    empty = sum(1 for e in examples if not e.messages[-1].content.strip())
    if empty:
        log.warning("%s: %d of %d SFT examples end with an empty assistant reply; kept (the target "
                    "is the end-of-turn token: the model learns to stop)", path, empty, len(examples))
    return examples


def load_preferences(path: str, split: str | None = None, on_invalid: str = "error",
                     skipped: list[dict] | None = None) -> list[PreferencePair]:
    """Preference pairs: TRL standard, conversational or implicit-prompt rows, or HH-RLHF text.

    An empty chosen or rejected reply is valid (in HH-RLHF's harmless set saying nothing is
    often the preferred answer): it is kept, and one warning per file gives the count. So are
    implicit-prompt rows (HH text or message lists) whose conversations differ before the last
    assistant turn: see `_hh_pair` and `_implicit_pair`; one warning per file counts them too."""
    notes: Counter = Counter()
    pairs = _load(path, split, lambda row, loc, bad: _pair(row, loc, bad, notes), on_invalid, skipped)
    empty = sum(1 for p in pairs if not p.chosen.strip() or not p.rejected.strip())
    if empty:
        log.warning("%s: %d of %d preference pairs have an empty chosen or rejected reply; kept "
                    "(an empty reply is a valid answer, e.g. declining to answer)", path, empty, len(pairs))
    if notes["history"]:
        log.warning("%s: %d of %d preference pairs differ before their last assistant turn; the "
                    "prompt is the turns both share, each reply carries its differing turns as "
                    "text", path, notes["history"], len(pairs))
    return pairs


def load_ranked(path: str, split: str | None = None, on_invalid: str = "error",
                skipped: list[dict] | None = None) -> list[RankedResponses]:
    """K scored responses per prompt. An empty response is valid (it can be the best-ranked one,
    e.g. declining to answer): it is kept, and one warning per file gives the count."""
    rows = _load(path, split, _ranked, on_invalid, skipped)
    empty = sum(1 for r in rows for text in r.responses if not text.strip())
    if empty:
        log.warning("%s: %d of %d ranked responses are empty; kept (an empty reply is a valid answer, "
                    "e.g. declining to answer)", path, empty, sum(len(r.responses) for r in rows))
    return rows


def load_problems(path: str, split: str | None = None, on_invalid: str = "error",
                  skipped: list[dict] | None = None) -> list[Problem]:
    """Questions with reference answers (GSM8K's 'rationale #### answer' is split)."""
    return _load(path, split, _problem, on_invalid, skipped)


def load_prompts(path: str, split: str | None = None, on_invalid: str = "error",
                 skipped: list[dict] | None = None) -> list[str]:
    """The `prompt` texts of a file's rows (other fields are ignored)."""
    return [text for text, _ in load_flagged_prompts(path, split, on_invalid, skipped)]


def load_flagged_prompts(path: str, split: str | None = None, on_invalid: str = "error",
                         skipped: list[dict] | None = None) -> list[tuple[str, bool]]:
    """(prompt text, unsafe) of a file's rows: `unsafe` (or `prompt_unsafe`, `is_unsafe`) true
    marks a harmful request, which Llama 2's combined reward routes to the safety model."""
    return _load(path, split, _flagged_prompt, on_invalid, skipped)


def _flagged_prompt(row: dict, loc: str, bad: Bad) -> tuple[str, bool]:
    text = parse_text(row.get("prompt"), "prompt", bad)
    key = next((k for k in ("unsafe", "prompt_unsafe", "is_unsafe") if row.get(k) is not None), None)
    flag = row.get(key, False) if key else False
    if not isinstance(flag, bool):
        bad(key, f"expected true or false, got {json_type(flag)}")
    return text, flag is True


def _load(path: str, split: str | None, convert: Callable[[dict, str, Bad], object],
          on_invalid: str = "error", skipped: list[dict] | None = None) -> list:
    """Convert every row. `on_invalid="error"`: raise one DataError listing every problem, in
    file order. `"skip"`: drop the rows with a problem (warn with the count; their
    {file, line, reason} go to `skipped`), unless no row is usable."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {', '.join(ON_INVALID)}, not {on_invalid!r}")
    problems: list[str] = []
    records = []
    for loc, row in iter_rows(path, problems, split):
        before = len(problems)

        def bad(field: str, problem: str, loc: str = loc, row: dict = row) -> None:
            problems.append(RowProblem(loc, f"{field}: {problem}{_near_miss(field, problem, row)}"))

        record = convert(row, loc, bad)
        if len(problems) == before:
            records.append(record)
    if not records and not problems:
        problems.append(f"{path}: no rows")
    if problems and (on_invalid == "error" or not records):
        source = str(path) if records or on_invalid == "error" else f"{path} (no usable row, so on_invalid=skip keeps nothing)"
        raise DataError(problems, source)
    if problems:
        dropped = _skipped_rows(problems)
        log.warning("%s: skipped %d of %d rows that cannot be used (on_invalid=skip); the first: %s", path,
                    len(dropped), len(dropped) + len(records), problems[0])
        if skipped is not None:
            skipped.extend(dropped)
    return records


def _skipped_rows(problems: list[RowProblem]) -> list[dict]:
    """One {file, line, reason} per row, in file order; a row's problems joined by '; '."""
    rows: dict[str, dict] = {}
    for p in problems:
        entry = rows.setdefault(p.loc, {"file": p.loc.file, "line": p.loc.line, "reason": []})
        entry["reason"].append(p.text)
    return [{**e, "reason": "; ".join(e["reason"])} for e in rows.values()]


def _near_miss(field: str, problem: str, row: dict) -> str:
    """For a missing top-level field: ' (found 'chosn': did you mean 'chosen'?)' when the row has
    an unknown field close to it, else ''."""
    if problem != "missing" or field not in KNOWN_FIELDS:
        return ""
    unknown = [k for k in row if isinstance(k, str) and k not in KNOWN_FIELDS]
    near = difflib.get_close_matches(field, unknown, n=1, cutoff=0.75)
    return f" (found '{near[0]}': did you mean '{field}'?)" if near else ""


# ---- shared parsers ---------------------------------------------------------------------


def parse_text(value: object, field: str, bad: Bad) -> str | None:
    """A string with some non-space text."""
    if value is None:
        bad(field, "missing")
    elif not isinstance(value, str):
        bad(field, f"expected a string, got {json_type(value)}")
    elif not value.strip():
        bad(field, "empty text")
    else:
        return value
    return None


def parse_messages(value: object, field: str, bad: Bad, empty_reply: bool = False) -> Messages | None:
    """A non-empty list of {role, content} messages; a system message may only come first.
    With `empty_reply`, any assistant message may have empty content (a preference reply, or
    an empty reply earlier in HH-RLHF history: chat templates render it, see `parse_hh`)."""
    if value is None:
        bad(field, "missing")
        return None
    if not isinstance(value, list):
        bad(field, f"expected a list of messages, got {json_type(value)}")
        return None
    if not value:
        bad(field, "empty list of messages")
        return None
    out, ok = [], True
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            bad(where, f"expected an object with role and content, got {json_type(message)}")
            ok = False
            continue
        role = message.get("role")
        if role is None:
            bad(f"{where}.role", "missing")
        elif role not in ROLES:
            bad(f"{where}.role", f"unknown role {role!r} (expected {', '.join(ROLES)})")
        elif role == "system" and i > 0:
            bad(f"{where}.role", "a system message may only come first")
        content = message.get("content")
        if not (empty_reply and role == "assistant" and _blank(content)):
            content = parse_text(content, f"{where}.content", bad)
        if role in ROLES and (role != "system" or i == 0) and content is not None:
            out.append(Message(role, content))
        else:
            ok = False
    return tuple(out) if ok else None


def _blank(value: object) -> bool:
    """An empty (or all-space) string."""
    return isinstance(value, str) and not value.strip()


def parse_hh(value: object, field: str, bad: Bad) -> Messages | None:
    """The turns of Anthropic HH text '\\n\\nHuman: ...\\n\\nAssistant: ...', stripped.

    An empty Assistant turn ('...\\n\\nAssistant:\\n\\nHuman: ...', or at the end) is kept as an
    assistant message with empty content rather than dropped: HH-RLHF has such turns in
    otherwise shared histories, dropping one would join two Human turns (which some chat
    templates refuse) and change the conversation, while chat templates render an empty
    assistant message (its header and end-of-turn token). An empty Human turn is an error."""
    text = parse_text(value, field, bad)
    if text is None:
        return None
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip() or parts[1] != "Human":
        bad(field, HH_HINT)
        return None
    out = []
    for i, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2], strict=True), start=1):
        if speaker == "Human" and not content.strip():
            bad(field, f"turn {i} ({speaker}): empty text")
        out.append(Message("user" if speaker == "Human" else "assistant", content.strip()))
    return tuple(out) if all(m.content for m in out if m.role == "user") else None


def _ends_with(messages: Messages, role: str, field: str, bad: Bad) -> bool:
    """Report unless the conversation ends with a `role` turn."""
    if messages[-1].role == role:
        return True
    article = "an" if role == "assistant" else "a"
    bad(field, f"must end with {article} {role} turn (last is {messages[-1].role})")
    return False


def _prompt(value: object, field: str, bad: Bad) -> Messages | None:
    """A prompt: a user text, or messages ending with a user turn."""
    if isinstance(value, list):
        messages = parse_messages(value, field, bad)
        return messages if messages and _ends_with(messages, "user", field, bad) else None
    text = parse_text(value, field, bad)
    return None if text is None else (Message("user", text),)


def _reply(value: object, field: str, bad: Bad, empty_ok: bool = False) -> str | None:
    """A reply: a text, or a list holding one assistant message; empty only with `empty_ok`."""
    if not isinstance(value, list):
        return value if empty_ok and _blank(value) else parse_text(value, field, bad)
    messages = parse_messages(value, field, bad, empty_reply=empty_ok)
    if messages is None:
        return None
    if len(messages) != 1 or messages[0].role != "assistant":
        bad(field, "expected a single assistant message")
        return None
    return messages[0].content


def _with_system(row: dict, messages: Messages | None, bad: Bad) -> Messages | None:
    """Prepend the row's optional `system` text (an empty one counts as absent)."""
    system = row.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    if parse_text(system, "system", bad) is None or messages is None:
        return None
    if messages[0].role == "system":
        bad("system", "the conversation already starts with a system message")
        return None
    return (Message("system", system),) + messages


def _present(row: dict) -> list[str]:
    """The fields of a row that hold a value (Parquet and datasets fill absent ones with null)."""
    return [k for k, v in row.items() if v is not None]


def _unknown(row: dict, kind: str, expected: str, bad: Bad) -> None:
    found = ", ".join(_present(row)) or "none"
    bad("fields", f"no known {kind} format (found: {found}; expected: {expected})")


# ---- SFT --------------------------------------------------------------------------------


def _sft(row: dict, loc: str, bad: Bad) -> SFTExample | None:
    has = _present(row)
    if "messages" in has:
        field, messages = "messages", parse_messages(row["messages"], "messages", bad)
    elif "prompt" in has or "completion" in has:
        field, messages = "completion", _prompt_completion(row, bad)
    elif "text" in has or "chosen" in has:
        field = "text" if "text" in has else "chosen"
        parse = parse_messages if isinstance(row[field], list) else parse_hh
        messages = parse(row[field], field, bad)
    elif "instruction" in has or "output" in has:
        field, messages = "output", _alpaca(row, bad)
    else:
        return _unknown(row, "SFT", SFT_FORMATS, bad)
    messages = _with_system(row, messages, bad)
    if messages is None:
        return None
    if not any(m.role == "assistant" for m in messages):
        bad(field, "no assistant turn")
        return None
    return SFTExample(messages) if _ends_with(messages, "assistant", field, bad) else None


def _prompt_completion(row: dict, bad: Bad) -> Messages | None:
    prompt = _prompt(row.get("prompt"), "prompt", bad)
    completion = _reply(row.get("completion"), "completion", bad)
    if prompt is None or completion is None:
        return None
    return prompt + (Message("assistant", completion),)


def _alpaca(row: dict, bad: Bad) -> Messages | None:
    instruction = parse_text(row.get("instruction"), "instruction", bad)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        bad("input", f"expected a string, got {json_type(extra)}")
        return None
    output = parse_text(row.get("output"), "output", bad)
    if instruction is None or output is None:
        return None
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return (Message("user", user), Message("assistant", output))


# ---- preferences ------------------------------------------------------------------------


def _pair(row: dict, loc: str, bad: Bad, notes: Counter | None = None) -> PreferencePair | None:
    """One preference row. Empty replies are valid in every shape. A chosen reply identical to
    the rejected one (ignoring outer spaces) stays an error, as it always was here: TRL accepts
    such a row, but it states no preference, so a reward model or DPO learns nothing from it.
    `notes["history"]` counts implicit-prompt rows whose conversations differ early."""
    notes = Counter() if notes is None else notes
    has = _present(row)
    if not {"prompt", "chosen", "rejected"} & set(has):
        return _unknown(row, "preference", PREFERENCE_FORMATS, bad)
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if prompt is None and (_is_hh(chosen) or _is_hh(rejected)):
        prompt, chosen, rejected = _hh_pair(chosen, rejected, bad, notes)
    elif prompt is None and (isinstance(chosen, list) or isinstance(rejected, list)):
        prompt, chosen, rejected = _implicit_pair(chosen, rejected, bad, notes)
    else:
        prompt = _prompt(prompt, "prompt", bad)
        chosen = _reply(chosen, "chosen", bad, empty_ok=True)
        rejected = _reply(rejected, "rejected", bad, empty_ok=True)
    prompt = _with_system(row, prompt, bad)
    labels = _labels(row, bad)
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        bad("rejected", "same text as chosen")
        return None
    if prompt is None or chosen is None or rejected is None:
        return None
    return PreferencePair(prompt, chosen, rejected, **labels)


def _is_hh(value: object) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


NO_COMMON_PROMPT = "shares no prompt with chosen (the conversations differ before their first assistant turn)"


def _hh_pair(chosen: object, rejected: object, bad: Bad, notes: Counter) -> tuple:
    """Split two HH-RLHF texts into the prompt they share and two replies (TRL's implicit prompt,
    cut back to a turn boundary).

    The prompt is the text before the last '\\n\\nAssistant:' that lies wholly inside the longest
    common prefix of the two texts (leading spaces ignored); each reply is the rest of its text,
    stripped. Usually that marker is both texts' last one and the replies are the final answers.
    When the conversations differ earlier (an earlier Human or Assistant turn), the prompt ends
    with the last Human turn before the last Assistant turn both share, and each reply holds its
    differing turns as HH text, e.g. 'Sure.\\n\\nHuman: Thanks\\n\\nAssistant: Bye'. An empty final
    reply (text ending in '\\n\\nAssistant:') is ''. Texts that differ before their first
    Assistant turn share no prompt: an error."""
    texts = {}
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        text = parse_text(value, field, bad)
        if text is None:
            continue
        if not _is_hh(text) or _HH_ASSISTANT not in text:
            bad(field, HH_HINT)
            continue
        texts[field] = text.lstrip()
    if len(texts) < 2:
        return None, None, None
    good, worse = texts["chosen"], texts["rejected"]
    cut = good.rfind(_HH_ASSISTANT, 0, len(os.path.commonprefix([good, worse])))
    if cut < 0:
        bad("rejected", NO_COMMON_PROMPT)
        return None, None, None
    if cut != good.rfind(_HH_ASSISTANT) or cut != worse.rfind(_HH_ASSISTANT):
        notes["history"] += 1
    prompt = parse_hh(good[:cut], "chosen", bad)
    if prompt is None or not _ends_with(prompt, "user", "chosen", bad):
        return None, None, None
    start = cut + len(_HH_ASSISTANT)
    return prompt, _hh_rest(good[start:]), _hh_rest(worse[start:])


def _hh_rest(text: str) -> str:
    """A reply cut from HH text, stripped; one that is an empty turn followed by later turns
    keeps its leading '\\n\\n' ('\\n\\nHuman: ...'), as `_hh_reply` writes it."""
    return ("\n\n" if re.match(r"[ \t]*\n\n(?:Human|Assistant):", text) else "") + text.strip()


def _implicit_pair(chosen: object, rejected: object, bad: Bad, notes: Counter) -> tuple:
    """Two full conversations (TRL's implicit prompt) split into the prompt they share and two
    replies, by the rule of `_hh_pair` on messages.

    The prompt is the messages before the last assistant message that both conversations have
    at the same place with the same messages before it; usually their final turns. When they
    differ earlier, each reply is its first assistant message followed by its later turns in HH
    text form ('\\n\\nHuman: ...\\n\\nAssistant: ...'), so the pair equals the one read from the
    same rows as HH text. Any assistant message may be empty (''), as in HH text."""
    conversations = {}
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        messages = parse_messages(value, field, bad, empty_reply=True)
        if messages is None:
            continue
        if len(messages) < 2 or messages[-1].role != "assistant":
            bad(field, "expected a conversation that ends with an assistant reply")
            continue
        conversations[field] = messages
    if len(conversations) < 2:
        return None, None, None
    good, worse = conversations["chosen"], conversations["rejected"]
    same = next((i for i, (a, b) in enumerate(zip(good, worse)) if a != b), min(len(good), len(worse)))
    last = min(same, len(good) - 1, len(worse) - 1)
    cut = next((i for i in range(last, 0, -1) if good[i].role == worse[i].role == "assistant"), 0)
    if not cut:
        bad("rejected", NO_COMMON_PROMPT)
        return None, None, None
    if cut != len(good) - 1 or cut != len(worse) - 1:
        notes["history"] += 1
    if not _ends_with(good[:cut], "user", "chosen", bad):
        return None, None, None
    return good[:cut], _hh_reply(good[cut:]), _hh_reply(worse[cut:])


def _hh_reply(messages: Messages) -> str:
    """An assistant message and the turns after it as one text, later turns in HH form."""
    text = messages[0].content
    for m in messages[1:]:
        speaker = "Human" if m.role == "user" else "Assistant"
        text += f"\n\n{speaker}:" + (f" {m.content}" if m.content else "")
    return text


def _labels(row: dict, bad: Bad) -> dict:
    """The optional rating, safety label and prompt-unsafe flag of a preference row."""
    labels = {}
    rating = row.get("rating")
    if rating is not None:
        labels["rating"] = normalise_rating(rating)
        if labels["rating"] is None:
            bad("rating", f"unknown rating {rating!r} (expected one of: {', '.join(RATINGS)})")
    safety = row.get("safety")
    if safety is not None:
        labels["safety"] = safety
        if safety not in SAFETY_LABELS:
            bad("safety", f"unknown label {safety!r} (expected one of: {', '.join(SAFETY_LABELS)})")
    key = "prompt_unsafe" if row.get("prompt_unsafe") is not None else "is_unsafe"
    flag = row.get(key)
    if flag is not None:
        labels["prompt_unsafe"] = flag
        if not isinstance(flag, bool):
            bad(key, f"expected true or false, got {json_type(flag)}")
    return labels


# ---- ranked responses -------------------------------------------------------------------


def _ranked(row: dict, loc: str, bad: Bad) -> RankedResponses | None:
    has = _present(row)
    if not {"prompt", "responses", "completions"} & set(has):
        return _unknown(row, "ranked", RANKED_FORMATS, bad)
    prompt = _with_system(row, _prompt(row.get("prompt"), "prompt", bad), bad)
    rkey = "completions" if "completions" in has and "responses" not in has else "responses"
    skey = "rewards" if "rewards" in has and "scores" not in has else "scores"
    responses = _list(row.get(rkey), rkey, bad, _response)
    scores = _list(row.get(skey), skey, bad, _number)
    if responses is not None and len(responses) < 2:
        bad(rkey, f"expected at least 2 responses, got {len(responses)}")
        return None
    if responses is not None and scores is not None and len(scores) != len(responses):
        bad(skey, f"expected {len(responses)} scores (one per response), got {len(scores)}")
        return None
    if prompt is None or responses is None or scores is None:
        return None
    return RankedResponses(prompt, responses, scores)


def _response(value: object, field: str, bad: Bad) -> str | None:
    """A ranked response: any string, empty included (`load_ranked` counts the empty ones)."""
    return value if isinstance(value, str) else parse_text(value, field, bad)


def _number(value: object, field: str, bad: Bad) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        bad(field, f"expected a number, got {json_type(value)}")
    elif not math.isfinite(value):
        bad(field, f"expected a finite number, got {value}")
    else:
        return float(value)
    return None


def _list(value: object, field: str, bad: Bad, parse: Callable) -> tuple | None:
    """A list whose items each pass `parse`."""
    if value is None:
        bad(field, "missing")
        return None
    if not isinstance(value, list):
        bad(field, f"expected a list, got {json_type(value)}")
        return None
    items = [parse(item, f"{field}[{i}]", bad) for i, item in enumerate(value)]
    return None if None in items else tuple(items)


# ---- problems with answers --------------------------------------------------------------


def _problem(row: dict, loc: str, bad: Bad) -> Problem | None:
    has = _present(row)
    if not {"question", "problem", "answer"} & set(has):
        return _unknown(row, "problem", PROBLEM_FORMATS, bad)
    qkey = "problem" if "problem" in has and "question" not in has else "question"
    question = parse_text(row.get(qkey), qkey, bad)
    answer, rationale = _answer(row.get("answer"), bad)
    solution = row.get("solution")
    if solution is not None:
        solution = parse_text(solution, "solution", bad)
    ident = row.get("id")
    if ident is None:
        ident = loc
    elif isinstance(ident, bool) or not isinstance(ident, (str, int)):
        bad("id", f"expected a string or integer, got {json_type(ident)}")
    if question is None or answer is None:
        return None
    return Problem(question, answer, id=str(ident), solution=solution or rationale)


def _answer(value: object, bad: Bad) -> tuple[str | None, str]:
    """The final answer and the rationale; GSM8K's 'rationale #### 1,234' gives '1234'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    text = parse_text(value, "answer", bad)
    if text is None:
        return None, ""
    if "####" not in text:
        return text.strip(), ""
    rationale, _, final = text.rpartition("####")
    final = final.strip().replace(",", "")
    if not final:
        bad("answer", "nothing after '####'")
        return None, ""
    return final, rationale.strip()


def load_feedback(path: str, split: str | None = None, fmt: str = "auto", on_invalid: str = "error",
                  skipped: list[dict] | None = None) -> tuple[str, list]:
    """("pairs", PreferencePairs) or ("ranked", RankedResponses) from a file; `fmt` auto picks
    ranked when the first readable row has responses/completions. Bad rows raise one DataError
    (or are skipped: `on_invalid`)."""
    if fmt == "auto":
        first = next(iter_rows(path, [], split), ("", {}))[1]
        fmt = "ranked" if {"responses", "completions"} & {k for k, v in first.items() if v is not None} else "pairs"
    return fmt, (load_preferences if fmt == "pairs" else load_ranked)(path, split, on_invalid, skipped)
