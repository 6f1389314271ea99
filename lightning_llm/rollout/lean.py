"""A lean forward for the Llama family, for :class:`~lightning_llm.rollout.fast.FastDecodeEngine` on CPU.

For the tiny models of the tests and benchmarks, one decode step through HF's ``forward`` costs far more in Python
(module calls, mask building, cache objects, output dataclasses) than in arithmetic. :class:`LeanDecoder` runs the
same computation as HF's ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` / ``Qwen3ForCausalLM``
with plain torch ops:

- per layer: RMSNorm (float32, cast back, times the weight, as HF's ``LlamaRMSNorm``); q/k/v projections (biases
  where the modules have them); Qwen3's per-head q/k norms; the rotary embedding from the model's own
  ``model.model.rotary_emb`` (so every rope-scaling variant is the model's), applied as HF's ``apply_rotary_pos_emb``;
  the new keys and values written into a preallocated cache ``[B, kv_heads, slots, head_dim]`` per layer;
  attention over the cache (left padding masked, causal in the prefill) at the attention module's ``scaling``;
  ``o_proj``; residual; post-attention RMSNorm; ``down(act(gate(x)) * up(x))`` with the config's ``hidden_act``;
- then the final norm and the LM head (tied or not) on the last position only: float32 ``[B, V]`` logits.

It holds references to the model's parameters, never copies: an optimizer step between calls (in place) is seen.
Slots are those of the engine's loop: slot ``s`` of row ``b`` holds a real token where ``attention_mask[b, s]`` is 1.
Masked slots get the dtype's most negative finite number added to their scores, not ``-inf``: where a row has a
slot to attend to, its weight still underflows to exactly 0 (the result is that of a boolean mask), and a row with
none (a padding query in the prefill) gets finite numbers instead of NaN (nothing reads them). Attention is that
of the model's ``_attn_implementation``: SDPA, where one-token steps put the query heads of each key/value group
side by side (``[B, kv_heads, group, head_dim]``), as HF's SDPA path does, so that grouped-query attention needs no
repeated keys; or HF's eager softmax (repeated keys, float32 softmax).

Every op is the one HF's modules run (or a fused equivalent of it, such as ``torch.rms_norm``), in the same order, so
in float32 the logits match HF's to the last bit or nearly; ``tests/rollout/test_rollout_lean.py`` holds them to
1e-5.

:func:`supports_lean` says which models it is exact for: exactly those four classes, unsharded, without PEFT/LoRA
or other replaced linear layers, ``sdpa`` or ``eager`` attention, no sliding window, float32/bfloat16/float16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_llm.models.sharding import is_dtensor

#: architecture class name -> whether its attention normalises q and k per head (Qwen3)
ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": True,
}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _architecture(model: nn.Module) -> str | None:
    """The class name when ``type(model)`` is exactly one of transformers' classes in :data:`ARCHITECTURES`."""
    cls = type(model)
    name = cls.__name__
    if name in ARCHITECTURES and cls.__module__.startswith("transformers.models."):
        return name
    return None


def lean_unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`LeanDecoder` would not compute ``model``'s forward exactly; None when it would."""
    name = _architecture(model)
    if name is None:
        return f"{type(model).__name__} is not one of {sorted(ARCHITECTURES)}"
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ATTENTION_IMPLEMENTATIONS:
        return f"attention implementation {config._attn_implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
    layers = model.model.layers[: config.num_hidden_layers]
    if name == "MistralForCausalLM" and getattr(config, "sliding_window", None) is not None:
        return f"sliding-window attention (sliding_window={config.sliding_window})"
    if any(getattr(layer.self_attn, "sliding_window", None) is not None for layer in layers):
        return "sliding-window attention"
    linears = [model.lm_head]
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        linears += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(linear) is not nn.Linear for linear in linears):  # LoRA, quantized or otherwise replaced layers
        return "a projection is not a plain torch.nn.Linear (PEFT/LoRA, quantization, ...)"
    if type(model.model.embed_tokens) is not nn.Embedding:
        return "the token embedding is not a plain torch.nn.Embedding"
    if any(type(module).__module__.split(".")[0] == "peft" for module in model.modules()):
        return "PEFT modules are injected"
    params = list(model.parameters())
    if any(is_dtensor(param) or hasattr(param, "ds_id") or param.device.type == "meta" for param in params):
        return "the parameters are sharded or not materialised"
    dtypes = {param.dtype for param in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        return f"parameter dtypes {sorted(map(str, dtypes))} (one of {[str(d) for d in DTYPES]} needed)"
    return None


def supports_lean(model: nn.Module) -> bool:
    """Whether :class:`LeanDecoder` computes exactly ``model``'s forward (see :func:`lean_unsupported_reason`)."""
    return lean_unsupported_reason(model) is None


# ------------------------------------------------------------------------------------------------------ the parts
def _rms_norm(hidden: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's ``LlamaRMSNorm``: normalise in float32, cast back to the input dtype, then scale by ``weight``.

    ``torch.rms_norm`` computes ``x * rsqrt(mean(x^2) + eps)`` as HF writes it, in one call; in float32 the weight
    goes in too (the same product), otherwise it multiplies after the cast, in the input dtype, as in HF.
    """
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(hidden, weight.shape, weight, eps)
    return weight * torch.rms_norm(hidden.float(), weight.shape, None, eps).to(hidden.dtype)


def _rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """HF's ``apply_rotary_pos_emb`` on one tensor, ``x * cos + rotate_half(x) * sin``, product for product.

    ``rotate_half(x) = [-x2, x1]`` for the halves ``x1, x2`` of the last dim; here the halves are swapped (a roll by
    half the dim) and multiplied by ``sin_signed = [-sin1, sin2]``: negating a factor is exact, so each product is
    HF's. ``cos`` and ``sin_signed`` broadcast against ``x``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _signed_sin(sin: Tensor) -> Tensor:
    """``[-sin1, sin2]`` for the halves of the last dim (see :func:`_rope`)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _sdpa_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scaling: float, group: int) -> Tensor:
    """HF's ``sdpa`` attention. ``q`` ``[B, kv_heads, group, hd]`` (one query per row, heads grouped) or
    ``[B, heads, L, hd]`` with ``group`` > 1, where the keys/values ``[B, kv_heads, slots, hd]`` are repeated."""
    if q.shape[1] != keys.shape[1]:
        keys, values = _repeat_kv(keys, group), _repeat_kv(values, group)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scaling)


def _eager_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scaling: float, group: int) -> Tensor:
    """HF's ``eager`` attention: ``softmax(q k^T * scaling + mask)`` in float32, cast back, times ``v``; ``q``
    ``[B, heads, L, hd]``."""
    keys, values = _repeat_kv(keys, group), _repeat_kv(values, group)
    weights = torch.matmul(q, keys.transpose(2, 3)) * scaling + bias
    weights = weights.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, values)


@dataclass
class _Norm:
    weight: Tensor
    eps: float

    def __call__(self, hidden: Tensor) -> Tensor:
        return _rms_norm(hidden, self.weight, self.eps)


@dataclass
class _Linear:
    """``F.linear``; on 2-D inputs one ``mm`` / ``addmm`` call with the transposed weight kept as a view."""

    weight_t: Tensor  # [in, out], a view of the module's weight: in-place updates show through
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            return F.linear(x, self.weight_t.t(), self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)


def _norm(module: nn.Module) -> _Norm:
    return _Norm(module.weight, float(module.variance_epsilon))


def _linear(module: nn.Linear) -> _Linear:
    return _Linear(module.weight.t(), module.bias)


@dataclass
class _Layer:
    """References to one decoder layer's parameters."""

    input_norm: _Norm
    q_proj: _Linear
    k_proj: _Linear
    v_proj: _Linear
    o_proj: _Linear
    q_norm: _Norm | None  # Qwen3
    k_norm: _Norm | None
    post_norm: _Norm
    gate_proj: _Linear
    up_proj: _Linear
    down_proj: _Linear


class LeanDecoder:
    """The forward of a Llama-family causal LM in plain torch ops, with a preallocated KV cache.

    Build one per generation call (it is cheap: it collects references, and the parameters it reads are then those
    of the call) on a model for which :func:`supports_lean` is True, then call :meth:`prefill` once and
    :meth:`decode` once per new token. It computes the eval-mode forward (no dropout), under ``torch.no_grad``.
    """

    def __init__(self, model: nn.Module) -> None:
        reason = lean_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanDecoder does not support {type(model).__name__}: {reason}")
        config = model.config
        qk_norm = ARCHITECTURES[type(model).__name__]
        decoder = model.model
        self.rotary_emb = decoder.rotary_emb
        rope_type = getattr(self.rotary_emb, "rope_type", None)
        # rope types whose frequencies depend on the longest position of the call: the model's module at each step
        self.rope_per_step = not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope"
        self.embed = decoder.embed_tokens.weight
        self.final_norm = _norm(decoder.norm)
        self.lm_head = _linear(model.lm_head)
        self.act: Callable[[Tensor], Tensor] = _activation(config.hidden_act)
        attention = decoder.layers[0].self_attn
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.group = self.heads // self.kv_heads
        self.head_dim = int(attention.head_dim)
        self.scaling = float(attention.scaling)
        self.eager = config._attn_implementation == "eager"
        self.attention = _eager_attention if self.eager else _sdpa_attention
        # one query per row: SDPA takes the query heads of each key/value group side by side, as HF's SDPA path
        # does (no repeated keys); eager attention, as HF's, repeats the keys: [B, heads, 1, hd]
        self.step_query_shape = (self.heads, 1) if self.eager else (self.kv_heads, self.group)
        self.layers = [
            _Layer(
                input_norm=_norm(layer.input_layernorm),
                q_proj=_linear(layer.self_attn.q_proj), k_proj=_linear(layer.self_attn.k_proj),
                v_proj=_linear(layer.self_attn.v_proj), o_proj=_linear(layer.self_attn.o_proj),
                q_norm=_norm(layer.self_attn.q_norm) if qk_norm else None,
                k_norm=_norm(layer.self_attn.k_norm) if qk_norm else None,
                post_norm=_norm(layer.post_attention_layernorm),
                gate_proj=_linear(layer.mlp.gate_proj), up_proj=_linear(layer.mlp.up_proj),
                down_proj=_linear(layer.mlp.down_proj),
            )
            for layer in decoder.layers[: config.num_hidden_layers]
        ]
        dtype, device = self.embed.dtype, self.embed.device
        # added to the scores of attended / masked slots (see the module docstring)
        self.unmasked = torch.zeros((), dtype=dtype, device=device)
        self.masked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.keys: list[Tensor] = []  # per layer [B, kv_heads, slots, head_dim]
        self.values: list[Tensor] = []
        # [slots, 2, 1, 1, head_dim]: cos and signed sin (see _rope) of positions 0..slots-1, when they do not
        # depend on the call (positions never exceed the slot index)
        self.rope_table: Tensor | None = None

    # --------------------------------------------------------------------------------------------------- calls
    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Run the prompts ``[B, P]`` (left-padded), filling slots ``0..P-1`` of a new cache of
        ``attention_mask.shape[1]`` slots; returns the float32 logits ``[B, V]`` of the last position.

        ``attention_mask`` ``[B, slots]``: 1 where a slot holds a real token (only its first ``P`` columns are read);
        ``position_ids`` ``[B, P]``: the rotary positions.
        """
        rows, width = input_ids.shape
        slots = attention_mask.shape[1]
        if slots < width:
            raise ValueError(f"LeanDecoder.prefill: attention_mask has {slots} slots for {width} prompt tokens")
        device = input_ids.device
        hidden = F.embedding(input_ids, self.embed)  # [B, P, D]
        shape = (rows, self.kv_heads, slots, self.head_dim)
        self.keys = [hidden.new_zeros(shape) for _ in self.layers]
        self.values = [hidden.new_zeros(shape) for _ in self.layers]
        cos, sin = self.rotary_emb(hidden, position_ids)  # [B, P, head_dim]
        cos, sin = cos[:, None], _signed_sin(sin)[:, None]  # broadcast over heads
        self.rope_table = None
        if not self.rope_per_step:
            table_cos, table_sin = self.rotary_emb(hidden, torch.arange(slots, device=device)[None])  # [1, S, hd]
            self.rope_table = torch.stack((table_cos[0], _signed_sin(table_sin[0])), dim=1)[:, :, None, None]
        index = torch.arange(width, device=device)
        causal = index[None, :] <= index[:, None]  # [P, P]
        bias = self._score_bias(causal & (attention_mask[:, None, :width] != 0))[:, None]  # [B, 1, P, P]
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            normed = layer.input_norm(hidden)
            q = layer.q_proj(normed).view(rows, width, self.heads, self.head_dim)
            k = layer.k_proj(normed).view(rows, width, self.kv_heads, self.head_dim)
            v = layer.v_proj(normed).view(rows, width, self.kv_heads, self.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, P, head_dim]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            keys[:, :, :width] = k
            values[:, :, :width] = v
            out = self.attention(q, k, v, bias, self.scaling, self.group)  # [B, heads, P, head_dim]
            hidden = hidden + layer.o_proj(out.transpose(1, 2).reshape(rows, width, -1))
            hidden = hidden + self._mlp(layer, layer.post_norm(hidden))
        return self._logits(hidden[:, -1])

    @torch.no_grad()
    def decode(self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, slot: int) -> Tensor:
        """Run one token per row, ``tokens`` ``[B, 1]`` at rotary ``positions`` ``[B, 1]``, storing its keys and
        values at ``slot``; it attends to the slots ``0..slot`` where ``attention_mask`` ``[B, >= slot + 1]`` is
        nonzero (the engine marks ``slot`` before the call). Positions are below the number of slots (as with left
        padding, where a position counts the real tokens before it). Returns the float32 logits ``[B, V]``.
        """
        rows = tokens.shape[0]
        width = slot + 1
        if not self.keys or width > self.keys[0].shape[2]:
            raise ValueError(f"LeanDecoder.decode: slot {slot} is outside the cache (call prefill first)")
        hidden = F.embedding(tokens.view(rows), self.embed)  # [B, D]: one position per row, 2-D throughout
        if self.rope_table is not None:
            cos, sin = self.rope_table.index_select(0, positions.view(rows)).unbind(1)  # [B, 1, 1, head_dim]
        else:
            cos, sin = self.rotary_emb(hidden[:, None], positions)  # [B, 1, head_dim]
            cos, sin = cos[:, None], _signed_sin(sin)[:, None]
        bias = self._score_bias(attention_mask[:, :width])[:, None, None]  # [B, 1, 1, slot + 1]
        slot_index = torch.tensor([slot], device=hidden.device)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            normed = layer.input_norm(hidden)
            q = layer.q_proj(normed).view(rows, *self.step_query_shape, self.head_dim)
            k = layer.k_proj(normed).view(rows, self.kv_heads, 1, self.head_dim)
            v = layer.v_proj(normed).view(rows, self.kv_heads, 1, self.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            keys.index_copy_(2, slot_index, k)
            values.index_copy_(2, slot_index, v)
            out = self.attention(q, keys.narrow(2, 0, width), values.narrow(2, 0, width), bias, self.scaling,
                                 self.group)
            hidden = hidden + layer.o_proj(out.view(rows, -1))
            hidden = hidden + self._mlp(layer, layer.post_norm(hidden))
        return self._logits(hidden)

    # --------------------------------------------------------------------------------------------------- parts
    def _score_bias(self, attend: Tensor) -> Tensor:
        """The additive attention mask: 0 where ``attend`` (boolean, or 0/1) is nonzero, the dtype's most negative
        finite number elsewhere."""
        return torch.where(attend.bool(), self.unmasked, self.masked)

    def _mlp(self, layer: _Layer, x: Tensor) -> Tensor:
        return layer.down_proj(self.act(layer.gate_proj(x)) * layer.up_proj(x))

    def _logits(self, last: Tensor) -> Tensor:
        """``[B, D]`` last hidden states -> float32 ``[B, V]`` logits."""
        return self.lm_head(self.final_norm(last)).float()


def _repeat_kv(x: Tensor, group: int) -> Tensor:
    """``[B, kv_heads, L, hd]`` -> ``[B, kv_heads * group, L, hd]``, each key/value head repeated ``group`` times."""
    if group == 1:
        return x
    rows, kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(rows, kv_heads, group, length, head_dim).reshape(rows, -1, length, head_dim)


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    """The config's ``hidden_act`` as transformers defines it (``ACT2FN``), called without module hooks."""
    from transformers.activations import ACT2FN

    act = ACT2FN[name]
    return act.forward if isinstance(act, nn.Module) else act
