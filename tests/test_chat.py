"""`alignkit chat`: the conversation is the prompt of each turn, `--prompt` answers once (with the
reward model's score of the reply), and the interactive chat works in a real pseudo-terminal."""

import sys

import pytest

from alignkit.chat import Chat, main
from alignkit.data.chat import prompt_text
from alignkit.data.records import Message
from alignkit.models.load import ModelConfig, load_model, save_model
from alignkit.models.tiny import save_tiny
from alignkit.rewards.model import RewardModel, load_reward_model
from alignkit.rollout.base import SamplingParams

GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    model, tok, _ = load_reward_model(ModelConfig(path=tiny_dir), seed=1)
    return str(save_model(model, tok, tmp_path_factory.mktemp("rm") / "rm"))


def test_each_turn_is_prompted_with_the_whole_conversation(tiny_dir):
    model, tok, _ = load_model(ModelConfig(path=tiny_dir), train=False)
    chat = Chat(model, tok, GREEDY, system="Be brief.")
    first, _ = chat.reply("What is 2 + 2?")
    seen = []
    real_generate = model.generate
    model.generate = lambda ids, **kw: seen.append(tok.decode(ids[0])) or real_generate(ids, **kw)
    second, _ = chat.reply("And 3 + 3?")
    history = (Message("system", "Be brief."), Message("user", "What is 2 + 2?"), Message("assistant", first),
               Message("user", "And 3 + 3?"))
    assert seen == [prompt_text(tok, history)]
    assert chat.messages() == history + (Message("assistant", second),)
    chat.reset()
    assert chat.messages() == (Message("system", "Be brief."),)
    chat.reset(system="")
    assert chat.messages() == ()


def test_one_turn_prints_the_reply_and_its_reward(tiny_dir, rm_dir, capsys):
    assert main([tiny_dir, "--prompt", "What is 12 + 30?", "--temperature", "0", "--max-new-tokens", "6",
                 "--reward", rm_dir, "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    model, tok, _ = load_model(ModelConfig(path=tiny_dir), train=False)
    reply, _ = Chat(model, tok, GREEDY).reply("What is 12 + 30?")
    score = RewardModel.from_pretrained(rm_dir).score_conversations([(Message("user", "What is 12 + 30?"),)], [reply])[0]
    assert out.endswith(f"[reward {score:+.4f}]\n")
    assert reply in out


def test_bad_options_and_a_missing_model_are_one_error_line(tiny_dir, tmp_path, capsys):
    assert main([tiny_dir, "--prompt", "hi", "--top-p", "1.5"]) == 1
    assert "alignkit chat: error: SamplingParams.top_p must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--prompt", "hi"]) == 1
    assert capsys.readouterr().err.startswith("alignkit chat: error: ")


def test_interactive_chat_in_a_pseudo_terminal(tiny_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "alignkit.cli", "chat", tiny_dir, "--max-new-tokens", "4", "--seed", "0",
                                           "--precision", "fp32"], encoding="utf-8", timeout=120)
    try:
        child.expect_exact("Chatting with")
        child.expect_exact("you> ")
        child.sendline("Hello there")
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")
        child.sendline("/system Answer in French.")
        child.expect_exact("(system prompt set; history cleared)")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(history cleared)")
        child.expect_exact("you> ")
        child.sendline("/nonsense")
        child.expect_exact("/reset: clear the history")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
