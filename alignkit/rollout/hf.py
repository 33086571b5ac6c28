"""Sampling with a plain Hugging Face model: alignkit's own decoding loop over `model(...)`.

What makes it cheaper than `model.generate(num_return_sequences=n)`:
- each prompt is prefilled once for its n samples, instead of prefilling n copies;
- samples that have drawn the same tokens so far are decoded as one row of the batch (a node):
  their next-token distribution is the same, so one forward pass serves them all, and each
  sample still draws its own token from it (exact, independent samples). A node splits, its
  cache row copied (`Cache.batch_select_indices`), when its samples draw different tokens. So
  a decoding step costs the distinct prefixes, not the samples: a policy that starts its
  replies the same way (restating the question, a fixed format) decodes that part once;
- a prefix that all prompts of a batch share (the system prompt of a chat template, a task's
  fixed wording, few-shot exemplars) is prefilled once for the whole batch (`_shared_root`),
  and its keys/values are kept once, not copied into every row (`_BufferLayer.split_root`,
  added by the decoding attention: `decode_attention.shared_root`);
- finished samples leave the running batch (nodes without a running sample are dropped from the
  cache in place) as soon as the decoding they would still cost outweighs the copy (`COMPACT_AFTER`), so
  little compute is spent after eos, and left-padding columns that no running row needs any
  more are cut from the cache;
- the lm head runs only on the last prompt position; stop strings are checked on the last few
  tokens only; optional bf16 autocast (`dtype=torch.bfloat16`);
- in fp32 on an x86 CPU the linears run through oneDNN on weights reordered at the start of
  each call (`packed_linear`), not through MKL's sgemm on the weights as stored.

Conventions:
- `Completion.token_ids` includes the eos id when generation ended on eos (a policy trained on
  the completion must learn to stop), and includes the tokens that spell a stop string, while
  `Completion.text` is cut before the stop string.
- `Completion.logprobs[i]` is log p(token_i | prefix) under the model's *untempered*
  distribution (plain log-softmax of the logits, before temperature, top-k and top-p): the
  quantity a policy-gradient loss compares against. Training recomputes it anyway.
- Sampling uses a `torch.Generator` seeded from `SamplingParams.seed`: the same seed, prompts,
  params and batch size give the same completions (no seed: a fresh random seed per call).

transformers internals this relies on (pyproject.toml bounds the version to those it is known to
work with; tests/test_transformers_internals.py names the one that changed when a newer release
breaks it):
- the forward's cache argument, `cache` or (before 5.24) `past_key_values` (`cache_keyword`), and
  its `logits_to_keep`;
- `DynamicCache(config=...)` builds one `DynamicLayer` per full-attention layer in `cache.layers`,
  and `Cache.batch_select_indices` / `batch_repeat_interleave` act on every layer;
- `DynamicLayer`'s members that `_BufferLayer` overrides or uses: `keys` / `values` [rows, heads,
  positions, dim], `is_initialized`, `lazy_initialization(key_states, value_states)`,
  `update(key_states, value_states, ...)`, `get_seq_length`, `crop`, `reset`;
- for `decode_attention`: `AttentionInterface` / `AttentionMaskInterface` registration,
  `sdpa_attention_forward`, `sdpa_mask`, `config._attn_implementation` and each attention
  module's `layer_idx`.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alignkit.precision import native_bf16
from alignkit.models.forward import unwrap
from alignkit.rollout.base import Completion, SamplingParams, encode_prompts
from alignkit.rollout.decode_attention import NAME as DECODE_ATTENTION
from alignkit.rollout.decode_attention import decode_attention, shared_root
from alignkit.rollout.merged import MergedTwin
from alignkit.rollout.packed_linear import packed_linears

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # bf16 where it runs natively (precision.py), else no autocast
        return torch.bfloat16 if native_bf16() else None
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be None, a torch.dtype, 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")


# Finished rows leave the decoding batch (a copy of the KV cache of the rows that stay) once the
# decoding steps they would still cost, dead rows × steps left, reach this many batch-steps: a
# compaction costs about half a decoding step of the whole batch.
COMPACT_AFTER = 0.5


def cache_keyword(model) -> str:
    """The name of the KV-cache argument (and output field) of the model's forward: transformers
    5.24 renamed `past_key_values` to `cache` (the old name warns, and is to go in 5.40)."""
    forward = type(unwrap(model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class HFGenerator:
    """A `Generator` over any causal LM that `transformers` runs (peft-wrapped models included).

    batch_size: prompts prefilled together; each contributes `n` rows to the decoding batch,
        so up to batch_size * n sequences are decoded at once.
    dtype: autocast dtype for the forward passes (e.g. torch.bfloat16 or "bf16"); None or
        float32 runs the model in its own dtype.
    merge_lora: decode a LoRA-wrapped model through a plain twin with merged weights
        (`rollout.merged.MergedTwin`, refreshed at every `generate` call, so it always samples the
        adapters as they are now): one matrix product per linear instead of three.
    max_rows: when set, each batch takes max_rows // n prompts instead (at least one), so a
        greedy pass (n=1) decodes as many rows at once as a sampling pass does.
    share_prefixes: samples of a prompt that have drawn the same tokens so far decode as one row
        (module docstring); False decodes every sample in its own row: the same samples, more
        compute (for A/B runs).
    pack_linears: in fp32 on an x86 CPU, the linears run through oneDNN on reordered weights
        (`packed_linear`); False runs `F.linear` (for A/B runs).
    progress: None (silent), or a callable that `generate` calls after each decoded batch with
        the number of prompts it held (a progress bar's `update`); it changes nothing sampled.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, dtype=None, merge_lora: bool = True,
                 max_rows: int | None = None, *, share_prefixes: bool = True, pack_linears: bool = True, progress=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be None or an integer >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        self.share_prefixes, self.pack_linears = share_prefixes, pack_linears
        self.progress = progress
        self.model = model
        self.twin = MergedTwin.of(model) if merge_lora else None
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.dtype = _resolve_dtype(dtype)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token")
        self.pad_id = int(pad)
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.model, "generation_config", None)
        extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if isinstance(extra, int):
            ids.add(extra)
        elif extra is not None:
            ids.update(int(i) for i in extra)
        if not ids:
            raise ValueError("no eos token id: set tokenizer.eos_token or model.generation_config.eos_token_id")
        return sorted(ids)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        encoded = encode_prompts(self.tokenizer, prompts)
        if not encoded:
            return []
        prompts = list(prompts)

        device = self._device()
        gen = torch.Generator(device=device)
        if params.seed is None:
            gen.seed()
        else:
            gen.manual_seed(params.seed)

        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        results: list[list[Completion] | None] = [None] * len(prompts)
        model = self.twin.refresh() if self.twin is not None else self.model
        was_training = model.training
        model.eval()
        if self.dtype is not None and self.dtype != torch.float32:
            # no_grad rather than inference_mode here: autocast caches the low-precision copy of
            # each weight only outside inference mode; inside it, every step would re-cast them.
            grad_off, autocast = torch.no_grad(), torch.autocast(device_type=device.type, dtype=self.dtype)
        else:
            grad_off, autocast = torch.inference_mode(), nullcontext()
        try:
            linears = packed_linears(model) if self.pack_linears else nullcontext()
            with grad_off, autocast, decode_attention(model), linears:
                per_batch = self.batch_size if self.max_rows is None else max(1, self.max_rows // params.n)
                for start in range(0, len(order), per_batch):
                    chunk = order[start:start + per_batch]
                    outs = self._generate_batch(model, [encoded[i] for i in chunk], params, gen, device)
                    for j, i in enumerate(chunk):
                        results[i] = [
                            Completion(i, s, text, ids, reason, lps)
                            for s, (text, ids, reason, lps) in enumerate(outs[j * params.n:(j + 1) * params.n])
                        ]
                    if self.progress is not None:
                        self.progress(len(chunk))
        finally:
            model.train(was_training)
        return [c for per_prompt in results for c in per_prompt]

    # ------------------------------------------------------------------ internals
    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _new_cache(self, capacity: int, rows: int):
        """A DynamicCache; when every layer is plain full attention, its layers write into
        buffers sized for the whole generation (`capacity` positions, `rows` rows) instead of
        concatenating at every step."""
        config = getattr(self.model, "config", None)
        try:
            cache = DynamicCache(config=config) if config is not None else DynamicCache()
        except Exception:  # configs that the layer-type inference does not understand
            return DynamicCache()
        if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [_BufferLayer(capacity, rows) for _ in cache.layers]
        return cache

    def _generate_batch(self, model, batch_ids: list[list[int]], params: SamplingParams, gen, device):
        """Decode n samples for each prompt of the batch; returns rows in prompt-major order.
        Rows are samples; nodes are cache rows, one per distinct prefix (module docstring)."""
        n, B = params.n, len(batch_ids)
        root = _shared_root(batch_ids) if B > 1 else 0
        cache = self._new_cache(max(len(ids) for ids in batch_ids) + params.max_new_tokens, B * n)
        kw = cache_keyword(model)
        with shared_root(cache):  # a root split off by the prefill is found by the attention there
            nodes = self._prefill(model, kw, cache, batch_ids, root, device)
            node = torch.arange(B, device=device).repeat_interleave(n)  # node of each running row
            if not self.share_prefixes and n > 1:  # every sample its own node from the start
                nodes.select(node)
                nodes.logits, node = nodes.logits[node], torch.arange(B * n, device=device)
            samples = _Samples(B * n, params, torch.tensor(self.eos_ids, device=device), self.tokenizer)
            running = list(range(B * n))  # the sample of each running row
            for step in range(params.max_new_tokens):
                nxt = _sample(nodes.logits, params, gen, node)
                lps = _logprobs(nodes.logits, node, nxt) if params.logprobs else None
                done = samples.add(running, nxt, lps)
                if step == params.max_new_tokens - 1 or bool(done.all()):
                    break
                if bool(done.any()):  # ended samples leave the running rows
                    keep = (~done).nonzero().squeeze(1)
                    running = [running[j] for j in keep.tolist()]
                    node, nxt = node[keep], nxt[keep]
                node, step_ids = self._regroup(nodes, node, nxt, steps_left=params.max_new_tokens - 1 - step)
                nodes.advance(model, kw, step_ids)
        logps = samples.logps if samples.logps is not None else [None] * (B * n)
        return [self._finish(samples.tokens[r], samples.reasons[r], logps[r], params.stop) for r in range(B * n)]

    def _prefill(self, model, kw: str, cache, batch_ids: list[list[int]], root: int, device) -> _Nodes:
        """Run the prompts through the model: one node per prompt, holding the logits of its last
        position. The prefix of `root` tokens that every prompt shares (a system prompt, a
        template, few-shot exemplars; `_shared_root`) is prefilled once and kept once for the
        rows (copied to each row when the attention cannot add it); the rest of each prompt
        follows it, left-padded, so padding columns sit between the shared part and the rest."""
        B = len(batch_ids)
        L = max(len(ids) for ids in batch_ids) - root
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, ids in enumerate(batch_ids):
            input_ids[b, L - len(ids) + root:] = torch.tensor(ids[root:], dtype=torch.long)
            mask[b, L - len(ids) + root:] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        if root:
            shared = torch.tensor([batch_ids[0][:root]], dtype=torch.long, device=device)
            cache = getattr(model(input_ids=shared, **{kw: cache}, use_cache=True, logits_to_keep=1), kw)
            if _splits_root(model, cache):  # kept once, the attention adds it (decode_attention)
                for layer in cache.layers:
                    layer.split_root(B)
            else:
                cache.batch_repeat_interleave(B)
            mask = torch.cat([mask.new_ones((B, root)), mask], dim=1)
        position_ids = ((mask.cumsum(-1) - 1).clamp_(min=0))[:, root:]
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                    **{kw: cache}, use_cache=True, logits_to_keep=1)
        return _Nodes(getattr(out, kw), mask, lengths=mask.sum(-1), logits=out.logits[:, -1, :])

    def _regroup(self, nodes: _Nodes, node: torch.Tensor, nxt: torch.Tensor, steps_left: int):
        """Split the nodes whose running rows drew different tokens `nxt`: the next nodes are one
        per distinct (node, token) of the running rows, in order. Returns the node of each running
        row and the token each cache row is fed next.

        Splitting copies cache rows. Without a split, cache rows left without running rows stay
        (fed padding) until the decoding they would still cost, dead rows x steps left, reaches
        COMPACT_AFTER batch-steps, which pays for the copy that drops them."""
        vocab = nodes.logits.shape[-1]
        pairs, child = torch.unique(node * vocab + nxt, return_inverse=True)
        parent, token = pairs // vocab, pairs % vocab
        count = nodes.mask.shape[0]  # cache rows now, some maybe without running rows
        split = bool((parent[1:] == parent[:-1]).any())
        if split or (count - parent.numel()) * steps_left >= COMPACT_AFTER * count:
            nodes.select(parent)
            nodes.crop_padding()
            return child, token
        step_ids = torch.full((count,), self.pad_id, dtype=token.dtype, device=token.device)
        step_ids[parent] = token
        return node, step_ids

    def _finish(self, ids: list[int], reason: str, lps, stops):
        body = ids[:-1] if ids and ids[-1] in self.eos_ids else ids
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if stops:
            cuts = [k for k in (text.find(s) for s in stops) if k >= 0]
            if cuts:
                text = text[:min(cuts)]
                reason = "stop"
        return text, ids, reason, lps


@dataclass
class _Nodes:
    """The cache rows of a decoding batch (nodes), one per distinct prefix of the running samples."""

    cache: DynamicCache
    mask: torch.Tensor  # [nodes, columns]: 1 for a node's tokens, 0 for padding
    lengths: torch.Tensor  # [nodes]: position id of each node's next token
    logits: torch.Tensor  # [nodes, vocab]: each node's next-token logits, in the model's dtype

    def select(self, index: torch.Tensor) -> None:
        """Keep cache rows `index` (a row named more than once: a prefix whose samples split)."""
        self.cache.batch_select_indices(index)
        self.mask, self.lengths = self.mask[index], self.lengths[index]

    def crop_padding(self) -> None:
        """Drop leading columns that are padding for every node (none when a shared root leads
        every row)."""
        cut = int(self.mask.argmax(-1).min())  # rows are 0..0 1..1 (or 1..1 0..0 1..1)
        if cut > 0 and _crop_front(self.cache, cut):
            self.mask = self.mask[:, cut:]

    def advance(self, model, kw: str, step_ids: torch.Tensor) -> None:
        """One decoding step: feed each node its token `step_ids`; the logits that come out
        replace the node's."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        out = model(input_ids=step_ids[:, None], attention_mask=self.mask, position_ids=self.lengths[:, None],
                    **{kw: self.cache}, use_cache=True)
        self.cache = getattr(out, kw)
        self.logits = out.logits[:, -1, :]
        self.lengths = self.lengths + 1


class _Samples:
    """What each sample of a batch has drawn so far: its token ids, their log-probs (when asked
    for), and why it ended ("length" until it ends otherwise)."""

    def __init__(self, count: int, params: SamplingParams, eos: torch.Tensor, tokenizer):
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.logps: list[list[float]] | None = [[] for _ in range(count)] if params.logprobs else None
        self.reasons = ["length"] * count
        self.eos, self.stops, self.tokenizer = eos, params.stop, tokenizer
        # Tokens to re-decode when checking stop strings: every ordinary token is at least one byte.
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 2

    def add(self, running: list[int], nxt: torch.Tensor, lps: list[float] | None) -> torch.Tensor:
        """Append token `nxt[j]` (and its log-prob) to sample `running[j]`; returns which of them
        ended (bool [running]): on eos, or on a token that completes a stop string."""
        done = torch.isin(nxt, self.eos)
        for j, (r, token) in enumerate(zip(running, nxt.tolist())):
            self.tokens[r].append(token)
            if lps is not None:
                self.logps[r].append(lps[j])
        if self.stops:
            check = (~done).nonzero().squeeze(1).tolist()
            if check:
                tails = self.tokenizer.batch_decode([self.tokens[running[j]][-self.window:] for j in check],
                                                    skip_special_tokens=True)
                hit = [j for j, t in zip(check, tails) if any(s in t for s in self.stops)]
                if hit:
                    done[hit] = True
        for j in done.nonzero().squeeze(1).tolist():
            self.reasons[running[j]] = "stop"
        return done


class _BufferLayer(DynamicLayer):
    """A DynamicLayer that keeps keys/values in a buffer with room for `capacity` positions:
    a decoding step writes one column in place instead of copying the whole cache (`torch.cat`).
    `keys`/`values` are views of the filled part, so the rest of transformers sees a DynamicLayer.
    The rows of the decoding batch (distinct prefixes of the samples) grow as samples split, up
    to `rows` (prompts x n); the buffers then double their rows, up to that."""

    def __init__(self, capacity: int, rows: int = 0):
        super().__init__()
        self.capacity, self.rows = capacity, rows
        self._k = self._v = None  # the rows in use of the buffers _kb / _vb
        self._kb = self._vb = None
        self._start = self._end = 0
        self.root_keys = self.root_values = None  # a prefix every row shares, kept once [1, KV, P, D]

    def _allocate(self, like: torch.Tensor, rows: int, positions: int, room: int = 0) -> None:
        shape = (max(rows, room), like.shape[1], positions, like.shape[3])
        self._kb, self._vb = like.new_empty(shape), like.new_empty(shape)
        self._k, self._v = self._kb[:rows], self._vb[:rows]

    def split_root(self, rows: int) -> None:
        """Make the cached positions (one row: the batch's shared prefix) the shared root, and
        start empty buffers of `rows` rows for each row's own positions. The cache then returns
        those only; `decode_attention.shared_root` tells the attention where the root is."""
        self.root_keys, self.root_values = self.keys.clone(), self.values.clone()
        self._allocate(self._k, rows, max(1, self.capacity - self.root_keys.shape[2]))
        self._start = self._end = 0
        self._views()

    def get_seq_length(self) -> int:
        own = super().get_seq_length()
        return own if self.root_keys is None else own + self.root_keys.shape[2]

    def _views(self) -> None:
        self.keys = self._k[:, :, self._start:self._end]
        self.values = self._v[:, :, self._start:self._end]

    def _rebuild(self, fn) -> None:
        """Replace the buffers by fn(filled part), copied to the front of new buffers."""
        k, v = fn(self.keys), fn(self.values)
        self._allocate(k, k.shape[0], max(self.capacity, k.shape[2]))
        self._start, self._end = 0, k.shape[2]
        self._k[:, :, :self._end] = k
        self._v[:, :, :self._end] = v
        self._views()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
            self._rebuild(lambda t: t)
        length = key_states.shape[2]
        if self._end + length > self._k.shape[2]:  # out of room: grow (not expected)
            self.capacity = 2 * (self._end - self._start + length)
            self._rebuild(lambda t: t)
        self._k[:, :, self._end:self._end + length] = key_states
        self._v[:, :, self._end:self._end + length] = value_states
        self._end += length
        self._views()
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rebuild(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (a row may be named more than once: a prefix whose samples split),
        written to the front rows of the SAME buffers when they fit: only the filled part is
        copied (a fresh buffer of full capacity costs more than the copy itself, in page faults)."""
        if self.is_initialized:
            index = indices.to(self._k.device)
            k, v = self.keys.index_select(0, index), self.values.index_select(0, index)
            if index.numel() > self._kb.shape[0]:
                self._allocate(k, index.numel(), self._kb.shape[2], min(2 * self._kb.shape[0], self.rows))
            self._k, self._v = self._kb[:index.numel()], self._vb[:index.numel()]
            self._k[:, :, self._start:self._end] = k
            self._v[:, :, self._start:self._end] = v
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove < 0:
            self._end = max(self._start, self._end + tokens_to_remove)
            self._views()

    def crop_front(self, cut: int) -> None:
        self._start += cut
        self._views()

    def reset(self) -> None:
        self._k = self._v = self._kb = self._vb = None
        self._start = self._end = 0
        self.root_keys = self.root_values = None
        super().reset()


# A batch's prompts share a prefilled root when their common prefix has at least this many
# tokens: below it, the extra forward call and cache copy cost more than they save.
MIN_SHARED_ROOT = 8


def _splits_root(model, cache) -> bool:
    """Whether the shared root can be kept once: buffer layers, and the decode attention on."""
    return (getattr(getattr(model, "config", None), "_attn_implementation", None) == DECODE_ATTENTION
            and bool(cache.layers) and all(isinstance(layer, _BufferLayer) for layer in cache.layers))


def _shared_root(batch_ids: list[list[int]]) -> int:
    """Tokens of the prefix common to every prompt, prefilled once for the batch (0 when shorter
    than MIN_SHARED_ROOT). Every prompt keeps at least its last token outside it, whose logits
    give the first sample."""
    first, limit = batch_ids[0], min(len(ids) for ids in batch_ids) - 1
    k = 0
    while k < limit and all(ids[k] == first[k] for ids in batch_ids):
        k += 1
    return k if k >= MIN_SHARED_ROOT else 0


def _crop_front(cache, cut: int) -> bool:
    """Remove the first `cut` positions (padding for every row) from each layer of a plain
    DynamicCache. Returns False, touching nothing, for other cache layouts (sliding windows...)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, _BufferLayer) or not layer.is_initialized
                         for layer in layers):
        return False
    for layer in layers:
        if isinstance(layer, _BufferLayer):
            layer.crop_front(cut)
        else:
            layer.keys = layer.keys[..., cut:, :]
            layer.values = layer.values[..., cut:, :]
    return True


def _logprobs(logits: torch.Tensor, node: torch.Tensor, token: torch.Tensor) -> list[float]:
    """log p(token) of each row under its node's untempered distribution (module docstring)."""
    full = logits.float()
    return (full[node, token] - torch.logsumexp(full, dim=-1)[node]).tolist()


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator,
            node: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row from logits [nodes, vocab] of any float dtype; `node` [rows] names the
    logits row each sampled row draws from (rows sharing a prefix share it), None: one row each.
    Each row draws its own uniform number, in row order. Top-k runs on the raw logits (dividing by
    a positive temperature keeps the order), so only the k kept scores are converted to float32
    and tempered: on a 49k vocabulary that is most of the sampling cost."""
    if params.temperature == 0:
        best = logits.argmax(dim=-1)
        return best if node is None else best[node]
    vocab = logits.shape[-1]
    index = None
    if 0 < params.top_k < vocab:
        scores, index = torch.topk(logits, params.top_k, dim=-1)  # sorted, descending
        scores = scores.float() / params.temperature
    else:
        scores = logits.float() / params.temperature
    if params.top_p < 1.0:
        if index is None:
            scores, index = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(scores, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        scores = scores.masked_fill(before >= params.top_p, float("-inf"))
    # Inverse-CDF sampling: one uniform number per row (torch.multinomial draws one per vocab entry).
    cdf = torch.softmax(scores, dim=-1).cumsum_(dim=-1)
    best = scores.argmax(dim=-1)
    if node is not None:
        cdf, best = cdf[node], best[node]
        index = None if index is None else index[node]
    u = torch.rand((cdf.shape[0], 1), generator=gen, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).squeeze(1)
    choice = torch.where(choice < cdf.shape[-1], choice, best)  # u rounded up to the total
    return choice if index is None else index.gather(1, choice[:, None]).squeeze(1)
