"""RunningMoments against numpy (float64) on random streams, across checkpoints, and merged over 2 gloo ranks."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lightning_llm.utils.running_moments import RunningMoments, merge_moments


def _stream(seed: int, sizes: list[int], loc: float = 0.0, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(loc, scale, size) for size in sizes]


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (3.0, 0.25), (1.0e4, 1.0e-2)], ids=["std", "shifted", "offset"])
def test_update_matches_numpy_on_random_stream(loc: float, scale: float) -> None:
    batches = _stream(0, [5, 1, 17, 2, 64, 9], loc, scale)
    moments = RunningMoments()
    seen: list[float] = []
    for batch in batches:
        batch_mean, batch_std = moments.update(torch.tensor(batch, dtype=torch.float64))
        seen.extend(batch)
        everything = np.asarray(seen)
        assert batch_mean == pytest.approx(np.mean(batch), rel=1e-12, abs=1e-12)
        if len(batch) > 1:
            assert batch_std == pytest.approx(np.std(batch, ddof=1), rel=1e-9)
        else:
            assert math.isnan(batch_std)  # one value has no unbiased spread
        # running var is the population variance, running std the unbiased one (TRL's convention)
        assert moments.mean == pytest.approx(np.mean(everything), rel=1e-12)
        assert moments.var == pytest.approx(np.var(everything), rel=1e-8)
        assert moments.std == pytest.approx(np.std(everything, ddof=1), rel=1e-8)
        assert moments.count == pytest.approx(len(everything))


def test_update_on_float32_matrix_uses_every_element() -> None:
    values = np.random.default_rng(1).uniform(-2.0, 5.0, (6, 7)).astype(np.float32)
    moments = RunningMoments()
    batch_mean, batch_std = moments.update(torch.from_numpy(values))
    reference = values.astype(np.float64).ravel()
    assert batch_mean == pytest.approx(reference.mean(), rel=1e-6)
    assert batch_std == pytest.approx(reference.std(ddof=1), rel=1e-6)
    assert moments.count == pytest.approx(42)


def test_hand_computed_two_updates() -> None:
    moments = RunningMoments()
    assert moments.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    # all values 1, 2, 3, 10: mean 4, population variance (9 + 4 + 1 + 36) / 4 = 12.5
    assert moments.update(torch.tensor([10.0, 10.0]))[0] == pytest.approx(10.0)
    assert moments.mean == pytest.approx((1 + 2 + 3 + 10 + 10) / 5)
    values = np.array([1, 2, 3, 10, 10], dtype=float)
    assert moments.var == pytest.approx(np.mean((values - values.mean()) ** 2))


def test_merge_moments_is_chan_formula() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=7), rng.normal(3.0, 2.0, size=12)

    def moments(x: np.ndarray) -> tuple[float, float, float]:
        return float(len(x)), float(x.mean()), float(((x - x.mean()) ** 2).sum())

    merged = merge_moments(moments(a), moments(b))
    assert merged == pytest.approx(moments(np.concatenate([a, b])), rel=1e-12)
    assert merge_moments((0.0, 0.0, 0.0), moments(b)) == pytest.approx(moments(b))


def test_state_dict_round_trip_continues_identically() -> None:
    first, second, third = _stream(3, [8, 13, 6], loc=-1.0, scale=2.0)
    original = RunningMoments()
    original.update(torch.tensor(first))
    original.update(torch.tensor(second))
    buffer = io.BytesIO()
    torch.save({"running_moments": original.state_dict()}, buffer)
    buffer.seek(0)
    restored = RunningMoments()
    restored.load_state_dict(torch.load(buffer, weights_only=True)["running_moments"])
    assert restored.state_dict() == original.state_dict()
    assert restored.update(torch.tensor(third)) == original.update(torch.tensor(third))
    everything = np.concatenate([first, second, third])
    assert restored.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert restored.std == pytest.approx(everything.std(ddof=1), rel=1e-9)


def test_bad_input_raises() -> None:
    moments = RunningMoments()
    with pytest.raises(ValueError, match="xs"):
        moments.update([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        moments.update(torch.tensor([]))
    with pytest.raises(ValueError, match="missing"):
        moments.load_state_dict({"mean": 0.0})
    with pytest.raises(ValueError, match="count"):
        RunningMoments(count=0.0)


# ---- two ranks on gloo: each rank holds a different number of values (one round, none) -----------------------------

_RANK_SIZES = {0: [5, 4, 0], 1: [11, 0, 3]}


def _rank_batches(rank: int) -> list[np.ndarray]:
    return _stream(10 + rank, _RANK_SIZES[rank], loc=2.0 * rank, scale=1.0 + rank)


def _distributed_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        moments = RunningMoments()
        returned = [moments.update(torch.tensor(batch)) for batch in _rank_batches(rank)]
        torch.save({"returned": returned, "state": moments.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_merge_to_numpy_on_concatenated_data(tmp_path) -> None:
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert results[0] == results[1]  # every rank ends with the same state and the same batch statistics

    seen: list[np.ndarray] = []
    for step, (batch_mean, batch_std) in enumerate(results[0]["returned"]):
        global_batch = np.concatenate([_rank_batches(rank)[step] for rank in range(2)])
        seen.append(global_batch)
        assert batch_mean == pytest.approx(global_batch.mean(), rel=1e-12)
        assert batch_std == pytest.approx(global_batch.std(ddof=1), rel=1e-9)
    everything = np.concatenate(seen)
    state = results[0]["state"]
    assert state["count"] == pytest.approx(len(everything))
    assert state["mean"] == pytest.approx(everything.mean(), rel=1e-12)
    assert state["var"] == pytest.approx(everything.var(), rel=1e-9)
    assert state["std"] == pytest.approx(everything.std(ddof=1), rel=1e-9)
