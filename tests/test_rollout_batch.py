"""Rollouts -> training tensors (hand example), score placement, row selection, response
log-probs against unpadded sequences, and the critic-free advantages (hand values)."""

from __future__ import annotations

import torch

from alignkit.algorithms.ppo.loop import PPOConfig, compute_advantages
from alignkit.losses.ppo import kl_penalized_rewards
from alignkit.algorithms.ppo.actor_critic import response_logprobs
from alignkit.models.tiny import tiny_model
from alignkit.models.forward import group_visibility
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.batch import assemble, select_rows, shared_prefix_row

PROMPTS = [[1, 2, 3], [4]]
RESPONSES = [[5, 6], [7, 8, 9]]


def test_assemble_hand_example():
    b = assemble(PROMPTS, RESPONSES, pad_id=0)
    # prompts left-padded to P = 3, responses right-padded to T = 3: responses start in column 3
    assert b["prompt_width"] == 3
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # positions count real tokens only: cumsum(mask) - 1, clamped at 0
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert b["response_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_score_lands_on_the_last_response_token():
    b = assemble(PROMPTS, RESPONSES, pad_id=0)
    mask = b["response_mask"]
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, -0.5]])
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, beta=0.1)
    # k1 per token: row 0 = [0.5, 0, -], row 1 = [0, 0.5, 0]; r_t = -0.1*kl_t, score at the last token
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.0, 0.0], [0.0, -0.05, 3.0]]))
    assert torch.allclose(kl, torch.tensor([0.5, 0.5]))


def test_select_rows_cuts_shared_padding():
    b = assemble(PROMPTS, RESPONSES, pad_id=0)
    b["extra"] = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    b["seq"] = torch.tensor([10.0, 20.0])
    first = select_rows(b, [0])
    assert first["prompt_width"] == 3 and first["input_ids"].tolist() == [[1, 2, 3, 5, 6]]
    assert first["extra"].tolist() == [[1.0, 2.0]] and first["seq"].tolist() == [10.0]
    second = select_rows(b, [1])
    assert second["prompt_width"] == 1 and second["input_ids"].tolist() == [[4, 7, 8, 9]]
    assert second["position_ids"].tolist() == [[0, 1, 2, 3]] and second["response_mask"].tolist() == [[1, 1, 1]]


def test_shared_prefix_row_hand_example():
    # rows 0 and 2 share a prompt; all prompts start with [1, 2]; row 3's prompt is that prefix
    b = assemble([[1, 2, 3], [1, 2, 4, 5], [1, 2, 3], [1, 2]], [[6, 7], [8], [9, 10, 11], [12, 13]], pad_id=0)
    row = shared_prefix_row(b)
    # root [1, 2] | group 0: [3], replies 6 and 9 10 (last tokens 7, 11 left out) | group 1: [4, 5], reply ∅ | group 2: ∅, 12
    assert row["input_ids"].tolist() == [[1, 2, 3, 6, 9, 10, 4, 5, 12]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 3, 4, 2, 3, 2]]
    assert row["group_ids"].tolist() == [[-1, -1, 0, 0, 0, 0, 1, 1, 2]]
    assert row["parts"].tolist() == [[0, 0, 0, 1, 2, 2, 0, 0, 1]]
    # hidden state predicting reply token j: the prompt's last token for j = 0, then the reply's own tokens
    assert row["index"].tolist() == [[2, 3, 0], [7, 0, 0], [2, 4, 5], [1, 8, 0]]
    mask = group_visibility(row["group_ids"], row["parts"])[0, 0]
    assert mask[5].tolist() == [1, 1, 1, 0, 1, 1, 0, 0, 0]  # token 10 sees root, its prompt, its reply; not 6
    assert mask[8].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1]  # token 12 sees the root only


def test_response_logprobs_match_unpadded_sequences():
    model = tiny_model(0).eval()
    # shared prompts, a common prefix, a prompt that is the common prefix, one-token replies
    prompts = [[10, 20, 30, 40, 50], [10, 20, 70], [10, 20, 30, 40, 50], [10, 20], [10, 20, 90, 100]]
    responses = [[11, 12], [13, 14, 15, 16], [17], [18, 19, 21], [22]]
    b = assemble(prompts, responses, pad_id=258)
    with torch.no_grad():
        logp, ent = response_logprobs(model, b, temperature=0.7, entropy=True)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([p + r])).logits[0].float() / 0.7
            lp = torch.log_softmax(logits, -1)
            want = torch.stack([lp[len(p) - 1 + j, t] for j, t in enumerate(r)])
            assert torch.allclose(logp[row, :len(r)], want, atol=1e-5)
            assert (logp[row, len(r):] == 0).all()
            probs = lp[len(p) - 1:len(p) - 1 + len(r)].exp()
            assert torch.allclose(ent[row, :len(r)], -(probs * lp[len(p) - 1:len(p) - 1 + len(r)]).sum(-1), atol=1e-4)


def _advantages(algorithm: str) -> torch.Tensor:
    # two prompts x k=2 replies of lengths 1, 2, 2, 1; scores 1, 3, 2, 2; β = 0 (no KL term)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    rewards, _ = kl_penalized_rewards(torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.zeros(4, 2), torch.zeros(4, 2), mask, 0.0)
    cfg = PPOConfig(algorithm=algorithm, sampling=SamplingConfig(n=2), whiten_advantages=False)
    adv, _ = compute_advantages(cfg, rewards, torch.zeros(4, 2), mask)
    return adv


def test_critic_free_advantages_hand_values():
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    # REINFORCE: r - mean(r) = r - 2 -> [-1, 1, 0, 0] on every token of the reply
    assert torch.allclose(_advantages("reinforce"), torch.tensor([-1.0, 1.0, 0.0, 0.0])[:, None] * mask)
    # RLOO: r_i - r_other -> [1-3, 3-1, 2-2, 2-2]
    assert torch.allclose(_advantages("rloo"), torch.tensor([-2.0, 2.0, 0.0, 0.0])[:, None] * mask)
    # GRPO: (r - mean) / std within the group; std([1, 3]) = sqrt(2); equal rewards give 0
    g = 1.0 / (2.0 ** 0.5 + 1e-6)
    assert torch.allclose(_advantages("grpo"), torch.tensor([-g, g, 0.0, 0.0])[:, None] * mask, atol=1e-6)
