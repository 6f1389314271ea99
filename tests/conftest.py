"""Shared test set-up.

Triton kernels are exercised on CPU tensors through Triton's interpreter when no CUDA device is present; the
variable must be set before triton is first imported, hence here at the top of the root conftest.
"""

from __future__ import annotations

import os
import shutil
import tempfile

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist the workers share the machine's cores: one intra-op thread per process (and per process a test
# starts, which inherits the variable) avoids oversubscribing them; on 2 cores it made the examples and notebooks
# about a third faster. Set before torch is imported; torch.set_num_threads covers a torch imported earlier.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared datasets and loaded files are cached in a directory of this test process (and of the processes it starts),
# never in the user's caches.
_CACHE = tempfile.mkdtemp(prefix="lightning_llm_tests_")
os.environ.setdefault("LIGHTNING_LLM_CACHE", os.path.join(_CACHE, "lightning_llm"))
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))
