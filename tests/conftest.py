import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread for a module of tiny ops (the thread pool costs more than it
    gives); modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_serving_engine(tmp_path_factory):
    """The SmolLM2-135M engine the serving tests serve (int4-bdr, no kernels, 256 tokens),
    built once per session with the CLI."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("serving-engine") / "smollm2-135m-int4-bdr"
    r = subprocess.run([sys.executable, "-m", "sawtrt", "build", "--model", "smollm2-135m",
                        "--kv-cache", "int4-bdr", "--no-kernels", "--max-batch", "32",
                        "--max-seq-len", "256", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out
