"""Training overhead and accuracy: dense vs fastsparse vs fasterai 0.4.1, same model, data and seeds.

A CNN on scikit-learn's digits (upsampled to 16x16) is trained with Adam and a one-cycle policy.
Both libraries prune the conv layers with magnitude (`large_final`), local context, the AGP cubic
schedule from 0% to 50% of training; the second half is the steady state, where the masks are fixed
and only their upkeep costs time. Per epoch we time the training phase alone; the overhead is the
median steady-state epoch time divided by the dense run's, measured in the same process, runs
interleaved for each seed (dense, fastsparse, fasterai, in an order that rotates with the seed).

    python bench/overhead.py                # 80/90/95/98%, 3 seeds
    python bench/overhead.py --quick        # one level, one seed, few epochs
"""
import argparse, contextlib, io, statistics, sys, time, warnings
import torch, torch.nn as nn
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, accuracy, defaults, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.callback.progress import ProgressCallback
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.callback import SparsifyCallback
from fastsparse.schedule import agp

class EpochTimer(Callback):
    "Wall time of the training phase of each epoch"
    order = -10
    def before_fit(self): self.times = []
    def before_train(self): self._t = time.perf_counter()
    def after_train(self): self.times.append(time.perf_counter() - self._t)

def run(method, sparsity, seed, epochs, lr, size, width, first_dense=False):
    set_seed(seed, reproducible=True)  # torch, numpy and python's random (fastai's shuffling): paired runs per seed
    dls = digits_dls(bs=64, size=size, seed=42)
    model = digits_cnn(width)
    cbs = [EpochTimer()]
    if first_dense:  # the 288-weight first conv stays dense in both libraries: equal kept counts elsewhere
        sparsity = {n: sparsity for n,m in model.named_modules() if isinstance(m, nn.Conv2d) and n != '0'}
    if method == 'fastsparse':
        cbs.append(SparsifyCallback(sparsity, 'weight', 'local', 'large_final', agp.with_pcts(0., 0.5), layer_type=nn.Conv2d))
    elif method == 'fasterai':
        from fasterai.sparse.sparsify_callback import SparsifyCallback as FSparsifyCallback
        from fasterai.core.criteria import large_final as f_large_final
        from fasterai.core.schedule import Schedule as FSchedule, sched_agp as f_sched_agp
        cbs.append(FSparsifyCallback(sparsity, 'weight', 'local', f_large_final, FSchedule(f_sched_agp, start_pct=0., end_pct=0.5),
                                     layer_type=nn.Conv2d))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # fasterai prints; we don't
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(epochs, lr)
    times = list(cbs[0].times)  # read before validate(), which fires before_fit again
    with contextlib.redirect_stdout(io.StringIO()): acc = float(learn.validate()[1])  # fasterai prints here too
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Conv2d))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    steady = times[epochs // 2 + 1:]  # after the schedule ends (first steady epoch excluded)
    return dict(acc=acc, steady=statistics.median(steady), sparsity=zeros / total)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--levels', default='0.8,0.9,0.95,0.98')
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--epochs', type=int, default=10)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--size', type=int, default=16)
    ap.add_argument('--width', type=int, default=32)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--first-dense', action='store_true', help='keep the first conv dense in both libraries')
    a = ap.parse_args()
    if a.quick: a.levels, a.seeds, a.epochs = '0.9', 1, 4
    torch.set_num_threads(a.threads)
    defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
    levels = [float(x) for x in a.levels.split(',')]
    res = {}
    for lvl in levels:
        for seed in range(a.seeds):
            methods = ['dense', 'fastsparse', 'fasterai']
            for m in methods[seed % 3:] + methods[:seed % 3]:  # rotate the order: no method always runs first
                r = run(m, lvl, seed, a.epochs, a.lr, a.size, a.width, a.first_dense)
                res.setdefault((m, lvl), []).append(r)
                print(f"  {m:<10} sparsity {lvl:.2f} seed {seed}: acc {r['acc']:.4f} steady epoch {r['steady']:.3f}s "
                      f"conv sparsity {r['sparsity']:.4f}", file=sys.stderr, flush=True)
    print(f"digits {a.size}x{a.size}, digits_cnn({a.width}), {a.epochs} epochs, one-cycle lr {a.lr}, AGP over 0-50%, "
          f"{a.seeds} seeds, {a.threads} threads" + (", first conv dense in both" if a.first_dense else ''))
    print(f"{'sparsity':>8} | {'dense acc':>9} | {'fastsparse acc':>14} | {'fasterai acc':>12} | "
          f"{'fastsparse time/dense':>21} | {'fasterai time/dense':>19}")
    for lvl in levels:
        mean = lambda m, k: statistics.mean(r[k] for r in res[(m, lvl)])
        # time ratios per seed (same seed, back-to-back runs), then the median over seeds
        ratio = lambda m: statistics.median(r['steady'] / d['steady'] for r, d in zip(res[(m, lvl)], res[('dense', lvl)]))
        print(f"{lvl:>8.2f} | {mean('dense','acc'):>9.4f} | {mean('fastsparse','acc'):>14.4f} | {mean('fasterai','acc'):>12.4f} | "
              f"{ratio('fastsparse'):>21.3f} | {ratio('fasterai'):>19.3f}")

if __name__ == '__main__': main()
