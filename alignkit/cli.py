"""Command line: `alignkit <command> [recipe.yaml] [key=value ...] [--resume]`."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
import typing

from alignkit.config import ConfigError, defaults, describe, load_config
from alignkit.engine import distributed
from alignkit.engine.allocator import tune_malloc
from alignkit.engine.config import Resumable
from alignkit.engine.trainer import NonFiniteError

# command -> (module, config class, run function, one-line description)
COMMANDS = {
    "sft": ("alignkit.algorithms.sft", "SFTConfig", "run", "supervised fine-tuning (Llama 2 style, packed, Flan-style mixtures)"),
    "eval": ("alignkit.algorithms.evaluate", "EvalConfig", "run_eval", "arithmetic accuracy of a model (greedy, verifier)"),
    "generate": ("alignkit.algorithms.evaluate", "GenerateConfig", "run_generate", "sample completions for prompts"),
    "rm": ("alignkit.algorithms.reward_model", "RMConfig", "run", "train a reward model on preference pairs or rankings (Llama 2 margins)"),
    "rm-eval": ("alignkit.eval.reward_eval", "RMEvalConfig", "run", "reward-model accuracy by rating, margin and calibration"),
    "score": ("alignkit.algorithms.score_rows", "ScoreConfig", "run", "score {prompt, response} rows with a reward model or the combined reward"),
    "ppo": ("alignkit.algorithms.ppo.loop", "PPOConfig", "run", "RLHF with PPO, or critic-free REINFORCE / RLOO / GRPO (algorithm=...)"),
    "dpo": ("alignkit.algorithms.dpo", "DPOConfig", "run", "direct preference optimisation (DPO, conservative DPO, IPO) on pairs"),
    "rrhf": ("alignkit.algorithms.rrhf", "RRHFConfig", "run", "RRHF: rank k scored responses by log-probability, plus SFT on the best"),
    "make-pairs": ("alignkit.algorithms.make_pairs", "MakePairsConfig", "run", "correct/incorrect answer pairs from a model on arithmetic problems"),
    "best-of-n": ("alignkit.algorithms.sampling.best_of_n", "BestOfNConfig", "run", "best-of-N sampling: reward vs N and temperature, KL bound (Llama 2 Fig. 7/8)"),
    "rs": ("alignkit.algorithms.sampling.rejection_sampling", "RSConfig", "run", "Llama 2 rejection-sampling fine-tuning (best of K, pooled over iterations)"),
    "raft": ("alignkit.algorithms.sampling.raft", "RAFTConfig", "run", "RAFT: reward-ranked fine-tuning, local or global selection, online or offline"),
    "rft": ("alignkit.algorithms.sampling.rft", "RFTConfig", "run", "RFT: fine-tune on distinct correct reasoning paths (union of sampler models)"),
    "rest-em": ("alignkit.algorithms.sampling.rest_em", "RestEMConfig", "run", "ReST-EM: sample, keep correct, fine-tune the base model; pass@k, maj@k"),
    "rest": ("alignkit.algorithms.sampling.rest", "RestConfig", "run", "ReST: Grow (sample) then Improve steps at rising reward thresholds"),
    "pipeline": ("alignkit.algorithms.pipeline.llama2_chat", "PipelineConfig", "run", "the Llama 2-Chat loop as one resumable run: SFT, iterative RMs, rejection sampling, PPO, GAtt, evaluation"),
    "flan-study": ("alignkit.algorithms.flan_study", "FlanStudyConfig", "run", "Flan-style study: held-out task families vs number of training tasks, with/without CoT data"),
}

# commands that train data-parallel when launched as several processes (torchrun, accelerate launch)
DATA_PARALLEL = ("sft", "rm", "dpo", "rs", "raft", "rft", "rest", "rest-em", "ppo")

# tools that take their own arguments (argparse) instead of a recipe: name -> (module with main(argv), description)
TOOLS = {
    "chat": ("alignkit.chat", "talk to a model in the terminal (alignkit chat MODEL_DIR [--prompt TEXT] [--reward RM_DIR])"),
    "report": ("alignkit.report.command", "one HTML page (and Markdown) of one run or a comparison of runs "
                                          "(alignkit report RUN_DIR ... -o report.html [--markdown report.md])"),
}

USAGE = """usage: alignkit <command> [recipe.yaml] [key=value ...] [--resume]
       alignkit <command> --help        list the command's keys with defaults
       alignkit models prepare          convert the default model (SmolLM2-135M-Instruct) once

commands:
{commands}
  models       prepare the default model

Recipes are YAML files of the command's keys (see recipes/); key=value overrides use dotted
keys, e.g. train.lr=1e-5 model.path=/models/my-sft. Unknown keys are errors."""


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {c.ljust(width)}   {d}" for c, (_, _, _, d) in COMMANDS.items()]
    lines += [f"  {c.ljust(width)}   {d}" for c, (_, d) in TOOLS.items()]
    return USAGE.format(commands="\n".join(lines))


def _models(args: list[str]) -> int:
    from alignkit.models.load import prepare_default_model

    if args[:1] != ["prepare"]:
        print("usage: alignkit models prepare [--force]", file=sys.stderr)
        return 2
    print(prepare_default_model(force="--force" in args))
    return 0


def resumable(cls: type) -> bool:
    """Whether a command's config can continue a killed run: its `train` section is Resumable."""
    train = typing.get_type_hints(cls).get("train") if dataclasses.is_dataclass(cls) else None
    return isinstance(train, type) and issubclass(train, Resumable)


def _message(err: BaseException) -> str:
    """An error as the one line (or list of problems) a user reads: an OSError from the system
    (a full disk, a permission) as 'path: reason', without Python's errno prefix."""
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{where}: {err.strerror}" if where else err.strerror
    return str(err)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "models":
        return _models(rest)
    if command in TOOLS:
        return importlib.import_module(TOOLS[command][0]).main(rest)
    if command not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(command, [*COMMANDS, *TOOLS, "models"], n=1)
        print(f"alignkit: unknown command '{command}'" + (f"; did you mean '{near[0]}'?" if near else ""), file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    if distributed.world_size() > 1 and command not in DATA_PARALLEL:
        print(f"alignkit {command}: error: runs in one process; data-parallel launches (torchrun, accelerate launch) "
              f"support {', '.join(DATA_PARALLEL)}", file=sys.stderr)
        return 2
    module_name, cls_name, fn_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    if "-h" in rest or "--help" in rest:
        print(f"alignkit {command} [recipe.yaml] [key=value ...]\n\nkeys:")
        print("\n".join(describe(defaults(cls))))
        return 0
    recipe = rest[0] if rest and rest[0].endswith((".yaml", ".yml")) else None
    overrides = [a for a in rest[1 if recipe else 0:] if a != "--resume"]
    if "--resume" in rest and getattr(cls, "RESUMES_ON_RERUN", False):
        rest = [a for a in rest if a != "--resume"]  # a re-run resumes by itself
    if "--resume" in rest:
        if not resumable(cls):
            print(f"alignkit {command}: error: --resume: {command} cannot resume a run (it writes no checkpoints); "
                  "start it again", file=sys.stderr)
            return 2
        overrides.append("train.resume=true")
    unknown = [a for a in overrides if "=" not in a]
    if unknown:
        print(f"alignkit: '{unknown[0]}' is neither a recipe (.yaml) nor a key=value override", file=sys.stderr)
        return 2
    try:
        cfg = load_config(cls, recipe, overrides)
        tune_malloc()
        result = getattr(module, fn_name)(cfg)
    except (ConfigError, ValueError, OSError, NonFiniteError) as err:
        if os.environ.get("ALIGNKIT_DEBUG"):
            raise
        print(f"alignkit {command}: error: {_message(err)}", file=sys.stderr)
        return 1
    if distributed.is_main():  # one result, from the process that wrote the outputs
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
