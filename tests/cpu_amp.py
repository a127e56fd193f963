"""fastai's float16 mixed precision moved to the CPU, so the grad-scaler path runs in CI, which has no GPU.

`Learner.to_fp16()` hard-wires CUDA: on a CPU its autocast and `GradScaler` are both disabled, so a test that calls it there
exercises nothing. `CPUMixedPrecision` is fastai's own `MixedPrecision` callback (same events, same fake-optimizer trick to
detect a skipped step, same `CancelStepException`) with only the device switched: a real float16 autocast on the CPU and a
real `GradScaler('cpu')`. Started with a scale far too high, the scaled gradients overflow float16 and the scaler itself
skips the first steps, halving its scale each time, as it does on a GPU. `fp16_scaler` gives fastai's own callback where the
test device is a CUDA GPU (`FASTSPARSE_TEST_DEVICE=cuda`), and this one on the CPU."""
import warnings
import torch
from torch.amp import GradScaler, autocast
from fastai.basics import Callback
from fastai.callback.fp16 import MixedPrecision, AMPMode
from devices import ON_CUDA

class CPUMixedPrecision(MixedPrecision):
    "fastai's `MixedPrecision` with a real autocast and a real `GradScaler` on the CPU (fp16; `amp_mode='bf16'`: bfloat16, no scaler, as fastai)"
    def before_fit(self):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the CUDA scaler the parent makes first warns that CUDA is absent
            super().before_fit()            # (and sets the scaler's `enabled` for the mode)
        dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        self.autocast,self.learn.scaler = autocast('cpu', dtype=dtype),GradScaler('cpu', **self.kwargs)

def fp16_scaler(**kwargs):
    "fastai's fp16 `MixedPrecision` (what `learn.to_fp16(**kwargs)` adds) on the test device: fastai's own on a GPU, `CPUMixedPrecision` on the CPU"
    return MixedPrecision(**kwargs) if ON_CUDA else CPUMixedPrecision(**kwargs)

class CountSteps(Callback):
    "Count optimizer steps done and skipped; a skipped step must be a real overflow (a gradient that is not finite)"
    order = MixedPrecision.order - 1  # sees the prediction before the scaler's callback casts it to float32
    def before_fit(self): self.events,self.skipped,self.pred_dtypes = 0,0,set()
    def after_pred(self):
        if self.training: self.pred_dtypes.add(self.pred.dtype)
    def after_cancel_step(self):
        self.skipped += 1
        assert any(not torch.isfinite(p.grad).all() for p in self.learn.model.parameters() if p.grad is not None)
    def after_step(self): self.events += 1  # fastai calls `after_step` after a cancelled step too
    @property
    def done(self): return self.events - self.skipped
