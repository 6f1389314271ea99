"""Lightning callbacks: BEMA weight averaging, TR-DPO reference syncing, judge win rates, completion tables, model
merging and a rich progress display with grouped metrics."""

from __future__ import annotations

from lightning_llm.callbacks.bema import BEMACallback
from lightning_llm.callbacks.log_completions import LogCompletionsCallback
from lightning_llm.callbacks.merge_model import MergeModelCallback, linear_merge, merge_state_dicts, slerp
from lightning_llm.callbacks.rich_progress import RichProgressCallback
from lightning_llm.callbacks.sync_ref_model import SyncRefModelCallback, sync_reference
from lightning_llm.callbacks.win_rate import WinRateCallback

__all__ = [
    "BEMACallback",
    "LogCompletionsCallback",
    "MergeModelCallback",
    "RichProgressCallback",
    "SyncRefModelCallback",
    "WinRateCallback",
    "linear_merge",
    "merge_state_dicts",
    "slerp",
    "sync_reference",
]
