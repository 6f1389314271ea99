"""Data: sources, format detection and validation, chat templates and masks, collation, data modules."""

from lightning_llm.data.base import LLMDataModule, PreparationReport
from lightning_llm.data.formats import DataFormat, detect_format, validate_row, validate_rows
from lightning_llm.data.preference import PreferenceDataModule
from lightning_llm.data.sft import SFTDataModule
from lightning_llm.data.sources import load_rows
from lightning_llm.data.stepwise import StepwiseDataModule
from lightning_llm.data.unpaired import UnpairedPreferenceDataModule

__all__ = [
    "DataFormat", "LLMDataModule", "PreferenceDataModule", "PreparationReport", "SFTDataModule", "StepwiseDataModule",
    "UnpairedPreferenceDataModule", "detect_format", "load_rows", "validate_row", "validate_rows",
]
