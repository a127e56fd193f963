"""Test callbacks shared by the suites that train with masks: the check that masks hold, and steps cancelled as a
grad scaler cancels them."""
from fastai.basics import Callback, CancelStepException
from fastsparse.training import MaskedTraining, opt_states

def masked(learn):
    "The callback of `learn` that trains with masks"
    return [c for c in learn.cbs if isinstance(c, MaskedTraining)][0]

def check_masks(learn):
    "Masked weights and their optimizer state are exactly zero"
    for name, mask in masked(learn).masks.items():
        p = learn.model.get_parameter(name)
        assert (p[~mask] == 0).all(), name
        for v in opt_states(learn.opt, p): assert (v[~mask] == 0).all(), name

class CheckMasks(Callback):
    "After every optimizer step: masked weights and optimizer state are exactly zero; `n` counts the checks"
    order = MaskedTraining.order + 1
    def before_fit(self): self.n = 0
    def after_step(self): check_masks(self.learn); self.n += 1

class SkipSteps(Callback):
    "Cancel optimizer steps 3..7 as a grad scaler does on inf/NaN (the same exception, before the mask callback)"
    order = MaskedTraining.order - 1
    def before_fit(self): self.i = 0
    def before_step(self):
        self.i += 1
        if 3 <= self.i <= 7: raise CancelStepException()
