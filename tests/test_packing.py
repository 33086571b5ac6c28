import torch

from alignkit.data.chat import tokenize_prompt_response
from alignkit.data.collate import pack_groups, packed_row, pad_batch
from alignkit.data.records import Message
from alignkit.models.forward import target_logprobs


def _examples(tok):
    pairs = [("what is 2+2?", "4"), ("reverse abc", "cba"), ("say hello to the whole wide world", "hello world")]
    return [tokenize_prompt_response(tok, (Message("user", p),), r) for p, r in pairs]


def test_packed_logits_equal_examples_run_alone(tok, model):
    model.eval()
    exs = _examples(tok)
    row = packed_row(exs)
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in exs:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed[start: start + len(e.input_ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(e.input_ids)


def test_packed_target_logprobs_equal_padded(tok, model):
    model.eval()
    exs = _examples(tok)
    with torch.no_grad():
        packed, _ = target_logprobs(model, packed_row(exs))
        padded, _ = target_logprobs(model, pad_batch(exs, tok.pad_token_id))
    assert packed.numel() == sum(e.n_targets for e in exs)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_pack_groups_respects_budget():
    lengths = [5, 9, 3, 7, 2, 10]
    rows = pack_groups(lengths, 12)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    assert len(rows) == 3  # 36 tokens, first-fit decreasing: [10,2], [9,3], [7,5]
