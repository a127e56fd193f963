"""How far apart identical training runs land per batch on this machine, even when they take turns batch by batch.

`bench/overhead.py` measures the cost of sparsifying inside one fit, not across runs. This script shows
why. It trains the same dense `digits_cnn(32)` (same seed, weights and batch order, bit-identical
results) several times at once, each run in its own thread, the runs taking turns one training batch
at a time in a fresh random order each round: no two run together, and each round is over within a
fraction of a second, so machine drift is shared. It prints each run's median batch time against the
first run's, paired batch by batch, and checks that the runs' final weights are bit-identical.

    python bench/run_to_run.py              # 3 runs, 6 epochs, about a minute
"""
import argparse, contextlib, io, random, statistics, threading, time, warnings
import torch
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

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--epochs', type=int, default=6)
    ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
    ring, learners = Ring(a.runs), []
    for i in range(a.runs):
        set_seed(0, reproducible=True)
        learners.append(Learner(digits_dls(bs=64, size=16, seed=42), digits_cnn(32), loss_func=CrossEntropyLossFlat(), cbs=[Turns(ring, i)]))
    errors = []
    def go(i):
        torch.set_num_threads(a.threads)  # OpenMP's thread count belongs to the calling thread
        ring.wait(i)
        try: learners[i].fit_one_cycle(a.epochs, 1e-2)
        except BaseException as e: errors.append(e)
        finally: ring.leave(i)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        threads = [threading.Thread(target=go, args=(i,)) for i in range(a.runs)]
        for t in threads: t.start()
        for t in threads: t.join()
    if errors: raise errors[0]
    sd = [l.model.state_dict() for l in learners]
    same = all(torch.equal(s[k], sd[0][k]) for s in sd[1:] for k in sd[0])
    steady = [[t for e, t in l.turns.times if e >= 1] for l in learners]  # the first epoch warms up
    print(f"{a.runs} identical dense runs of digits_cnn(32), {a.epochs} epochs, taking turns batch by batch, {a.threads} threads; "
          f"final weights bit-identical: {same}")
    for i, ts in enumerate(steady):
        ratio = [t / t0 for t, t0 in zip(ts, steady[0])]
        print(f"run {i}: median batch {statistics.median(ts)*1e3:.2f} ms; against run 0, paired batch by batch: median {100*(statistics.median(ratio)-1):+.2f}%, "
              f"{sum(r > 1 for r in ratio)} of {len(ratio)} batches slower")

if __name__ == '__main__': main()
