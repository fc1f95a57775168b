import os

import pytest
import torch

import attention_ext  # noqa: F401  (loads the ops once for every test)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and attention_ext._C.cuda_built else [])


def pytest_generate_tests(metafunc):
    # Every test taking `device` runs on the CPU and, where a GPU and the CUDA build
    # exist, on CUDA too.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread. A second one only waits on barriers, and on
    a loaded machine those waits made those tests 6x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    return (f"torch {torch.__version__}, attention_ext CPU ISA {attention_ext.cpu_isa()} "
            f"(available {attention_ext.available_cpu_isas()}), devices {DEVICES}, "
            f"threads {torch.get_num_threads()}, ATTENTION_EXT_CPU_ISA={os.environ.get('ATTENTION_EXT_CPU_ISA')}")
