"""Shared fixtures: tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from liveserve.model.loading import load_model
from liveserve.model.tiny import write_tiny_checkpoint


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A liveserve-layout checkpoint: Llama LM + SigLIP vision tower."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-live"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory) -> Path:
    """A VideoLLM-online release layout (base/, vision/, adapter/); returns adapter/."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-release"), layout="videollm-online")


@pytest.fixture(scope="session")
def redis_url():
    """REDIS_URL when set, else one embedded redis-server on 127.0.0.1 for the whole test session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from liveserve.services.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url
