"""Running mean and standard deviation of a stream of values, merged across ranks.

Used to normalise rewards or advantages on the fly (PPO's reward whitening, KTO/BCO running baselines). The state
is three numbers per stream (count, mean, sum of squared deviations), so ranks exchange moments, never raw values,
and combine them with Chan et al.'s parallel formula (Chan, Golub & LeVeque, "Updating Formulae and a Pairwise
Algorithm for Computing Sample Variances", 1979):

    n = n_a + n_b,   delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta**2 * n_a * n_b / n.

Behaviour follows TRL's ``RunningMoments`` (trl/trainer/utils.py up to TRL 0.x): ``update`` returns the batch mean and
the *unbiased* batch standard deviation; the running ``var`` is the *biased* (population) variance, the running
``std`` the unbiased one; the state starts from ``mean=0, var=1, std=1, count=1e-24`` so the prior weighs nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# (count, mean, M2) of one batch or one stream
Moments = tuple[float, float, float]

_STATE_KEYS = ("mean", "std", "var", "count")


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Merge the ``(count, mean, M2)`` of two disjoint sets into those of their union (Chan's formula)."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    total = count_a + count_b
    if total == 0:
        return 0.0, 0.0, 0.0
    delta = mean_b - mean_a
    mean = mean_a + delta * count_b / total
    m2 = m2_a + m2_b + delta * delta * count_a * count_b / total
    return total, mean, m2


def local_moments(xs: torch.Tensor) -> Moments:
    """``(count, mean, M2)`` of all elements of ``xs``, computed in float64."""
    values = xs.detach().reshape(-1).to(torch.float64)
    count = values.numel()
    if count == 0:
        return 0.0, 0.0, 0.0
    mean = values.mean()
    m2 = ((values - mean) ** 2).sum()
    return float(count), mean.item(), m2.item()


def _collective_device(group: Any, tensor_device: torch.device) -> torch.device:
    """Where the all-gather buffer must live for the process group's backend."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return tensor_device


def global_moments(xs: torch.Tensor, group: Any = None) -> Moments:
    """``(count, mean, M2)`` of ``xs`` over every rank of ``group`` (all ranks when ``None``).

    Each rank contributes its local moments; ranks may hold different numbers of values, or none.
    """
    import torch.distributed as dist

    local = local_moments(xs)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    device = _collective_device(group, xs.device)
    mine = torch.tensor(local, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    merged: Moments = (0.0, 0.0, 0.0)
    for rank_moments in gathered:
        count, mean, m2 = rank_moments.tolist()
        merged = merge_moments(merged, (count, mean, m2))
    return merged


def _unbiased_std(m2: float, count: float) -> float:
    """``sqrt(M2 / (count - 1))``; NaN for fewer than two values, like ``torch.std``."""
    if count <= 1:
        return math.nan
    return math.sqrt(max(m2, 0.0) / (count - 1))


class RunningMoments:
    """Running mean, variance and standard deviation of every value passed to :meth:`update`.

    Under ``torch.distributed`` every call is a collective: all ranks must call :meth:`update` together, and they all
    end with the same state. Save the state in a Lightning checkpoint with :meth:`state_dict` (e.g. from
    ``on_save_checkpoint``) and restore it with :meth:`load_state_dict`.

    Args:
        mean: initial running mean.
        std: initial running (unbiased) standard deviation.
        var: initial running (biased) variance.
        count: initial weight of the state; the default ``1e-24`` makes the initial values a negligible prior.
        process_group: the ranks to merge over (default: all ranks, when ``torch.distributed`` is initialised).

    Example:
        >>> moments = RunningMoments()
        >>> batch_mean, batch_std = moments.update(torch.tensor([1.0, 2.0, 3.0]))
        >>> round(batch_mean, 6), round(batch_std, 6)
        (2.0, 1.0)
    """

    def __init__(
        self, mean: float = 0.0, std: float = 1.0, var: float = 1.0, count: float = 1e-24, process_group: Any = None
    ) -> None:
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        if var < 0 or std < 0:
            raise ValueError(f"var and std must be non-negative, got var={var}, std={std}")
        self.mean = float(mean)
        self.std = float(std)
        self.var = float(var)
        self.count = float(count)
        self.process_group = process_group

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold the values of ``xs`` (any shape; all ranks' values under ``torch.distributed``) into the state.

        Returns:
            The mean and the unbiased standard deviation of this batch (over all ranks).
        """
        if not isinstance(xs, torch.Tensor):
            raise ValueError(f"xs must be a torch.Tensor, got {type(xs).__name__}")
        batch_count, batch_mean, batch_m2 = global_moments(xs, self.process_group)
        if batch_count == 0:
            raise ValueError("xs is empty on every rank; there is nothing to update the moments with")
        # the running state as moments: M2 = biased variance * count
        running = (self.count, self.mean, self.var * self.count)
        count, mean, m2 = merge_moments(running, (batch_count, batch_mean, batch_m2))
        self.mean = mean
        self.var = m2 / count
        self.std = math.sqrt(self.var * count / (count - 1)) if count > 1 else math.nan
        self.count = count
        return batch_mean, _unbiased_std(batch_m2, batch_count)

    def state_dict(self) -> dict[str, float]:
        """The state as plain floats (checkpoint-friendly)."""
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing the keys {missing}; expected {list(_STATE_KEYS)}")
        for key in _STATE_KEYS:
            setattr(self, key, float(state_dict[key]))

    def __repr__(self) -> str:
        return f"RunningMoments(mean={self.mean}, std={self.std}, var={self.var}, count={self.count})"
