"""What one-byte masks cost per step on the CPU: the gradient mask with the library's bool masks vs 4-byte float copies.

fastsparse keeps a mask at one byte per weight. fasterai stores float masks (4 bytes per weight). On the
CPU, `grad.mul_(uint8_mask)` first converts the mask to a float temporary (`aten::_to_copy`), so
each step pays a conversion that a float mask would not. This script measures that price where it
is paid: inside a real fit (digits CNN, 90% AGP, Adam, one-cycle), in the steady epochs, with the
variants interleaved batch by batch in one process, so they see the same machine state.

- `uint8 (library)`: `SparseTraining.mask_grads`, the bool masks viewed as uint8, one `_foreach_mul_`.
- `bool where`:      `torch.where(mask, grad, 0, out=grad)`, 1 byte per weight, no conversion.
- `float copy`:      `_foreach_mul_` by float copies of the masks, 4 bytes per weight (not in the library).

`mask` is the gradient mask alone; `after-backward` is the whole span from the end of backward to the
end of the step (mask, optimizer step, `zero_grad`): it shows whether a variant also slows what follows.

    python bench/mask_dtype.py                        # 24 epochs; writes bench/results/mask_dtype.md
    python bench/mask_dtype.py --quick --out /tmp/m   # 4 epochs: a smoke run
"""
import argparse, contextlib, io, statistics, time, warnings
import pandas as pd
import torch, torch.nn as nn
from common import parser, start
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, accuracy, defaults, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.callback.progress import ProgressCallback
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.callback import SparsifyCallback
from fastsparse.schedule import agp

VARIANTS = ('uint8 (library)', 'bool where', 'float copy')

class Interleave(Callback):
    "Pick the variant for each training batch in turn; time the gradient mask and the batch"
    order, can_move_zeros = -100, False  # first at every event; only reads the clock
    def __init__(self, cb):
        self.cb, self.variant, self.times, self.spans, self.batches, self._floats = cb, VARIANTS[0], {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}, [], (None, None)
        self.core = None
    def _install(self):
        "Replace the gradient mask of the callback's core (made at `before_fit`) by one that picks the variant and times it"
        core = self.core = self.cb.core
        library = core.mask_grads
        def mask_grads():  # SparseTraining calls self.mask_grads() after backward
            t = time.perf_counter()
            if self.variant == VARIANTS[0]: library()
            else:
                ms = list(core.masks.values())
                gs = [core.model.get_parameter(n).grad for n in core.masks]
                if self.variant == VARIANTS[1]:
                    zero = gs[0].new_zeros(())
                    for g, m in zip(gs, ms): torch.where(m, g, zero, out=g)
                else: torch._foreach_mul_(gs, self.float_masks())
            if self.steady: self.times[self.variant].append(time.perf_counter() - t)
        core.__dict__['mask_grads'] = mask_grads
    def float_masks(self):
        ms = list(self.core.masks.values())
        key = (tuple(m.data_ptr() for m in ms), self.cb.clock if not self.steady else -1)  # masks change while the schedule moves
        if self._floats[0] != key: self._floats = (key, [m.float() for m in ms])
        return self._floats[1]
    @property
    def steady(self): return self.training and self.epoch > self.n_epoch // 2  # the schedule ends at 50%
    def before_batch(self):
        if self.core is not self.cb.core: self._install()
        if self.training: self.variant = VARIANTS[self.iter % len(VARIANTS)]
        self._t = time.perf_counter()
    def after_backward(self): self._b = time.perf_counter()  # first: before the gradient mask
    def after_batch(self):  # first: the optimizer step and zero_grad are done
        t = time.perf_counter()
        if self.steady: self.batches.append(t - self._t); self.spans[self.variant].append(t - self._b)

def main():
    ap = parser(__doc__, quick='4 epochs: a smoke run')
    ap.add_argument('--epochs', type=int, default=24)
    ap.add_argument('--sparsity', type=float, default=0.9)
    a = ap.parse_args()
    run = start('mask_dtype', a)
    if a.quick: a.epochs = 4
    defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
    set_seed(0, reproducible=True)
    model = digits_cnn(32)
    sp = SparsifyCallback(a.sparsity, 'weight', 'local', 'large_final', agp.with_pcts(0., 0.5), layer_type=nn.Conv2d)
    il = Interleave(sp)
    learn = Learner(digits_dls(bs=64, size=16, seed=42), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[sp, il])
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(a.epochs, 1e-2)
    # every variant kept the masks: masked weights are exactly zero, at the target count
    convs = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    masked = {n: round(a.sparsity * w.numel()) for n, w in convs.items()}
    zeros = {n: int((w == 0).sum()) for n, w in convs.items()}
    assert zeros == masked, (zeros, masked)
    n_weights = sum(w.numel() for w in convs.values())
    batch = statistics.median(il.batches)
    base = statistics.median(il.times[VARIANTS[0]])
    print(f"digits_cnn(32), {a.epochs} epochs, {a.sparsity:.0%} AGP, {n_weights} masked weights in {len(convs)} conv layers; "
          f"median batch {batch*1e3:.2f} ms over {len(il.batches)} steady batches")
    span0 = statistics.median(il.spans[VARIANTS[0]])
    print(f"{'gradient mask':<16} | {'bytes/weight':>12} | {'mask us/batch':>13} | {'vs library':>10} | {'% of a batch':>12} | "
          f"{'after-backward us':>17} | {'vs library':>10}")
    rows = []
    for v, nbytes in zip(VARIANTS, (1, 1, 4)):
        t, sp_ = statistics.median(il.times[v]), statistics.median(il.spans[v])
        print(f"{v:<16} | {nbytes:>12} | {t*1e6:>13.0f} | {(t-base)*1e6:>+8.0f}us | {100*t/batch:>11.2f}% | "
              f"{sp_*1e6:>17.0f} | {(sp_-span0)*1e6:>+8.0f}us")
        rows.append({'gradient mask': v, 'bytes per weight': nbytes, 'mask us per batch': t*1e6, 'vs library us': (t-base)*1e6,
                     'after-backward us': sp_*1e6})
    print(f"masks held: {sum(masked.values())} masked weights, all exactly zero; final sparsity {sum(zeros.values())/n_weights:.5f}")
    df = pd.DataFrame(rows)
    fl = df.set_index('gradient mask')
    d = fl.loc['float copy', 'vs library us']
    run.write(title="The price of one-byte masks", intro=INTRO, summary=df,
              reading=(f"How to read it: float masks would make the gradient mask {abs(d):.0f} us per batch "
                       + ("faster" if d < 0 else "slower") + f" ({abs(d)*1e-6/batch:.2%} of a {batch*1e3:.1f} ms batch) and cost 3 more "
                       f"bytes per weight; `torch.where` on the bool mask takes {fl.loc['bool where', 'mask us per batch']:.0f} us against "
                       f"the library's {fl.loc['uint8 (library)', 'mask us per batch']:.0f} us. `after-backward` is the whole span from the "
                       "end of backward to the end of the step (mask, optimizer step, `zero_grad`): it shows whether a variant also slows "
                       "what follows. The last line of the output checks that the masks held."))

INTRO = """fastsparse keeps a mask at one byte per weight; fasterai stores float masks (4 bytes). On the CPU,
`grad.mul_(uint8_mask)` converts the mask to a float temporary first. `bench/mask_dtype.py` measures that conversion
inside a real fit (digits CNN, 90% AGP, Adam, one-cycle), in the steady epochs, with the library's gradient mask
(`SparseTraining.mask_grads`), a `torch.where` on the bool mask and float copies of the masks taking turns batch by
batch in one process (medians over the steady batches)."""

if __name__ == '__main__': main()
