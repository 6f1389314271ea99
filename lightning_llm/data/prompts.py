"""``PromptDataModule``: prompts for the online algorithms (GRPO, RLOO, ...), drawn in TRL's repeat-sampler order.

Rows need a ``prompt``: a string, or a conversation ending on a user (or tool) turn. Every other column is kept as it
is and reaches the reward functions (TRL's ``remove_unused_columns=False``): a ``solution`` column for an exact-answer
reward, test cases, metadata. Prompts are tokenized once, when the data is prepared (conversations through the chat
template with the generation prompt, strings as the tokenizer does with its special tokens), and validated before the
first step with the project's named errors.

The schedule (:class:`~lightning_llm.data.sampling.GenerationSchedule`: completions per prompt, micro-batches per
generation, passes over each generation) is the algorithm's: the online module hands it over with
:meth:`PromptDataModule.connect_schedule` before the loaders are built. ``batch_size`` counts *completions* per
micro-batch and process, as TRL's ``per_device_train_batch_size`` does, so a training loader batch holds the
``batch_size * steps_per_generation`` prompt rows (each prompt ``num_generations`` times) that one process generates
for at once; see :class:`~lightning_llm.data.sampling.GenerationSampler` for the order.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from lightning_llm.data.base import LLMDataModule, RowNotes, is_stream, plain_row
from lightning_llm.data.batches import PromptBatch
from lightning_llm.data.chat import sequence_ids
from lightning_llm.data.formats import DataFormat
from lightning_llm.data.sampling import GenerationSampler, GenerationSchedule, GroupedEvalSampler, resume_position

#: columns this module writes beside the source columns
PROMPT_IDS, ROW_INDEX = "prompt_ids", "_row_index"
#: what the sampler attaches to each example on its way to ``collate``
_GENERATION, _REPEAT = "_generation", "_repeat"


class PromptDataModule(LLMDataModule):
    """Prompt-only data for online training, batched as :class:`~lightning_llm.data.batches.PromptBatch`.

    Any dataset with a ``prompt`` column is accepted (prompt-only, or prompt-completion and other kinds whose extra
    columns then go to the reward functions). Training batches follow the online module's generation schedule; each
    validation prompt is completed ``num_generations_eval`` times.

    Args:
        max_length: longest tokenized prompt; ``None`` (the default, as in TRL) for no limit. Longer prompts follow
            ``on_overflow`` (cut, by default from the start: ``truncation_mode="keep_end"``).
        truncation_mode: ``keep_end`` (default: the question at the end of a long prompt survives) or ``keep_start``.
        schedule: the generation schedule to use when no online module hands one over (e.g. to draw prompt batches
            for a custom module); a module's schedule replaces it.
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size = completions
            per micro-batch and process, val_batch_size, seed, ...).
    """

    accepted_kinds = ("prompt_only",)
    keeps_source_columns = True

    def __init__(self, train_data: Any = None, val_data: Any = None, *, max_length: int | None = None,
                 truncation_mode: str = "keep_end", schedule: GenerationSchedule | None = None, **kwargs: Any) -> None:
        super().__init__(train_data, val_data, max_length=max_length, truncation_mode=truncation_mode, **kwargs)
        if self.streaming:
            raise ValueError("PromptDataModule draws prompts by index (each prompt num_generations times, each "
                             "generation batch several times), which a stream cannot do: load the prompts as a "
                             "map-style dataset (streaming=False)")
        self.schedule = schedule or GenerationSchedule()

    def connect_schedule(self, schedule: GenerationSchedule) -> None:
        """Use ``schedule`` for the loaders built from now on (the online module calls this in its ``setup``)."""
        if not isinstance(schedule, GenerationSchedule):
            raise ValueError(f"schedule must be a GenerationSchedule, got {type(schedule).__name__}")
        self.schedule = schedule

    # ---------------------------------------------------------------------------------------------- preparation
    def check_format(self, fmt: DataFormat, name: str) -> DataFormat:
        # Any row with a prompt can be completed: the other kinds' columns become reward-function inputs.
        if fmt.kind != "prompt_only" and fmt.kind in ("prompt_completion", "unpaired_preference",
                                                        "stepwise_supervision"):
            return DataFormat("prompt_only", fmt.conversational)
        return super().check_format(fmt, name)

    def preprocess(self, dataset: Any, name: str) -> Any:
        if is_stream(dataset) or not hasattr(dataset, "column_names") or dataset.column_names is None:
            raise ValueError(f"{name}: PromptDataModule needs a map-style dataset, not a stream")
        if "prompt" not in dataset.column_names:
            raise ValueError(f"{name}: no 'prompt' column (columns: {sorted(dataset.column_names)}); the online "
                             "algorithms complete each row's prompt")
        return dataset

    def example_features(self, columns: Sequence[str], fmt: DataFormat) -> dict[str, Any]:
        import datasets

        return {PROMPT_IDS: datasets.Sequence(datasets.Value("int32")), ROW_INDEX: datasets.Value("int64")}

    def encode(self, row: dict, fmt: DataFormat, index: int, report: RowNotes) -> dict | None:
        return self.encode_batch([row], fmt, [index], [report])[0]

    def encode_batch(self, rows: list[dict], fmt: DataFormat, indices: list[int], notes: list[RowNotes]
                     ) -> list[dict | None]:
        ids = sequence_ids(self.tokenizer, [(row["prompt"], True, row.get("tools")) for row in rows])
        out: list[dict | None] = []
        for prompt_ids, index, report in zip(ids, indices, notes):
            if not self.fits(len(prompt_ids), report.split, index, "prompt", report):
                out.append(None)
                continue
            out.append({PROMPT_IDS: self.cut(prompt_ids), ROW_INDEX: index})
        return out

    # ----------------------------------------------------------------------------------------------------- batches
    def collate(self, examples: list[dict]) -> PromptBatch:
        generations = {example.get(_GENERATION) for example in examples}
        repeats = {example.get(_REPEAT, 0) for example in examples}
        if len(generations) > 1 or len(repeats) > 1:
            raise ValueError(f"a prompt batch mixes generation batches {sorted(map(str, generations))}; the loader's "
                             "batch size must be the sampler's share")
        own = (PROMPT_IDS, ROW_INDEX, _GENERATION, _REPEAT)
        rows = [plain_row({key: value for key, value in example.items() if key not in own}) for example in examples]
        return PromptBatch(
            prompts=[row["prompt"] for row in rows], indices=[int(example[ROW_INDEX]) for example in examples],
            rows=rows, prompt_ids=[list(example[PROMPT_IDS]) for example in examples],
            generation=generations.pop(), repeat=int(repeats.pop()),
        )

    def train_dataloader(self) -> DataLoader:
        """Generation batches of this process in TRL's repeat-sampler order (see
        :class:`~lightning_llm.data.sampling.GenerationSampler`); a resumed run continues after its last trained
        batch."""
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: no training data (train_data was not given)")
        rank, world_size = self._process()
        schedule = self.schedule
        unique = schedule.unique_prompts(self.batch_size, world_size)
        epoch, trained = resume_position(self.trainer)
        share = self.batch_size * schedule.steps_per_generation
        sampler = GenerationSampler(len(self.train_dataset), schedule, unique_prompts=unique, shuffle=self.shuffle,
                                    seed=self.seed, rank=rank, world_size=world_size, epoch=epoch,
                                    skip=trained * share)
        return DataLoader(_Scheduled(self.train_dataset), batch_size=share, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=self._loader_generator())

    def _eval_loader(self, dataset: Any) -> DataLoader | list:
        if dataset is None:
            return []
        rank, world_size = self._process()
        sampler = GroupedEvalSampler(len(dataset), self.schedule.eval_generations, batch_size=self.val_batch_size,
                                     rank=rank, world_size=world_size)
        return DataLoader(_Scheduled(dataset), batch_size=self.val_batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.num_workers, generator=self._loader_generator())

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_dataset)


class _Scheduled(torch.utils.data.Dataset):
    """A prepared split read by ``(row, generation, repeat)`` keys: each example carries its place in the schedule."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> list[dict]:
        examples = self.dataset.__getitems__([key[0] for key in keys])
        return [{**example, _GENERATION: key[1], _REPEAT: key[2]} for example, key in zip(examples, keys)]
