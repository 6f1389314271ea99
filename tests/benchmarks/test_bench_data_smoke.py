"""The data-preparation benchmark keeps working: every measurement of it runs on a few generated rows, and the script
itself runs end to end (fresh processes, the report of ratios, the JSON results)."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark

ROWS = 24


def _load():
    return load_benchmark("bench_data")


def _write_rows(bench, kind: str, path) -> str:
    with open(path, "w") as handle:
        for row in bench.make_rows(kind, ROWS):
            handle.write(json.dumps(row) + "\n")
    return str(path)


def test_rows_are_deterministic_and_in_the_expected_formats():
    bench = _load()
    from lightning_llm.data.formats import detect_format

    for kind in bench.KINDS:
        rows = bench.make_rows(kind, 5)
        assert rows == bench.make_rows(kind, 5) and rows != bench.make_rows(kind, 5, seed=1)
        assert len(rows) == 5 and len({json.dumps(r) for r in rows}) == 5
        assert detect_format(set(rows[0]), rows[0]) is not None
    assert set(bench.make_rows("preference", 1)[0]) == {"prompt", "chosen", "rejected"}
    assert set(bench.make_rows("chat", 1)[0]) == {"messages"}


@pytest.mark.parametrize("kind", ["preference", "chat"])
def test_every_case_prepares_every_row(kind, tmp_path, monkeypatch):
    """Each measurement, run in this process (the script runs each in a process of its own): ours cold, with two
    processes, from the cache of the first; TRL's preparation with one and two processes."""
    bench = _load()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # the worker sets it; restored after the test
    path = _write_rows(bench, kind, tmp_path / f"{kind}.jsonl")
    results = []
    for case in bench.CASES:
        name = "ours" if case == "ours_cached" else case
        spec = {"case": case, "kind": kind, "file": path, "hf_cache": str(tmp_path / f"hf-{name}"),
                "cache": str(tmp_path / f"ours-{name}")}
        result = bench.worker(spec)
        assert result["case"] == case and result["kind"] == kind
        assert result["examples"] == ROWS, result  # no row dropped at this length
        assert result["seconds"] > 0 and result["peak_rss_mib"] > 0
        results.append(result)
    assert list((tmp_path / "ours-ours" / "prepared").rglob("*.arrow"))  # our preparation wrote its cache there
    report = bench.report(results).splitlines()
    assert len(report) == 1 + len(bench.CASES)
    assert report[1].split()[:2] == [kind, "ours"]


@pytest.mark.slow
def test_the_script_runs_end_to_end(tmp_path):
    """``main`` with a few rows of one kind: each case in a fresh process, the report's ratios, the results written
    as JSON. (Two of the five cases, to keep the test short: each takes a process start; all five run above.)"""
    bench = _load()
    bench.CASES = ("ours", "trl")
    out = tmp_path / "data.json"
    results = bench.main(["--smoke", "--rows", str(ROWS), "--kinds", "preference", "--out", str(out)])
    assert [(r["kind"], r["case"]) for r in results] == [("preference", c) for c in bench.CASES]
    assert all(r["examples"] == ROWS for r in results)
    assert json.loads(out.read_text()) == results
