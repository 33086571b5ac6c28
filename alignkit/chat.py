"""`alignkit chat MODEL_DIR`: talk to a model in the terminal.

Replies stream token by token (`transformers`' `TextStreamer` over `generate`); the
conversation so far is the prompt of each turn, rendered by the tokenizer's chat template.
Lines starting with `/` are commands: `/reset` clears the history, `/system TEXT` sets the
system prompt (and clears the history), `/help`, `/quit` (or end of input). `--prompt` runs one
turn without a terminal. `--reward RM_DIR` prints each reply's reward (a directory `alignkit rm`
wrote).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import torch
from transformers import TextStreamer

from alignkit.data.chat import prompt_text
from alignkit.data.records import Message
from alignkit.models.load import ModelConfig, ModelError, load_model
from alignkit.precision import resolve_precision
from alignkit.rewards.model import RewardModel
from alignkit.rollout.base import SamplingParams

HELP = "/reset: clear the history · /system TEXT: set the system prompt (clears the history) · /quit: leave"


class Chat:
    """A conversation with one model: `reply(text, stream)` adds a user turn and the model's reply."""

    def __init__(self, model, tokenizer, params: SamplingParams, system: str | None = None, reward: RewardModel | None = None,
                 precision: str = "fp32"):
        self.model, self.tokenizer, self.params, self.reward = model.eval(), tokenizer, params, reward
        self.system, self.history = system, []
        self.autocast = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else nullcontext()
        if params.seed is not None:
            torch.manual_seed(params.seed)

    def messages(self) -> tuple[Message, ...]:
        return ((Message("system", self.system),) if self.system else ()) + tuple(self.history)

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system or None

    def reply(self, text: str, stream=None) -> tuple[str, float | None]:
        """The model's reply to `text` after the history (streamed to `stream` when given), and
        its reward when a reward model is set. Both turns join the history."""
        self.history.append(Message("user", text))
        prompt = prompt_text(self.tokenizer, self.messages())
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        p = self.params
        options = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k) if p.temperature > 0 \
            else dict(do_sample=False)
        streamer = _Streamer(self.tokenizer, stream) if stream is not None else None
        with torch.no_grad(), self.autocast:
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_new_tokens,
                                      streamer=streamer, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **options)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        prompt_turns = self.messages()
        self.history.append(Message("assistant", answer))
        score = self.reward.score_conversations([prompt_turns], [answer])[0] if self.reward is not None else None
        return answer, score


class _Streamer(TextStreamer):
    """TextStreamer writing to a chosen stream (flushed as each piece arrives)."""

    def __init__(self, tokenizer, stream):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alignkit chat", description="Talk to a model in the terminal.", epilog=HELP)
    ap.add_argument("model", help="a model directory (one alignkit wrote, any local Hugging Face directory) or 'default'")
    ap.add_argument("--prompt", help="one turn without a terminal: print the reply and leave")
    ap.add_argument("--system", help="the system prompt")
    ap.add_argument("--reward", help="a reward-model directory: show each reply's reward")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    ap.add_argument("--seed", type=int, help="seed for reproducible replies")
    ap.add_argument("--precision", default="auto", choices=("fp32", "bf16", "auto"),
                    help="bf16 autocast where the CPU computes it natively (auto, the default), else fp32")
    return ap


def _show(score: float | None) -> None:
    if score is not None:
        print(f"[reward {score:+.4f}]", flush=True)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        params = SamplingParams(n=1, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
        model, tokenizer, _ = load_model(ModelConfig(path=args.model), train=False)
        reward = RewardModel.from_pretrained(args.reward) if args.reward else None
    except (ValueError, ModelError, FileNotFoundError) as err:
        print(f"alignkit chat: error: {err}", file=sys.stderr)
        return 1
    chat = Chat(model, tokenizer, params, args.system, reward, resolve_precision(args.precision))
    if args.prompt is not None:
        _, score = chat.reply(args.prompt, stream=sys.stdout)
        _show(score)
        return 0
    print(f"Chatting with {args.model}. {HELP}", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                chat.reset()
                print("(history cleared)", flush=True)
            elif command == "/system":
                chat.reset(system=rest.strip())
                print(f"(system prompt {'set' if rest.strip() else 'removed'}; history cleared)", flush=True)
            else:
                print(HELP, flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            _, score = chat.reply(line, stream=sys.stdout)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            chat.history = chat.history[:-1]
            print("\n(reply interrupted)", flush=True)
            continue
        _show(score)
