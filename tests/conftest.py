"""Test-wide settings: no progress bars in captured output (the Recorder still records every column); the device the
shared-guarantee suites run on (`FASTSPARSE_TEST_DEVICE`, see `devices.py`); tests marked `cuda` skip, with the reason,
where torch finds no CUDA GPU."""
import warnings
import pytest, torch
from fastai.basics import defaults
from fastai.callback.progress import ProgressCallback
import devices

defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
warnings.filterwarnings('ignore', category=FutureWarning, module='torch.jit')

def pytest_configure(config):
    err = devices.problem()
    if err: raise pytest.UsageError(err)

def pytest_report_header(config):
    return f"fastsparse test device: {devices.DEVICE} (FASTSPARSE_TEST_DEVICE)"

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} finds none here")
    for item in items:
        if item.get_closest_marker('cuda') is not None: item.add_marker(skip)
