"""Test configuration: the Triton interpreter lane on CPU, the ``gpu`` marker, shared input builders."""
import os

# Must be set before triton (or vpo, which imports it lazily) is imported anywhere.
if not os.environ.get("VPO_TEST_NO_INTERPRET"):
    import torch as _torch  # noqa: E402

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bf16, real shapes); skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
