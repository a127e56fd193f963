"""What `MaskedTraining`'s shortcuts around fastai's event dispatch save per batch.

fastai calls every event on every callback. For an event a callback does not define, `Callback.__call__` looks it up
(and, first, the `training` flag) through `GetAttr`'s fallback to the Learner and then the model, which raises and
catches `AttributeError` on the way. `MaskedTraining` defines every inner-loop event (a no-op where it has nothing to
do) and reads `training` from the Learner directly, as plain class attributes; fastai's own `Callback.__call__` then
finds them at once.

This script takes a `SparsifyCallback` inside a real, settled fit (digits CNN, 90% AGP over the first half) and times
fastai's calls of the ten inner-loop events of one training batch on it, in one process, taking turns:
- `library`: the callback as it is;
- `plain`: the same callback dispatched the way fastai dispatches a plain callback: the no-op stubs removed from the
  class and `training` found through the fallback.
The events' own work (masking gradients, the clock) is the same in both; the difference is the dispatch.

    python bench/dispatch.py                        # writes bench/results/dispatch.md
    python bench/dispatch.py --quick --out /tmp/d   # a smoke run
"""
import argparse, statistics, time, warnings
import pandas as pd
import torch
from common import parser, start
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, accuracy, set_seed
from fastai.callback.core import _inner_loop  # (to check that the library lists every batch event)
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.callback.progress import ProgressCallback
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.callback import SparsifyCallback
from fastsparse.training import MaskedTraining
from fastsparse.schedule import agp

BATCH_EVENTS = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step', 'after_step',
                'after_cancel_batch', 'after_batch', 'before_zero_grad']  # `before_zero_grad` is fired by fastai's step too

def stubs():
    "The inner-loop events on which `MaskedTraining` has only a no-op stub"
    return [e for e in _inner_loop if getattr(MaskedTraining, e, None) is not None and
            getattr(MaskedTraining, e).__name__ == '_no_event' and e in vars(MaskedTraining)]

class plain_dispatch:
    "Inside the block, the callback is dispatched as fastai dispatches any callback (no stubs, `training` through the fallback)"
    def __init__(self): self.saved = {}
    def __enter__(self):
        for name in stubs() + ['training']: self.saved[name] = vars(MaskedTraining)[name]; delattr(MaskedTraining, name)
    def __exit__(self, *exc):
        for name, v in self.saved.items(): setattr(MaskedTraining, name, v)

class Probe(Callback):
    "At one training batch of the settled epochs, time the batch's events on the sparsity callback, both ways, many times"
    order = 1000
    def __init__(self, at_epoch, reps, rounds): self.at_epoch, self.reps, self.rounds, self.times, self.spent = at_epoch, reps, rounds, {'library': [], 'plain': []}, 0.
    def after_batch(self):
        if not (self.training and self.epoch == self.at_epoch and self.iter == 5): return
        start = time.perf_counter()
        cb = [c for c in self.learn.cbs if isinstance(c, SparsifyCallback)][0]
        # the events as fastai fires them on this one callback, less the work that a second call would repeat
        evs = [e for e in BATCH_EVENTS if e not in ('after_backward', 'after_batch', 'after_step')]
        for _ in range(self.rounds):
            for variant in ('library', 'plain'):
                ctx = plain_dispatch() if variant == 'plain' else warnings.catch_warnings()
                with ctx:
                    t0 = time.perf_counter()
                    for _ in range(self.reps):
                        for e in evs: cb(e)
                    self.times[variant].append((time.perf_counter() - t0) / self.reps * 1e6)
        self.spent += time.perf_counter() - start

INTRO = """fastai calls every event on every callback; for an event a callback does not define, it finds out through
`GetAttr`'s fallback to the Learner and the model (raising and catching `AttributeError` on the way), and it reads
the callback's `training` flag the same way first. `MaskedTraining` defines every inner-loop event (a no-op where it
has nothing to do), returns at once from those no-ops, and reads `training` from the Learner directly.
`bench/dispatch.py` times, inside a real settled fit, fastai's calls of the seven events of a training batch that do
no work for a `SparsifyCallback`, with the shortcuts and with fastai's plain dispatch, taking turns in one process
(medians of the rounds, and the fastest round, which other work on the machine disturbs least)."""

def main():
    ap = parser(__doc__, quick='a few rounds of a few batches: a smoke run')
    ap.add_argument('--reps', type=int, default=2000)
    ap.add_argument('--rounds', type=int, default=15)
    a = ap.parse_args()
    run = start('dispatch', a)
    if a.quick: a.reps, a.rounds = 50, 2
    set_seed(0, reproducible=True)
    probe = Probe(at_epoch=3, reps=a.reps, rounds=a.rounds)
    learn = Learner(digits_dls(size=16), digits_cnn(32), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=[SparsifyCallback(0.9, schedule=agp.with_pcts(0., 0.5)), probe])
    learn.remove_cb(ProgressCallback)
    t0 = time.perf_counter()
    with learn.no_logging(): learn.fit_one_cycle(4, 1e-2)
    batch_ms = (time.perf_counter() - t0 - probe.spent) / (4 * len(learn.dls.train)) * 1e3  # validation included, per training batch
    evs = [e for e in BATCH_EVENTS if e not in ('after_backward', 'after_batch', 'after_step')]
    print(f"digits_cnn(32) on 16x16 digits, SparsifyCallback 90% settled; {len(evs)} events that do no work for it in a "
          f"training batch, {a.rounds} rounds of {a.reps} batches each way, taking turns")
    print(f"{len(stubs())} inner-loop events have no-op stubs on MaskedTraining: {', '.join(stubs())}")
    med = {k: statistics.median(v) for k, v in probe.times.items()}
    print("dispatch        | us per batch (median) | min   | max")
    for k, v in probe.times.items(): print(f"{k:15s} | {med[k]:21.1f} | {min(v):5.1f} | {max(v):5.1f}")
    save, save_min = med['plain'] - med['library'], min(probe.times['plain']) - min(probe.times['library'])
    print(f"shortcuts save {save:.1f} us per batch ({save / (batch_ms * 1e3):.3%} "
          f"of a {batch_ms:.1f} ms training batch, its share of validation included); plain is {med['plain'] / med['library']:.1f}x the library's dispatch")
    w = learn.model[0].weight
    zeros, target = int((w == 0).sum()), round(0.9 * w.numel())
    print(f"masks held: {zeros} of {w.numel()} first-conv weights zero (target {target})")
    assert zeros == target
    summ = pd.DataFrame([{'dispatch': k, 'us per batch (median)': med[k], 'fastest round': min(v)} for k, v in probe.times.items()])
    run.write(title="What the dispatch shortcuts save", intro=INTRO, summary=summ,
              reading=(f"How to read it: the shortcuts save {save:.1f} us per training batch at the median round ({save_min:.1f} us "
                       f"between the fastest rounds), {save / (batch_ms * 1e3):.3%} of this fit's {batch_ms:.1f} ms batch; fastai's "
                       f"plain dispatch of these events takes {med['plain'] / med['library']:.1f}x the library's time. "
                       + ("The shortcuts pay for themselves: they are kept." if save > 0 else "Here they do not pay.")
                       + " The last line of the output checks that the fit held its masks."))

if __name__ == '__main__': main()
