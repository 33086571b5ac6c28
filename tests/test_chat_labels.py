from alignkit.data.chat import IGNORE, tokenize_conversation, tokenize_prompt_response, truncate
from alignkit.data.records import Message


def _text(tok, ids):
    return tok.decode(ids)


def test_single_turn_labels_cover_reply_and_end_token_only(tok):
    msgs = (Message("user", "hi"), Message("assistant", "yo"))
    t = tokenize_conversation(tok, msgs)
    # "<|im_start|>" "user" "\n" "hi" "<|im_end|>" "\n" "<|im_start|>" "assistant" "\n" is
    # 1+4+1+2+1+1+1+9+1 = 21 tokens (byte-level: one token per character, one per special token);
    # then "yo" (2), <|im_end|> (1), "\n" (1).
    assert len(t.input_ids) == 21 + 2 + 1 + 1
    assert t.labels[:21] == [IGNORE] * 21
    assert t.labels[21:24] == t.input_ids[21:24]
    assert _text(tok, t.input_ids[21:24]) == "yo<|im_end|>"
    assert t.labels[24] == IGNORE  # the newline after the end-of-turn token is not a target


def test_multi_turn_all_vs_last(tok):
    msgs = (Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d"))
    every = tokenize_conversation(tok, msgs, targets="all")
    last = tokenize_conversation(tok, msgs, targets="last")
    target_text = lambda t: [_text(tok, [i]) for i, l in zip(t.input_ids, t.labels) if l != IGNORE]
    assert target_text(every) == ["b", "<|im_end|>", "d", "<|im_end|>"]
    assert target_text(last) == ["d", "<|im_end|>"]


def test_prompt_response_and_truncation(tok):
    prompt = (Message("user", "x" * 50),)
    t = tokenize_prompt_response(tok, prompt, "abcdef")
    n = len(t.input_ids)
    cut = truncate(t, n - 10)  # prompt loses 10 tokens from the left, response intact
    assert len(cut.input_ids) == n - 10 and cut.n_targets == t.n_targets
    tight = truncate(t, 4)  # prompt cut to 1 token, then the response cut at the right: 3 targets left
    assert len(tight.input_ids) == 4 and tight.n_targets == 3
    assert _text(tok, [i for i, l in zip(tight.input_ids, tight.labels) if l != IGNORE]) == "abc"
    assert truncate(t, 4, min_target_tokens=5) is None
