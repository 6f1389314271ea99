"""``linear_logprobs``: per-token log-probs of target tokens straight from hidden states and the LM head.

Every algorithm needs ``log softmax(hidden @ W.T)[target]`` per token, and the ``[tokens, vocab]`` logits in
between are the largest tensor of LLM post-training (16k tokens x 152k vocab is 10 GB in fp32). This entry
point never materialises them for the whole batch: on CUDA a Triton path (cuBLAS tiles + Triton softmax
kernels), elsewhere a chunked torch path, both with a recomputing backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lightning_llm.kernels.logit_transform import LogitTransform
from lightning_llm.ops.chunked import ChunkedLinearLogProbs, default_chunk_rows
from lightning_llm.ops.eager import eager_linear_logprobs

if TYPE_CHECKING:
    from lightning_llm.kernels.linear_logprobs import TileConfig

__all__ = ["TokenLogProbs", "linear_logprobs", "available_impls", "resolve_impl", "IMPLS", "HeadRows", "head_rows",
           "parse_tiles"]

IMPLS = ("auto", "triton", "chunked", "eager")


class TokenLogProbs(NamedTuple):
    """Per-token outputs of :func:`linear_logprobs`; every tensor has the shape of ``targets``.

    ``logps`` (fp32, differentiable): ``log p(target)``, 0.0 where the target is ignored.
    ``entropy`` (fp32, differentiable): ``-sum_j p_j log p_j``, 0.0 where ignored.
    ``is_top1`` (bool): ``argmax_j z_j == target`` (first maximum wins ties, like ``torch.argmax``).
    ``mean_logits`` (fp32): ``mean_j z_j`` of the transformed logits, a metric.
    ``log_sum_sq_probs`` (fp32): ``log sum_j p_j^2`` (WPO's weighting, Zhou et al. 2024).
    The last three carry no gradient.
    """

    logps: Tensor
    entropy: Tensor | None = None
    is_top1: Tensor | None = None
    mean_logits: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None


def available_impls() -> list[str]:
    """Implementations usable in this process: ``triton`` when Triton imports, then ``chunked`` and ``eager``.

    Triton needs a CUDA tensor at call time, or ``TRITON_INTERPRET=1`` for CPU tensors.
    """
    from lightning_llm.kernels import triton_available

    return (["triton"] if triton_available() else []) + ["chunked", "eager"]


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` for CUDA tensors when Triton imports, else ``chunked``; other names are checked."""
    from lightning_llm.kernels import triton_available, triton_runs_on

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "chunked"
    if impl == "triton" and not triton_runs_on(device):
        raise ValueError(
            f"impl='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got a {device.type} tensor, available: {available_impls()}"
        )
    return impl


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    # Under autocast the head runs in the autocast dtype, as nn.Linear would
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _validate(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, chunk_size: int | None
) -> None:
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError("hidden must be a floating-point tensor of shape [..., H]")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError("weight must be a floating-point tensor of shape [V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex() or (
        targets.dtype == torch.bool
    ):
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a tensor of shape [V] = [{weight.shape[0]}]")
    for name, tensor in (("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _gather_if_sharded(tensor: Tensor | None) -> Tensor | None:
    # FSDP2 keeps parameters as sharded DTensors outside their module's forward; the head needs every row.
    # full_tensor() is differentiable: its backward hands each rank the gradient of its own shard.
    if tensor is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _scatter_rows(values: Tensor | None, index: Tensor | None, n_rows: int, shape: torch.Size) -> Tensor | None:
    # Back from the compacted valid rows to every position; ignored ones get 0 / False
    if values is None:
        return None
    if index is not None:
        values = values.new_zeros(n_rows).index_copy(0, index, values)
    return values.reshape(shape)


@dataclass
class HeadRows:
    """The head's inputs flattened to rows, checked, with the settings every implementation needs.

    ``hidden [N, H]`` and ``targets [N]`` hold every position; :meth:`compact` drops the ignored ones (they cost
    no head work) and :meth:`scatter` puts per-row results back in the shape of the original ``targets``.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    valid: Tensor
    transform: LogitTransform
    compute_dtype: torch.dtype
    impl: str
    shape: torch.Size
    index: Tensor | None = None

    def compact(self) -> tuple[Tensor, Tensor]:
        """``(hidden, targets)`` of the valid rows only (the inputs themselves when nothing is ignored)."""
        self.index = None if bool(self.valid.all()) else self.valid.nonzero().squeeze(1)
        if self.index is None:
            return self.hidden, self.targets
        return self.hidden.index_select(0, self.index), self.targets.index_select(0, self.index)

    def scatter(self, values: Tensor | None) -> Tensor | None:
        """Per-valid-row ``values`` back to the targets' shape, 0 / False at ignored positions."""
        return _scatter_rows(values, self.index, self.valid.shape[0], self.shape)


_TILE_FIELDS = ("vocab_chunk", "block", "logits_dtype", "grad_dtype", "fused_gemm")


def parse_tiles(fields: dict | None) -> TileConfig | None:
    """A ``TileConfig`` from plain values (YAML): dtypes may be names such as ``"bfloat16"``; None stays None."""
    if fields is None:
        return None
    if not isinstance(fields, dict) or set(fields) - set(_TILE_FIELDS):
        raise ValueError(f"logprob_tiles must be a dict with keys among {_TILE_FIELDS}, got {fields!r}")
    values = dict(fields)
    for name in ("logits_dtype", "grad_dtype"):
        if isinstance(values.get(name), str):
            dtype = getattr(torch, values[name].removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"logprob_tiles[{name!r}] must be float32, bfloat16 or float16, got {values[name]!r}")
            values[name] = dtype
    from lightning_llm.kernels.linear_logprobs import TileConfig

    return TileConfig(**values)


def check_tiles(tiles: TileConfig | None, impl: str) -> None:
    """A ``TileConfig`` configures the Triton path only: refuse it with any other, rather than ignore it."""
    if tiles is not None and impl != "triton":
        raise ValueError(f"tiles={tiles} configures the Triton path, but impl resolved to {impl!r}")


def head_rows(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    chunk_size: int | None,
    impl: str,
) -> HeadRows:
    """Validate the arguments shared by :func:`linear_logprobs` and ``linear_token_loss`` and flatten them."""
    weight, bias = _gather_if_sharded(weight), _gather_if_sharded(bias)
    _validate(hidden, weight, targets, bias, chunk_size)
    transform = LogitTransform(
        logit_scale=float(logit_scale),
        softcap=float(softcap) if softcap is not None else None,
        temperature=float(temperature),
    )
    impl = resolve_impl(impl, hidden.device)
    vocab_size = weight.shape[0]
    flat_targets = targets.reshape(-1).long()  # [N]
    valid = flat_targets != ignore_index
    bad = valid & ((flat_targets < 0) | (flat_targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {flat_targets[bad][0].item()}"
        )
    return HeadRows(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        weight=weight,
        bias=bias,
        targets=flat_targets,
        valid=valid,
        transform=transform,
        compute_dtype=_compute_dtype(hidden, weight),
        impl=impl,
        shape=targets.shape,
    )


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    return_is_top1: bool = False,
    return_mean_logits: bool = False,
    return_log_sum_sq_probs: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
    tiles: TileConfig | None = None,
) -> TokenLogProbs:
    """Per-token log-probs of ``targets`` under ``softmax(z)``, without the full ``[tokens, vocab]`` logits.

    The logits are ``y = hidden @ weight.T (+ bias)``, then ``y * logit_scale``, then (if ``softcap``)
    ``softcap * tanh(y / softcap)`` (Gemma 2), then ``/ temperature``; the result is ``log_softmax(z)[target]``.
    Positions whose target equals ``ignore_index`` are dropped before any head work and read 0.0.

    Args:
        hidden: ``[..., H]`` hidden states (bf16, fp16 or fp32).
        weight: ``[V, H]`` LM-head weight (tied input embeddings work as they are).
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` head bias.
        ignore_index: target value that marks positions without a loss.
        temperature: divides the logits (> 0).
        logit_scale: multiplies the raw logits.
        softcap: soft-capping value (> 0), or None for none.
        return_entropy: also return the softmax entropy (differentiable).
        return_is_top1: also return whether the target is the argmax.
        return_mean_logits: also return the mean transformed logit over the vocabulary.
        return_log_sum_sq_probs: also return ``log sum_j p_j^2``.
        chunk_size: token rows per chunk of logits; None picks one from a memory budget.
        impl: ``auto`` (Triton for CUDA tensors when available, else chunked), ``triton``, ``chunked`` or
            ``eager`` (full logits, for testing).
        tiles: tiling of the Triton path (:class:`lightning_llm.kernels.linear_logprobs.TileConfig`, e.g.
            ``TileConfig(fused_gemm=True)``); only with the Triton path.

    A ``weight`` (or ``bias``) sharded as a DTensor (FSDP2) is gathered first, differentiably.

    Returns:
        :class:`TokenLogProbs`; outputs not requested are None. Gradients reach ``hidden``, ``weight`` and
        ``bias`` from any upstream gradient on ``logps`` and ``entropy``.
    """
    rows = head_rows(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
        logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size, impl=impl,
    )
    check_tiles(tiles, rows.impl)
    want = (return_entropy, return_is_top1, return_mean_logits, return_log_sum_sq_probs)
    weight, bias, transform, compute_dtype = rows.weight, rows.bias, rows.transform, rows.compute_dtype
    with torch.autocast(hidden.device.type, enabled=False):
        if rows.impl == "eager":
            outputs = eager_linear_logprobs(
                rows.hidden, weight, bias, rows.targets, rows.valid, transform, compute_dtype, want
            )
            return TokenLogProbs(*(o.reshape(rows.shape) if o is not None else None for o in outputs))

        hidden_rows, flat_targets = rows.compact()
        if rows.impl == "triton":
            from lightning_llm.kernels import TritonLinearLogProbs, default_token_rows

            n_chunk = chunk_size or default_token_rows(hidden_rows.shape[0])
            function = TritonLinearLogProbs
        else:
            n_chunk = chunk_size or default_chunk_rows(weight.shape[0])
            function = ChunkedLinearLogProbs
        extra = (tiles,) if tiles is not None else ()
        outputs = function.apply(hidden_rows, weight, bias, flat_targets, transform, compute_dtype, n_chunk, want,
                                 *extra)
    return TokenLogProbs(*(rows.scatter(o) for o in outputs))
