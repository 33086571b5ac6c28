"""The transformers internals the generator relies on (module docstring of alignkit/rollout/hf.py)
exist and behave as it assumes. A newer transformers that changes one fails here, with the name
of the internal and the installed version, rather than as wrong samples or a slow fallback."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import transformers

from alignkit.models.tiny import tiny_model, tiny_tokenizer

VERSION = transformers.__version__


def _broken(internal: str, detail: str):
    pytest.fail(f"transformers {VERSION} changed {internal}, which alignkit/rollout/hf.py relies on: {detail}. "
                "Adapt the generator (or pin transformers below this version in pyproject.toml).", pytrace=False)


def _require(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        _broken(f"{module}.{name}", f"cannot import it ({error})")


def _accepts(internal: str, fn, *args) -> None:
    try:
        inspect.signature(fn).bind(*args)
    except TypeError as error:
        _broken(internal, f"signature {inspect.signature(fn)} does not take {len(args) - 1} argument(s) ({error})")


def _kv(rows: int, positions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, positions, 4, generator=g), torch.randn(rows, 2, positions, 4, generator=g)


def test_imports():
    for module, name in [("transformers", "DynamicCache"), ("transformers.cache_utils", "DynamicLayer"),
                         ("transformers", "AttentionInterface"), ("transformers.masking_utils", "AttentionMaskInterface"),
                         ("transformers.masking_utils", "sdpa_mask"),
                         ("transformers.integrations.sdpa_attention", "sdpa_attention_forward")]:
        _require(module, name)


def test_dynamic_layer_members_and_behaviour():
    DynamicLayer = _require("transformers.cache_utils", "DynamicLayer")
    for name, args in [("lazy_initialization", ("k", "v")), ("update", ("k", "v")), ("get_seq_length", ()),
                       ("batch_repeat_interleave", (2,)), ("batch_select_indices", ("index",)),
                       ("reorder_cache", ("index",)), ("crop", (-1,)), ("reset", ())]:
        if not callable(getattr(DynamicLayer, name, None)):
            _broken(f"DynamicLayer.{name}", "no such method")
        _accepts(f"DynamicLayer.{name}", getattr(DynamicLayer, name), None, *args)
    layer = DynamicLayer()  # _BufferLayer.__init__ calls it without arguments
    if getattr(layer, "is_initialized", None) is not False:
        _broken("DynamicLayer.is_initialized", f"a new layer has is_initialized={getattr(layer, 'is_initialized', '<missing>')!r}, not False")
    k, v = _kv(3, 5)
    keys, values = layer.update(k, v)
    if not (layer.is_initialized and torch.equal(keys, k) and torch.equal(values, v)):
        _broken("DynamicLayer.update", "the first update does not initialize the layer and return the states given")
    if not (torch.equal(layer.keys, k) and torch.equal(layer.values, v)):
        _broken("DynamicLayer.keys/values", "they do not hold the cached states [rows, heads, positions, dim]")
    layer.keys, layer.values = k[:, :, :2], v[:, :, :2]  # _BufferLayer keeps them as views of its buffers
    if layer.get_seq_length() != 2:
        _broken("DynamicLayer.get_seq_length", "it does not read the length from `keys`")


def test_dynamic_cache_of_a_config_is_plain_layers_and_forwards_batch_operations():
    DynamicCache, DynamicLayer = _require("transformers", "DynamicCache"), _require("transformers.cache_utils", "DynamicLayer")
    from alignkit.rollout.hf import _BufferLayer

    config = tiny_model(0).config
    try:
        cache = DynamicCache(config=config)
    except TypeError as error:
        _broken("DynamicCache(config=...)", f"it does not take a config ({error})")
    kinds = [type(layer) for layer in getattr(cache, "layers", [])]
    if kinds != [DynamicLayer] * config.num_hidden_layers:
        _broken("DynamicCache(config=...).layers", f"a full-attention model's cache has layers {kinds}, not "
                f"{config.num_hidden_layers} DynamicLayer (the generator would fall back to a cache without buffers)")
    cache.layers = [_BufferLayer(capacity=8, rows=4) for _ in cache.layers]
    for i, layer in enumerate(cache.layers):
        layer.update(*_kv(2, 3, seed=i))
    index = torch.tensor([1, 0, 1])
    want = [layer.keys.index_select(0, index) for layer in cache.layers]
    cache.batch_select_indices(index)
    if not all(torch.equal(layer.keys, w) for layer, w in zip(cache.layers, want)):
        _broken("Cache.batch_select_indices", "it does not call each layer's batch_select_indices")
    want = [layer.keys.repeat_interleave(2, dim=0) for layer in cache.layers]
    cache.batch_repeat_interleave(2)
    if not all(torch.equal(layer.keys, w) for layer, w in zip(cache.layers, want)):
        _broken("Cache.batch_repeat_interleave", "it does not call each layer's batch_repeat_interleave")


def test_model_forward_fills_the_generator_cache():
    from alignkit.rollout.hf import HFGenerator, _BufferLayer, cache_keyword

    model = tiny_model(0).eval()
    parameters = inspect.signature(type(model).forward).parameters
    kw = cache_keyword(model)
    for name in (kw, "logits_to_keep", "position_ids", "attention_mask", "use_cache"):
        if name not in parameters:
            _broken(f"{type(model).__name__}.forward", f"no argument {name!r}")
    cache = HFGenerator(model, tiny_tokenizer())._new_cache(capacity=16, rows=2)
    if not all(type(layer) is _BufferLayer for layer in cache.layers):
        _broken("DynamicCache(config=...).layers", "the generator's cache did not get its buffer layers")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        out = model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
        if getattr(out, kw, None) is not cache:
            _broken(f"the forward's output field {kw!r}", "it is not the cache passed in")
        if tuple(out.logits.shape) != (2, 1, model.config.vocab_size):
            _broken("logits_to_keep", f"logits_to_keep=1 gave logits {tuple(out.logits.shape)}")
        if cache.get_seq_length() != 4 or cache.layers[0].keys.shape[:3] != (2, model.config.num_key_value_heads, 4):
            _broken("DynamicCache.update", "the model's keys/values did not go through the layers' update")
        step = model(input_ids=torch.tensor([[13], [14]]), position_ids=torch.tensor([[4], [4]]),
                     **{kw: cache}, use_cache=True).logits[:, -1]
        full = model(input_ids=torch.cat([ids, torch.tensor([[13], [14]])], dim=1)).logits[:, -1]
    if not torch.allclose(step, full, atol=1e-5):
        _broken("the cache's use by the model", "a step on the buffered cache differs from a full forward pass")


def test_attention_modules_know_their_layer_and_registered_attention_runs():
    from alignkit.rollout import decode_attention as da

    model = tiny_model(0).eval()
    if model.config._attn_implementation != "sdpa":
        _broken("config._attn_implementation", f"the default is {model.config._attn_implementation!r}, not 'sdpa'")
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    if [getattr(m, "layer_idx", None) for m in attention] != list(range(model.config.num_hidden_layers)):
        _broken("the attention modules' layer_idx", "the shared root is looked up by it (decode_attention._root_of)")
    calls = []
    real = da.single_query_attention
    AttentionInterface = _require("transformers", "AttentionInterface")
    AttentionInterface.register(da.NAME, lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        with torch.no_grad(), da.decode_attention(model):
            model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        AttentionInterface.register(da.NAME, real)
    if len(calls) != model.config.num_hidden_layers:
        _broken("AttentionInterface.register / config._attn_implementation",
                f"the registered attention ran {len(calls)} times for {model.config.num_hidden_layers} layers")
