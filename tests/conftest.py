"""Shared test setup."""
import os

import pytest
import torch

# A name that is no local path is a Hub model id (hf.hub_dir): no test may reach the real Hub, so
# any that tries gets a closed local port and a one-line error (tests/test_hub.py serves its own)
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: extra threads only add synchronisation (10x slower on a busy
    2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
