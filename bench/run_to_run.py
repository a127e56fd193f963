"""How far apart identical training runs land per batch on this machine, even when they take turns batch by batch.

`bench/overhead.py` measures the cost of sparsifying inside one fit, not across runs. This script shows why. It
trains the same dense `digits_cnn(32)` on 16x16 digits (same seed, weights and batch order) several times at once,
each run in its own thread, the runs taking turns one training batch at a time in a fresh random order each round:
no two run together, and each round is over within a fraction of a second, so drift of the machine is shared. It
prints each run's median batch time and its time against the first run's, paired batch by batch (the first epoch,
which warms up, left out), and asserts that the runs' final weights are bit-identical and that every run timed the
same number of batches.

    python bench/run_to_run.py                         # writes bench/results/run_to_run.md (about 1 minute on 2 cores)
    python bench/run_to_run.py --quick --out /tmp/q    # a smoke run: 3 runs of 2 epochs (about 10 seconds)
"""
import contextlib, io, random, statistics, threading, time, warnings
import pandas as pd
import torch
from common import parser, start
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, defaults, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.callback.progress import ProgressCallback
from fastsparse.demo import digits_dls, digits_cnn

class Ring:
    "Runs take turns, one at a time; every round gives each run one turn, in a fresh random order"
    def __init__(self, n:int, seed:int=0):
        self.cv, self.rng, self.active = threading.Condition(), random.Random(seed), set(range(n))
        self.queue = self.rng.sample(range(n), n)
        self.turn = self.queue.pop()
    def _next(self):  # (holding the lock)
        if not self.queue: self.queue = self.rng.sample(sorted(self.active), len(self.active))
        self.turn = self.queue.pop() if self.queue else None
        self.cv.notify_all()
    def wait(self, i):
        with self.cv: self.cv.wait_for(lambda: self.turn == i)
    def hand_on(self, i):
        "End run `i`'s turn and wait for its next one"
        with self.cv:
            self._next()
            self.cv.wait_for(lambda: self.turn == i)
    def leave(self, i):
        with self.cv:
            self.active.discard(i)
            if self.turn == i: self._next()

class Turns(Callback):
    "Hand the machine on before every training batch and every validation; time each training batch"
    order = -100
    def __init__(self, ring, i): self.ring, self.i, self.times = ring, i, []
    def before_validate(self): self.ring.hand_on(self.i)
    def before_batch(self):
        if self.training: self.ring.hand_on(self.i)
        self._t = time.perf_counter()
    def after_batch(self):
        if self.training: self.times.append((self.epoch, time.perf_counter() - self._t))

def plot(ratios):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3), layout='constrained')
    ks = sorted(ratios)
    ax.boxplot([[100 * (r - 1) for r in ratios[k]] for k in ks], showfliers=False)
    ax.set_xticks(range(1, len(ks) + 1), [f"run {k}" for k in ks])
    ax.axhline(0, color='k', lw=0.8)
    ax.set_ylabel('batch time against run 0,\npaired batch by batch (%)', fontsize=8)
    ax.set_title('identical runs taking turns (boxes: quartiles; whiskers: 1.5 IQR)', fontsize=9)
    return fig

def main():
    ap = parser(__doc__, quick='3 runs of 2 epochs: a smoke run of seconds')
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--epochs', type=int, default=6)
    a = ap.parse_args()
    run = start('run_to_run', a)
    if a.quick: a.epochs = 2
    threads = torch.get_num_threads()   # torch's default, or --threads
    defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
    ring, learners = Ring(a.runs), []
    for i in range(a.runs):
        set_seed(0, reproducible=True)
        learners.append(Learner(digits_dls(bs=64, size=16, seed=42), digits_cnn(32), loss_func=CrossEntropyLossFlat(), cbs=[Turns(ring, i)]))
    errors = []
    def go(i):
        torch.set_num_threads(threads)  # OpenMP's thread count belongs to the calling thread: the main thread's, in each run
        ring.wait(i)
        try: learners[i].fit_one_cycle(a.epochs, 1e-2)
        except BaseException as e: errors.append(e)
        finally: ring.leave(i)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ths = [threading.Thread(target=go, args=(i,)) for i in range(a.runs)]
        for t in ths: t.start()
        for t in ths: t.join()
    if errors: raise errors[0]
    secs = time.perf_counter() - t0
    sd = [l.model.state_dict() for l in learners]
    differ = sum(not torch.equal(s[k], sd[0][k]) for s in sd[1:] for k in sd[0])
    steady = [[t for e, t in l.turns.times if e >= 1] for l in learners]  # the first epoch warms up
    print(f"{a.runs} identical dense runs of digits_cnn(32) on 16x16 digits, {a.epochs} epochs, taking turns batch by batch, "
          f"{threads} torch threads in each; {secs:.0f} s in all")
    print(f"final weights: {differ} of {len(sd[0]) * (a.runs - 1)} tensors differ from run 0's")
    assert differ == 0, "identical runs ended with different weights"
    assert len({len(s) for s in steady}) == 1 and steady[0], "the runs timed different numbers of batches"
    rows, ratios = [], {}
    for i, ts in enumerate(steady):
        ratio = [t / t0_ for t, t0_ in zip(ts, steady[0])]
        if i: ratios[i] = ratio
        q = statistics.quantiles(ratio, n=4) if len(ratio) > 1 else [ratio[0]] * 3
        rows.append({'run': i, 'median batch ms': statistics.median(ts) * 1e3,
                     'vs run 0 (median, %)': 100 * (statistics.median(ratio) - 1),
                     'vs run 0 (IQR, %)': f"{100 * (q[0] - 1):+.1f} to {100 * (q[2] - 1):+.1f}",
                     'batches slower': f"{sum(r > 1 for r in ratio)} of {len(ratio)}"})
        print(f"run {i}: median batch {rows[-1]['median batch ms']:.2f} ms; against run 0, paired batch by batch: median "
              f"{rows[-1]['vs run 0 (median, %)']:+.2f}%, quartiles {rows[-1]['vs run 0 (IQR, %)']}%, {rows[-1]['batches slower']} batches slower")
    summ = pd.DataFrame(rows)
    meds = {r['run']: r['vs run 0 (median, %)'] for r in rows[1:]}
    worst = max(meds, key=lambda k: abs(meds[k]))
    meds_ms = [r['median batch ms'] for r in rows]
    spread = 100 * (max(meds_ms) / min(meds_ms) - 1)
    reading = (f"How to read it: the {a.runs} runs do the same computation (their final weights are bit-identical: asserted), "
               f"take turns batch by batch and share the machine's drift, yet their median batch times lie {spread:.1f}% apart "
               f"({min(meds_ms):.2f} to {max(meds_ms):.2f} ms); paired batch by batch, run {worst} is {abs(meds[worst]):.1f}% "
               f"{'slower' if meds[worst] > 0 else 'faster'} than run 0 at the median. A difference between two fits smaller than "
               f"this is not a measurement of the code; that is why `bench/overhead.py` measures costs inside one fit, not across runs.")
    intro = (f"`bench/run_to_run.py` trains the same dense `digits_cnn(32)` on 16x16 digits (same seed, weights and batch "
             f"order) {a.runs} times at once, {a.epochs} epochs each, each run in its own thread with {threads} torch threads, the runs "
             "taking turns one training batch at a time in a fresh random order each round: no two run together. It compares "
             "each run's batch times with the first run's, paired batch by batch, the first epoch (warm-up) left out.")
    run.write(title="Run-to-run spread of identical training runs", intro=intro, summary=summ, fig=plot(ratios), reading=reading)

if __name__ == '__main__': main()
