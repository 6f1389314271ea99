"""Lightning callbacks: BEMA weight averaging, TR-DPO reference syncing, judge win rates, completion tables, model
merging and a rich progress display with grouped metrics.

Names are imported lazily (PEP 562), so importing one callback does not import every callback's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_llm._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BEMACallback": "lightning_llm.callbacks.bema",
    "JsonlPredictionWriter": "lightning_llm.callbacks.predictions",
    "LogCompletionsCallback": "lightning_llm.callbacks.log_completions",
    "MergeModelCallback": "lightning_llm.callbacks.merge_model",
    "RichProgressCallback": "lightning_llm.callbacks.rich_progress",
    "RunCheckpoint": "lightning_llm.callbacks.checkpoint",
    "SyncRefModelCallback": "lightning_llm.callbacks.sync_ref_model",
    "WinRateCallback": "lightning_llm.callbacks.win_rate",
    "linear_merge": "lightning_llm.callbacks.merge_model",
    "merge_state_dicts": "lightning_llm.callbacks.merge_model",
    "slerp": "lightning_llm.callbacks.merge_model",
    "sync_reference": "lightning_llm.models.reference",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from lightning_llm.callbacks.bema import BEMACallback  # noqa: F401
    from lightning_llm.callbacks.checkpoint import RunCheckpoint  # noqa: F401
    from lightning_llm.callbacks.log_completions import LogCompletionsCallback  # noqa: F401
    from lightning_llm.callbacks.merge_model import MergeModelCallback, linear_merge, merge_state_dicts, slerp  # noqa: F401
    from lightning_llm.callbacks.predictions import JsonlPredictionWriter  # noqa: F401
    from lightning_llm.callbacks.rich_progress import RichProgressCallback  # noqa: F401
    from lightning_llm.callbacks.sync_ref_model import SyncRefModelCallback, sync_reference  # noqa: F401
    from lightning_llm.callbacks.win_rate import WinRateCallback  # noqa: F401
