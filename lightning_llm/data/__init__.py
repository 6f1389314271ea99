"""Data: sources, format detection and validation, chat templates and masks, collation into typed batches, data
modules."""

from lightning_llm.data.base import LLMDataModule, PreparationReport
from lightning_llm.data.batches import (
    IGNORE_INDEX,
    CompletionBatch,
    LMBatch,
    PairBatch,
    PromptBatch,
    StepBatch,
    UnpairedBatch,
)
from lightning_llm.data.formats import DataFormat, detect_format, validate_row, validate_rows
from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.data.sampling import GenerationSchedule
from lightning_llm.data.sft import SFTDataModule
from lightning_llm.data.sources import load_rows, load_source
from lightning_llm.data.stepwise import StepwiseDataModule
from lightning_llm.data.unpaired import UnpairedPreferenceDataModule

__all__ = [
    "IGNORE_INDEX", "CompletionBatch", "DataFormat", "GenerationSchedule", "LLMDataModule", "LMBatch", "PairBatch",
    "PreferenceDataModule", "PreparationReport", "PromptBatch", "PromptDataModule", "SFTDataModule", "StepBatch",
    "StepwiseDataModule", "UnpairedBatch", "UnpairedPreferenceDataModule", "detect_format", "load_rows",
    "load_source", "validate_row", "validate_rows",
]
