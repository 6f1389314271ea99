"""SamplingSettings refuses bad values, naming the field and the allowed range."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_llm.rollout import SamplingSettings

BAD = [
    ("max_completion_length", 0, "an integer >= 1"),
    ("max_completion_length", 2.5, "an integer >= 1"),
    ("max_completion_length", True, "an integer >= 1"),
    ("temperature", 0.0, "a finite number > 0"),
    ("temperature", -1.0, "a finite number > 0"),
    ("temperature", float("nan"), "a finite number > 0"),
    ("top_p", 0.0, r"a number in \(0, 1\]"),
    ("top_p", 1.5, r"a number in \(0, 1\]"),
    ("top_k", -1, "an integer >= 0"),
    ("top_k", 2.0, "an integer >= 0"),
    ("min_p", -0.1, r"None or a number in \[0, 1\]"),
    ("min_p", 1.1, r"None or a number in \[0, 1\]"),
    ("repetition_penalty", 0.0, "a finite number > 0"),
    ("repetition_penalty", float("inf"), "a finite number > 0"),
    ("do_sample", "yes", "True or False"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_values_are_refused_by_name(field, value, allowed):
    with pytest.raises(ValueError, match=rf"SamplingSettings\.{field} must be {allowed}.*got"):
        SamplingSettings(**{field: value})


def test_defaults_and_edge_values_are_accepted():
    SamplingSettings()
    SamplingSettings(max_completion_length=1, temperature=1e-3, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                     do_sample=False)
    SamplingSettings(min_p=1.0, top_p=1e-6, top_k=1, temperature=5, repetition_penalty=0.5)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingSettings().temperature = 2.0
