"""PPO / GRPO / RLOO smoke runs on the tiny model with a rule reward, both memory modes; the
LoRA layout's roles (reference = adapters off, adapters isolated); exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.algorithms.ppo.loop import PPOConfig, run
from alignkit.config import ConfigError, load_config
from alignkit.engine.logging import read_metrics
from alignkit.algorithms.ppo.actor_critic import build_actor_critic
from alignkit.models.load import LoraConfig, ModelConfig
from alignkit.models.tiny import save_tiny, tiny_model
from alignkit.rollout.batch import assemble


def lowercase_letters(prompts: list[str], responses: list[str]) -> list[float]:
    """A trivial rule reward: the number of lowercase letters in the reply."""
    return [float(sum(ch.islower() for ch in r)) for r in responses]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _run(tiny_dir, out, *overrides, iterations=2):
    cfg = load_config(PPOConfig, None, [
        f"model.path={tiny_dir}", f"train.output_dir={out}", f"iterations={iterations}", "prompts_per_iteration=4",
        "sampling.max_new_tokens=10", "minibatch_size=4", "train.batch_size=2", "ppo_epochs=2", "prompts.train=16",
        "prompts.heldout=4", "eval.every=0", "train.lr=1e-3", "train.threads=1",
        "samples_every=1", *overrides])
    result = run(cfg, reward_fn=lowercase_letters)
    rows = read_metrics(out)
    return result, [r for r in rows if "iteration" in r], [r for r in rows if "eval/reward" in r]


PPO_KEYS = {"reward", "reward_std", "kl", "beta", "entropy", "clip_frac", "approx_kl", "vf_loss", "explained_variance",
            "response_length", "tokens_per_s", "gen_tokens_per_s", "pg_loss", "grad_norm", "lr", "ratio_max", "ratio_over_cap"}


@pytest.mark.parametrize("memory,trunk", [("lora", "shared"), ("lora", "own"), ("full", "shared"), ("full", "own")])
def test_ppo_smoke(tiny_dir, tmp_path, memory, trunk):
    out = tmp_path / f"{memory}-{trunk}"
    result, rows, evals = _run(tiny_dir, out, f"memory={memory}", f"critic_trunk={trunk}")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert PPO_KEYS <= set(rows[0])
    assert rows[0]["kl"] == 0.0  # before any update the policy is the reference
    assert rows[0]["beta"] == 0.05 and rows[1]["kl"] != 0.0
    assert [e["eval/iteration"] for e in evals] == [0, 2] and evals[0]["eval/kl"] == 0.0
    assert evals[1]["eval/kl"] != 0.0  # the policy moved
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["iteration"] for s in samples} == {1, 2} and all("response" in s for s in samples)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(result["final_model"])
    assert not any("lora" in n for n, _ in final.named_parameters())


def test_sampling_section_and_the_algorithm_table_are_checked():
    cfg = load_config(PPOConfig, None, [])
    s = cfg.sampling
    assert (s.n, s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.batch_size) == (1, 48, 1.0, 1.0, 0, 32)
    for algorithm in ("rloo", "grpo"):  # they compare the replies of a prompt
        with pytest.raises(ConfigError, match="set sampling.n >= 2"):
            load_config(PPOConfig, None, [f"algorithm={algorithm}"])
    assert load_config(PPOConfig, None, ["algorithm=grpo", "sampling.n=2"]).method.kl_in_loss
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        load_config(PPOConfig, None, ["sampling.temperature=0"])


def test_critic_from_a_reward_model_runs_on_its_own_trunk(tiny_dir, tmp_path):
    # critic_trunk=auto resolves to own for critic_init=reward_model (a causal-LM directory gets a fresh score head)
    _, rows, _ = _run(tiny_dir, tmp_path / "rm-critic", "critic_init=reward_model", f"critic_path={tiny_dir}")
    assert [r["iteration"] for r in rows] == [1, 2] and "vf_loss" in rows[0]
    with pytest.raises(ValueError, match="critic_trunk=own"):
        load_config(PPOConfig, None, ["critic_init=reward_model", "critic_trunk=shared"])
    assert load_config(PPOConfig, None, []).critic_trunk == "shared"


def _ppo_batch(ac):
    """A rollout batch as ppo.run builds it: old log-probs/values from the current weights,
    made-up advantages and returns."""
    batch = assemble([[10, 20, 30], [40]], [[50, 60], [70, 80, 90]], pad_id=258)
    mask = batch["response_mask"]
    with torch.no_grad():
        old_logp, _, old_values = ac.policy_outputs(batch)
    gen = torch.Generator().manual_seed(1)
    return {**batch, "old_logp": old_logp - 0.1 * mask, "old_values": old_values + 0.2 * mask, "ref_logp": old_logp,
            "advantages": torch.randn(mask.shape, generator=gen) * mask, "returns": torch.randn(mask.shape, generator=gen) * mask}


@pytest.mark.parametrize("memory", ["lora", "full"])
def test_shared_trunk_step_is_policy_plus_value_loss_in_one_pass(tiny_dir, memory):
    from alignkit.algorithms.ppo.loop import make_step
    from alignkit.losses.ppo import FixedKLController, policy_loss, value_loss

    ac, _, _ = build_actor_critic(ModelConfig(path=tiny_dir, lora=LoraConfig(r=4, alpha=8)), memory, "policy",
                                  critic_trunk="shared")
    trainable = {n for n, p in ac.named_parameters() if p.requires_grad}
    assert "critic.head.weight" in trainable and not any(".critic." in n for n in trainable)  # no second adapter
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in ac.named_parameters():
            if "lora_B" in name or "head" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    mb = {**_ppo_batch(ac), "part": "policy"}
    cfg = load_config(PPOConfig, None, ["vf_coef=0.3", "vf_clip=0.1"])
    loss, units, sums = make_step(ac, cfg, FixedKLController(0.05))(mb)
    params = [p for p in ac.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    # the same maths from two separate passes: the policy's log-probs and the critic's values
    mask = mb["response_mask"]
    pg, _ = policy_loss(ac.policy_logprobs(mb)[0], mb["old_logp"], mb["advantages"], mask, 0.2)
    vl, _ = value_loss(ac.values(mb), mb["old_values"], mb["returns"], mask, 0.1)
    want_loss = (pg.mean() + 0.3 * vl.mean()) * units
    want = torch.autograd.grad(want_loss, params)
    assert units == float(mask.sum()) and loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert sums["vf_loss"] == pytest.approx(vl.mean().item() * units, rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    names = [n for n, p in ac.named_parameters() if p.requires_grad]
    assert got[names.index("critic.head.weight")].abs().sum() > 0  # the value loss reaches the head


def test_ratio_cap_bounds_the_step_loss_and_reports_the_ratios(tiny_dir):
    """Old log-probs 2 nats below the policy's: ρ = e² ≈ 7.39 on every token, A = -1 everywhere.
    PPO's per-token loss is -A·max(ρ, clip(ρ)) = e²; with ratio_cap=3 it is min(e², 3·|A|) = 3 and
    has no gradient. The step returns the loss summed over its units (tokens) and the metric sums."""
    from alignkit.algorithms.ppo.loop import make_step
    from alignkit.losses.ppo import FixedKLController

    ac, _, _ = build_actor_critic(ModelConfig(path=tiny_dir, lora=None), "full", None)
    batch = assemble([[10, 20, 30], [40]], [[50, 60], [70, 80, 90]], pad_id=258)
    mask = batch["response_mask"]
    with torch.no_grad():
        logp = ac.policy_logprobs(batch, 1.0)[0]
    mb = {**batch, "old_logp": logp - 2.0 * mask, "advantages": -mask.float(), "part": "policy"}
    e2, units = torch.tensor(2.0).exp().item(), float(mask.sum())
    for cap, per_token, over in ((3, 3.0, 1.0), (0, e2, 0.0), (8, e2, 0.0)):
        cfg = load_config(PPOConfig, None, ["algorithm=reinforce", f"ratio_cap={cap}"])
        loss, got_units, sums = make_step(ac, cfg, FixedKLController(0.05))(mb)
        assert got_units == units == 5.0 and loss.item() == pytest.approx(per_token * units, rel=1e-4)
        assert sums["ratio_max"] == pytest.approx(e2 * units, rel=1e-4) and sums["ratio_over_cap"] == over * units
        grads = torch.autograd.grad(loss, [p for p in ac.parameters() if p.requires_grad], allow_unused=True)
        assert (sum(g.abs().sum().item() for g in grads if g is not None) == 0) == (cap == 3)  # capped: no gradient
    with pytest.raises(ConfigError) as err:
        load_config(PPOConfig, None, ["ratio_cap=0.5"])
    assert str(err.value) == "ratio_cap must be 0 (off) or >= 1, not 0.5"


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce"])
def test_critic_free_variants_run(tiny_dir, tmp_path, algorithm):
    extra = ["sampling.n=2"] if algorithm != "reinforce" else \
        ["ptx.coef=0.5", "ptx.data.builtin=arithmetic", "ptx.data.arithmetic_examples=16"]  # PPO-ptx mixing too
    _, rows, _ = _run(tiny_dir, tmp_path / algorithm, f"algorithm={algorithm}", *extra)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == 0.0 and "vf_loss" not in rows[0] and "explained_variance" not in rows[0]
    assert ("kl_loss" in rows[0]) == (algorithm == "grpo")
    assert ("ptx_nll" in rows[0]) == (algorithm == "reinforce")


def test_lora_reference_is_the_base_and_adapters_are_isolated(tiny_dir):
    ac, _, _ = build_actor_critic(ModelConfig(path=tiny_dir, lora=LoraConfig(r=4, alpha=8)), "lora", "policy")
    base = tiny_model(0).eval()  # the weights save_tiny wrote
    batch = assemble([[10, 20, 30], [40]], [[50, 60], [70, 80, 90]], pad_id=258)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ac.named_parameters():  # make both adapters and the value head non-trivial
            if "lora_B" in name or "head" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
        from alignkit.algorithms.ppo.actor_critic import response_logprobs

        want = response_logprobs(base, batch)[0]
        assert torch.equal(ac.reference_logprobs(batch), want)
        policy = ac.policy_logprobs(batch)[0]
        assert not torch.allclose(policy, want, atol=1e-3)
        values = ac.values(batch)
        for name, p in ac.named_parameters():  # change only the critic adapter
            if "lora_B.critic" in name:
                p.add_(1.0)
        assert torch.equal(ac.policy_logprobs(batch)[0], policy)
        assert not torch.allclose(ac.values(batch), values)
        assert torch.equal(ac.reference_logprobs(batch), want)
    trainable = {n for n, p in ac.named_parameters() if p.requires_grad}
    assert any(".policy." in n for n in trainable) and any(".critic." in n for n in trainable)
    assert all("lora_" in n or n == "critic.head.weight" for n in trainable)


def test_resume_continues_exactly(tiny_dir, tmp_path):
    adaptive = ["kl.adaptive=true", "kl.target=0.01", "kl.horizon=100"]  # β moves every iteration: the checkpoint must keep it
    _, straight, _ = _run(tiny_dir, tmp_path / "straight", *adaptive, iterations=3)
    _run(tiny_dir, tmp_path / "cut", *adaptive, iterations=2)
    _, resumed, evals = _run(tiny_dir, tmp_path / "cut", *adaptive, "train.resume=true", iterations=3)
    assert [r["iteration"] for r in resumed] == [1, 2, 3]
    assert [e["eval/iteration"] for e in evals] == [0, 2, 3]  # the first run's rows, then iteration 3 only
    assert straight[2]["beta"] != straight[0]["beta"] and resumed[2]["beta"] == straight[2]["beta"]
    for key in ("reward", "kl", "pg_loss", "vf_loss", "response_length"):
        assert resumed[2][key] == pytest.approx(straight[2][key], abs=1e-6), key


def test_bf16_lora_keeps_the_fp32_base_in_the_saved_model(tiny_dir, tmp_path):
    # bf16: the frozen base is held in bf16 during training; the saved model must merge the
    # adapter into the original fp32 weights. With lr = 0 the adapter stays zero: saved == base.
    result, rows, _ = _run(tiny_dir, tmp_path / "bf16", "train.precision=bf16", "train.lr=0", iterations=1)
    assert rows[0]["kl"] == 0.0
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(result["final_model"]).state_dict()
    for name, tensor in tiny_model(0).state_dict().items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], tensor), name


def test_frozen_base_in_bf16_changes_no_number_under_autocast(tiny_dir):
    batch = assemble([[10, 20, 30], [40]], [[50, 60], [70, 80, 90]], pad_id=258)
    outs = []
    for frozen in (None, torch.bfloat16):
        ac, _, _ = build_actor_critic(ModelConfig(path=tiny_dir, lora=LoraConfig(r=4, alpha=8)), "lora", "policy",
                                      frozen_dtype=frozen)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for name, p in sorted(ac.named_parameters()):
                if "lora_B" in name or name == "critic.head.weight":
                    p.copy_(torch.randn(p.shape, generator=gen))
            outs.append((ac.policy_logprobs(batch)[0], ac.reference_logprobs(batch), ac.values(batch)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_ppo_raises_the_reward(tiny_dir, tmp_path):
    # The metric that should move: 16 iterations of 16 replies on the letter reward.
    _, rows, _ = _run(tiny_dir, tmp_path / "up", "memory=full", "train.lr=3e-3", "kl.beta=0.01", "prompts_per_iteration=16",
                      "sampling.max_new_tokens=16", "minibatch_size=8", "train.batch_size=8", "prompts.heldout=0", "samples_every=0",
                      iterations=16)
    first = sum(r["reward"] for r in rows[:4]) / 4
    last = sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 1.0, (first, last)
    assert rows[-1]["kl"] > rows[0]["kl"]


def test_early_stopping_and_runaway_warnings(caplog):
    from alignkit.algorithms.ppo.common import early_stop, warn_runaway

    state = {"best": None, "bad_evals": 0, "first_length": None}
    assert not early_stop({"reward": -1.0}, state, patience=2)  # the baseline evaluation
    assert not early_stop({"reward": -0.5}, state, patience=2) and state["best"] == -0.5
    assert not early_stop({"reward": -0.6}, state, patience=2) and state["bad_evals"] == 1
    assert early_stop({"reward": -0.5}, state, patience=2)  # not better than the best: second strike
    assert not early_stop({}, state, patience=2)  # no held-out prompts: never stops
    with caplog.at_level("WARNING", logger="alignkit"):
        warn_runaway({"iteration": 1, "kl": 1.0, "response_length": 10.0, "truncated_frac": 0.0}, state, warn_kl=20)
        assert not caplog.records
        warn_runaway({"iteration": 2, "kl": 25.0, "response_length": 21.0, "truncated_frac": 0.9}, state, warn_kl=20)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "KL to the reference is 25.0" in messages and "replies are getting long" in messages


def test_a_run_that_fails_mid_loop_closes_its_trackers(tiny_dir, tmp_path, monkeypatch):
    """A reward that raises in iteration 2: the error reaches the caller and the run's tracker
    (a stand-in for wandb: init() -> run with log() and finish()) is finished, as fit does."""
    import sys
    import types

    runs = []

    def init(**kwargs):
        run_ = types.SimpleNamespace(logged=[], finished=0)
        run_.log = lambda metrics, step: run_.logged.append(step)
        run_.finish = lambda: setattr(run_, "finished", run_.finished + 1)
        runs.append(run_)
        return run_

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    calls = []

    def reward(prompts, responses):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("reward server went away")
        return lowercase_letters(prompts, responses)

    cfg = load_config(PPOConfig, None, [
        f"model.path={tiny_dir}", f"train.output_dir={tmp_path}", "iterations=3", "prompts_per_iteration=2", "sampling.n=2",
        "sampling.max_new_tokens=4", "minibatch_size=4", "train.batch_size=4", "ppo_epochs=1", "prompts.train=8",
        "prompts.heldout=0", "eval.every=0", "train.threads=1", "train.trackers=[wandb]"])
    with pytest.raises(RuntimeError, match="reward server went away"):
        run(cfg, reward_fn=reward)
    (tracker,) = runs
    assert tracker.finished == 1 and tracker.logged  # iteration 1 was logged, then the tracker was closed


def test_skipped_rows_of_the_prompts_and_ptx_files_are_listed(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in "abcdefghijklmnopqrstu")
                       + '{"prompt": 7}\n')
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n" + '{"prompt": "Hi"\n')
    _run(tiny_dir, tmp_path / "run", "prompts.source=prompts", f"prompts.path={prompts}", "prompts.on_invalid=skip",
         "ptx.coef=0.1", f"ptx.data.path={sft}", "ptx.data.on_invalid=skip", "ptx.data.eval_fraction=0", iterations=1)
    rows = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rows] == [(str(prompts), 22), (str(sft), 2)]
