"""The device the shared-guarantee suites run on, from `FASTSPARSE_TEST_DEVICE`: `cpu` (the default) or `cuda` (`cuda:N`).

`tests/test_training.py` and `tests/test_exactness.py` put their models, data and masks there, so one command checks every
shared guarantee on a GPU: `FASTSPARSE_TEST_DEVICE=cuda python -m pytest tests/test_training.py tests/test_exactness.py`.
`conftest.py` stops the run with a usage error when the variable names a device that is not there."""
import os
import torch

NAME = os.environ.get('FASTSPARSE_TEST_DEVICE', '').strip() or 'cpu'

def problem(name:str=NAME):
    "Why `name` cannot be the test device, or None"
    try: dev = torch.device(name)
    except RuntimeError: return f"FASTSPARSE_TEST_DEVICE={name!r} is not a device; use 'cpu' or 'cuda'"
    if dev.type not in ('cpu', 'cuda'): return f"FASTSPARSE_TEST_DEVICE={name!r}: the suites run on 'cpu' or 'cuda'"
    if dev.type == 'cuda' and not torch.cuda.is_available():
        return f"FASTSPARSE_TEST_DEVICE={name!r}, but torch {torch.__version__} finds no CUDA GPU here (unset it to test on the CPU)"
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"FASTSPARSE_TEST_DEVICE={name!r}, but there are {torch.cuda.device_count()} CUDA devices"
    return None

DEVICE = torch.device(NAME) if problem() is None else torch.device('cpu')  # (the run stops before any test when it is not)
ON_CUDA = DEVICE.type == 'cuda'
