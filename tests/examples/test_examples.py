"""Every script under ``examples/`` runs in fast mode, and both notebooks execute, offline, on the tiny presets.

Each script runs as ``python <script> --fast --output-dir out`` would, in a child process of its own whose working
directory is the test's ``tmp_path``: ``__main__`` is the script, ``sys.argv`` its command line, ``sys.path[0]`` its
directory. The children are forked from one server process that has imported torch, Lightning, transformers and
datasets once (multiprocessing's ``forkserver`` with those modules preloaded): a fresh interpreter spends about 12 s
importing them on the CI machines, more than a fast example spends training. The notebooks run in a ``python3``
Jupyter kernel (nbclient) with the same working directory, and must be stored with their outputs stripped.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "examples").rglob("*.py")
                 if not path.name.startswith("_"))
NOTEBOOKS = ["notebooks/quickstart.ipynb", "notebooks/coming_from_trl.ipynb"]
#: imported once in the fork server, not in every example
PRELOAD = ["torch", "lightning", "transformers", "datasets", "lightning_llm.modules.grpo",
           "lightning_llm.trainers.base"]
TIMEOUT = 600


def _run_as_main(script: str, argv: list[str], cwd: str, log: str) -> None:
    """In the child: what ``python script *argv`` does, in ``cwd``, stdout and stderr into ``log``."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.chdir(cwd)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def test_every_example_is_tested():
    assert "examples/trl_style_training_example.py" in SCRIPTS
    assert "examples/complete_trainer_ecosystem_example.py" in SCRIPTS
    algorithms = ("sft", "reward", "dpo", "orpo", "cpo", "kto", "bco", "prm", "grpo", "rloo", "ppo", "online_dpo",
                  "xpo", "nash_md")
    assert {f"examples/lightning/{name}.py" for name in algorithms} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_in_fast_mode(script, tmp_path, forkserver):
    log = tmp_path / "output.log"
    child = forkserver.Process(target=_run_as_main,
                               args=(str(ROOT / script), ["--fast", "--output-dir", "out"], str(tmp_path), str(log)))
    child.start()
    child.join(TIMEOUT)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{script} --fast ran past {TIMEOUT} s:\n{log.read_text()[-3000:]}")
    assert child.exitcode == 0, f"{script} --fast exited with {child.exitcode}:\n{log.read_text()[-5000:]}"
    out = tmp_path / "out"
    assert (out / "tiny-llama" / "config.json").is_file()  # trained from a save_pretrained directory
    assert list(out.rglob("model.safetensors")), "the example wrote no trained model"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(notebook):
    import nbformat

    book = nbformat.read(ROOT / notebook, as_version=4)
    nbformat.validate(book)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert code
    for index, cell in enumerate(code):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"code cell {index} has outputs"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_executes(notebook, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(ROOT / notebook, as_version=4)
    NotebookClient(book, timeout=TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in book.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert outputs, "the notebook printed nothing"
