"""Test-session environment: offline hubs, a project-local extension cache, Triton's interpreter
when there is no GPU (it must be set before any module with a ``@triton.jit`` kernel is imported)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# the object-store fixtures (a SeaweedFS server on loopback): s3_store, store_env, s3_locked
pytest_plugins = ("s3_server",)


@pytest.fixture(scope="module")
def inprocess_group():
    """For modules that build trainers in the pytest process (a process group of one rank): the
    launcher variables they set are undone afterwards, so later tests' subprocesses do not inherit
    them. The group itself stays for the session: DeepSpeed keeps handles to the first one, and a
    trainer built after it was destroyed and made anew fails ("group is not registered")."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

