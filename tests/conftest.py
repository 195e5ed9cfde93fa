"""Shared test fixtures. Each block is self-contained so engineers can append their own."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# ---------------------------------------------------------------- offline, single-threaded (vopd.models owner)

_OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}
# Also at import time: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
os.environ.update(_OFFLINE_ENVIRONMENT)

# ---------------------------------------------------------------- small first-start datasets (app.bootstrap owner)
# A real first start builds 4,800 training items (about 20 s); every service session builds its own VOPD_HOME, so the
# tests register the same two sets at a few dozen items (subprocesses such as `vopd serve` inherit these too).
os.environ.setdefault("VOPD_DEMO_TRAIN_ITEMS", "48")
os.environ.setdefault("VOPD_HELD_OUT_ITEMS", "24")


@pytest.fixture(autouse=True, scope="session")
def _offline_single_thread() -> Iterator[None]:
    """Two CPU cores are shared by everyone; no test may touch the network."""
    os.environ.update(_OFFLINE_ENVIRONMENT)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 5M Qwen2-VL folder, built once per session (about half a second). Treat it as read-only."""
    from vopd.tiny_models import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"), size="5m", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 0.5M LLaVA folder (CLIP tower + Llama), built once per session. Treat it as read-only."""
    from vopd.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), seed=0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for servers and rendezvous the tests start)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- the vLLM engine's tests (own environment)

# tests/vllm needs vLLM, which lives in its own environment (.venv-vllm, `make test-vllm` sets VOPD_VLLM_TESTS=1):
# the main suite never collects it, so it never imports vllm.
collect_ignore = [] if os.environ.get("VOPD_VLLM_TESTS") == "1" else ["vllm"]
