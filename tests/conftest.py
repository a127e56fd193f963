"Test-wide settings: no progress bars in captured output (the Recorder still records every column)."
import warnings
from fastai.basics import defaults
from fastai.callback.progress import ProgressCallback

defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
warnings.filterwarnings('ignore', category=FutureWarning, module='torch.jit')
