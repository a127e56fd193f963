"""Training overhead and accuracy: dense vs fastsparse vs fasterai 0.4.1, same model, data and seeds.

A CNN on scikit-learn's digits (upsampled to 16x16) is trained with Adam and a one-cycle policy.
Both libraries prune the conv layers with magnitude (`large_final`), local context, the AGP cubic
schedule from 0% to 50% of training; the second half is the steady state, where the masks are fixed
and only their upkeep costs time. Runs are paired: for each level and seed, dense, fastsparse and
fasterai train from the same initial weights on the same batch order, back to back, in an order
that rotates with the seed.

Two measures of the steady-state cost, each relative to the dense run of the same pair:
- `time/dense`: median wall time of a training batch over the steady epochs, divided by dense's.
  On a shared 2-core machine this moves by several percent from run to run: each pair ends with
  the dense run again, and the summary says how far that lands from the first.
- `callback/dense`: time spent inside the sparsifying callback itself, per steady batch (all of its
  events, including fastai's dispatch to it), divided by dense's median batch time. It resolves
  differences well below 1%, but it can't see a cost moved onto the optimizer step: in profiling on
  this machine the first op after backward was slow even for a one-element add, and whoever runs
  first pays it -- our gradient mask, or fasterai's optimizer step.
- `added`: the median time from the end of backward to the end of every callback's `after_step`
  (callbacks, optimizer step, `zero_grad`), minus dense's, plus the callback's time in its other
  events, over dense's median batch. This counts the optimizer's share too.

`fastsparse@fasterai-counts` trains fastsparse once more, pruning at every mask update exactly as many
weights per layer as fasterai prunes there. fasterai takes the `kthvalue` at `k = max(1, int(s*n))` and
keeps every weight `>=` it, so it prunes `k - 1`: one or two weights per layer fewer than `round(s*n)`, which matters
in the 288-weight first conv (7 kept instead of 6 at 98%); and it reads its schedule at
`round(pct_train, 3)`. Same kept counts at every step, same initial weights and batches: the
like-for-like comparison of the two training rules. The script compares the final weights of the
two runs bit for bit.

    python bench/overhead.py                # 80/90/95/98%, 3 seeds, fastsparse also at fasterai's counts
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

class BatchTimer(Callback):
    "Wall time of every training batch, and of its part after the backward pass, by epoch (order -100: first at each event)"
    order = -100
    can_move_zeros = False  # it only reads the clock: fastsparse needn't re-zero weights after each step on its account
    def before_fit(self): self.times = []
    def before_batch(self): self._t = time.perf_counter()
    def after_backward(self): self._b = time.perf_counter()  # backward done; no callback has run yet
    def after_batch(self):  # every callback's after_step and the optimizer are done; no after_batch has run yet
        t = time.perf_counter()
        if self.learn.training: self.times.append((self.learn.epoch, t - self._t, t - self._b))

def self_timed(cb, steady_from:int):
    "Make `cb` add up the time of its own training-batch events from epoch `steady_from` on"
    cls = type(cb)
    def __call__(self, event_name):
        t = time.perf_counter()
        try: return cls.__call__(self, event_name)
        finally:
            dt = time.perf_counter() - t
            if self.learn.training and self.learn.epoch >= steady_from and event_name in _BATCH_EVENTS:
                self.__dict__['_self_time'] += dt
                if event_name not in _SPAN_EVENTS: self.__dict__['_outside'] += dt
    cb.__dict__['_self_time'] = cb.__dict__['_outside'] = 0.
    object.__setattr__(cb, '__class__', type(cls.__name__, (cls,), {'__call__': __call__}))
    return cb

_BATCH_EVENTS = set("before_batch after_pred after_loss before_backward after_backward before_step after_step "
                    "after_cancel_step after_batch".split())
_SPAN_EVENTS = set("after_backward before_step after_step after_cancel_step".split())  # inside the post-backward span

class AtFasteraiCounts(SparsifyCallback):
    "fastsparse, pruning at every mask update as many weights per layer as fasterai 0.4.1 prunes at that point of training"
    _pos = 0.  # a class default: a Callback hands unknown attributes on to the Learner
    def _maybe_update(self, pos, force=False):
        self._pos = pos  # fraction of training done: fasterai's `pct_train` at the next batch
        return super()._maybe_update(pos, force)
    def _targets_at(self, frac):
        from fasterai.core.schedule import Schedule as FSchedule, sched_agp as f_sched_agp
        progress = FSchedule(f_sched_agp, start_pct=self.schedule.start_pct, end_pct=self.schedule.end_pct).progress(round(min(1., self._pos), 3))  # our window
        targets = self.targets if isinstance(self.targets, dict) else {n: self.targets for n in self._groups}
        # fasterai: threshold = kthvalue(k), k = max(1, int(s*n)); keeps scores >= threshold, so prunes k - 1
        return {n: (max(1, int(t * progress * self._groups[n])) - 1) / self._groups[n] for n,t in targets.items()}

def conv_zeros(model):
    return {n: int((m.weight == 0).sum()) for n,m in model.named_modules() if isinstance(m, nn.Conv2d)}

def run(method, sparsity, seed, a):
    set_seed(seed, reproducible=True)  # torch, numpy and python's random (fastai's shuffling): paired runs per seed
    dls = digits_dls(bs=64, size=a.size, seed=42)
    model = digits_cnn(a.width)
    steady_from = a.epochs // 2 + 1  # after the schedule ends (first steady epoch excluded)
    cbs, cb = [BatchTimer()], None
    if a.first_dense:  # the 288-weight first conv stays dense in both libraries: equal kept counts elsewhere
        sparsity = {n: sparsity for n,m in model.named_modules() if isinstance(m, nn.Conv2d) and n != '0'}
    if method in ('fastsparse', 'matched'):
        cls = AtFasteraiCounts if method == 'matched' else SparsifyCallback
        cb = cls(sparsity, 'weight', 'local', 'large_final', agp.with_pcts(0., 0.5), layer_type=nn.Conv2d)
    elif method == 'fasterai':
        from fasterai.sparse.sparsify_callback import SparsifyCallback as FSparsifyCallback
        from fasterai.core.criteria import large_final as f_large_final
        from fasterai.core.schedule import Schedule as FSchedule, sched_agp as f_sched_agp
        cb = FSparsifyCallback(sparsity, 'weight', 'local', f_large_final, FSchedule(f_sched_agp, start_pct=0., end_pct=0.5),
                               layer_type=nn.Conv2d)
    if cb is not None: cbs.append(self_timed(cb, steady_from))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # fasterai prints; we don't
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(a.epochs, a.lr)
    steady = [t for e,t,_ in cbs[0].times if e >= steady_from]  # read before validate(), which fires before_fit again
    span = [t for e,_,t in cbs[0].times if e >= steady_from]
    with contextlib.redirect_stdout(io.StringIO()): acc = float(learn.validate()[1])  # fasterai prints here too
    zeros = conv_zeros(model)
    sizes = {n: m.weight.numel() for n,m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return dict(acc=acc, batch=statistics.median(steady), cb=(cb.__dict__['_self_time'] / len(steady)) if cb else 0.,
                span=statistics.median(span), outside=(cb.__dict__['_outside'] / len(steady)) if cb else 0.,
                sparsity=sum(zeros.values()) / sum(sizes.values()), layer_sparsity={n: zeros[n] / sizes[n] for n in zeros},
                weights={k: v.detach().clone() for k,v in model.state_dict().items() if not k.split('.')[-1].startswith('_')})  # not fasterai's buffers

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
    ap.add_argument('--no-matched', dest='matched', action='store_false', help="skip fastsparse at fasterai's counts")
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
            order = methods[seed % 3:] + methods[:seed % 3]  # rotate the order: no method always runs first
            order.append('dense2')  # dense again, last: how far apart two identical runs land (the noise floor)
            if a.matched: order.append('matched')  # fastsparse at fasterai's counts at every step: like for like
            for m in order:
                r = run({'dense2': 'dense'}.get(m, m), lvl, seed, a)
                res.setdefault((m, lvl), []).append(r)
                print(f"  {m:<10} sparsity {lvl:.2f} seed {seed}: acc {r['acc']:.4f}  batch {r['batch']*1e3:.2f} ms  after-backward {r['span']*1e6:.0f} us  "
                      f"callback {r['cb']*1e6:.0f} us/batch  conv sparsity {r['sparsity']:.5f}", file=sys.stderr, flush=True)
    print(f"digits {a.size}x{a.size}, digits_cnn({a.width}), {a.epochs} epochs, one-cycle lr {a.lr}, AGP over 0-50%, "
          f"{a.seeds} seeds, {a.threads} threads" + (", first conv dense in both" if a.first_dense else ''))
    pct = lambda x: f"{100*x:+.2f}%"
    rel = lambda m, lvl, k: [r[k] / d['batch'] for r, d in zip(res[(m, lvl)], res[('dense', lvl)])]  # per pair
    print(f"\n{'sparsity':>8} | {'acc dense':>9} | {'fastsparse':>10} | {'fasterai':>8} | "
          + (f"{'fastsparse@fasterai-counts':>26} | " if a.matched else '')
          + f"{'time/dense fs':>13} | {'fai':>7} | {'callback/dense fs':>17} | {'fai':>6}")
    for lvl in levels:
        mean = lambda m: statistics.mean(r['acc'] for r in res[(m, lvl)])
        print(f"{lvl:>8.2f} | {mean('dense'):>9.4f} | {mean('fastsparse'):>10.4f} | {mean('fasterai'):>8.4f} | "
              + (f"{mean('matched') if ('matched', lvl) in res else float('nan'):>26.4f} | " if a.matched else '')
              + f"{pct(statistics.median(rel('fastsparse', lvl, 'batch')) - 1):>13} | {pct(statistics.median(rel('fasterai', lvl, 'batch')) - 1):>7} | "
              f"{pct(statistics.mean(rel('fastsparse', lvl, 'cb'))):>17} | {pct(statistics.mean(rel('fasterai', lvl, 'cb'))):>6}")
    # every pair of every level together
    allrel = lambda m, k: [x for lvl in levels for x in rel(m, lvl, k)]
    fs_cb, fai_cb = allrel('fastsparse', 'cb'), allrel('fasterai', 'cb')
    d2 = [x - 1 for x in allrel('dense2', 'batch')]
    print(f"\nall {len(fs_cb)} pairs: time/dense median fastsparse {pct(statistics.median(allrel('fastsparse', 'batch')) - 1)}, "
          f"fasterai {pct(statistics.median(allrel('fasterai', 'batch')) - 1)}; the same dense run again: median {pct(statistics.median(d2))}, "
          f"from {pct(min(d2))} to {pct(max(d2))}")
    print(f"callback time per batch: fastsparse {statistics.mean(r['cb'] for lvl in levels for r in res[('fastsparse', lvl)])*1e6:.0f} us "
          f"({pct(statistics.mean(fs_cb))} of a dense batch, max {pct(max(fs_cb))}), "
          f"fasterai {statistics.mean(r['cb'] for lvl in levels for r in res[('fasterai', lvl)])*1e6:.0f} us "
          f"({pct(statistics.mean(fai_cb))}, max {pct(max(fai_cb))}); fastsparse lower in {sum(f < g for f, g in zip(fs_cb, fai_cb))} of {len(fs_cb)} pairs")
    # what the callback adds to a batch, the optimizer's share included: a callback that pays the first
    # memory-touching op after backward makes the optimizer step that follows it faster, and vice versa
    added = lambda m: [(r['span'] - d['span'] + r['outside']) / d['batch']
                       for lvl in levels for r, d in zip(res[(m, lvl)], res[('dense', lvl)])]
    fs_add, fai_add, d2_add = added('fastsparse'), added('fasterai'), added('dense2')
    print(f"added per batch (after-backward span minus dense's, plus callback time elsewhere): "
          f"fastsparse mean {pct(statistics.mean(fs_add))} (max {pct(max(fs_add))}), fasterai mean {pct(statistics.mean(fai_add))} "
          f"(max {pct(max(fai_add))}), dense again {pct(statistics.mean(d2_add))}; "
          f"fastsparse lower in {sum(f < g for f, g in zip(fs_add, fai_add))} of {len(fs_add)} pairs")
    cmp = [('callback time', '', fs_cb, fai_cb), ('added', '', fs_add, fai_add)]
    if a.matched:  # the same arithmetic as fasterai's run, step for step: only the two libraries' mechanics differ
        cmp += [('callback time', " at fasterai's counts", allrel('matched', 'cb'), fai_cb), ('added', " at fasterai's counts", added('matched'), fai_add)]
    for what, at, xs, ys in cmp:
        d = [f - g for f, g in zip(xs, ys)]  # paired by level and seed
        se = statistics.stdev(d) / len(d) ** .5 if len(d) > 1 else float('nan')
        print(f"{what}, fastsparse{at} - fasterai, paired: mean {pct(statistics.mean(d))} of a dense batch (standard error {100*se:.2f} points); "
              f"lower in {sum(x < 0 for x in d)} of {len(d)}")
    # accuracy, paired by seed: how far apart the two libraries land, and how far a seed moves either of them
    spread = lambda m, lvl: max(r['acc'] for r in res[(m, lvl)]) - min(r['acc'] for r in res[(m, lvl)])
    for lvl in levels:
        for m, what in [('fastsparse', 'at the target counts'), ('matched', "at fasterai's counts")]:
            if (m, lvl) not in res: continue
            diff = [f['acc'] - g['acc'] for f, g in zip(res[(m, lvl)], res[('fasterai', lvl)])]
            se = statistics.stdev(diff) / len(diff) ** .5 if len(diff) > 1 else float('nan')
            print(f"{lvl:.2f}: accuracy fastsparse {what} - fasterai, paired by seed: mean {statistics.mean(diff):+.4f} "
                  f"(standard error {se:.4f}; per seed {', '.join(f'{d:+.4f}' for d in diff)}); "
                  f"spread over seeds fastsparse {spread(m, lvl):.4f}, fasterai {spread('fasterai', lvl):.4f}")
    for m, what in [('fastsparse', 'at the target counts'), ('matched', "at fasterai's counts")]:  # every level together
        if not all((m, lvl) in res for lvl in levels): continue
        diff = [f['acc'] - g['acc'] for lvl in levels for f, g in zip(res[(m, lvl)], res[('fasterai', lvl)])]
        se = statistics.stdev(diff) / len(diff) ** .5 if len(diff) > 1 else float('nan')
        print(f"all levels: accuracy fastsparse {what} - fasterai over {len(diff)} pairs: mean {statistics.mean(diff):+.4f} "
              f"(standard error {se:.4f}); ahead in {sum(d > 0 for d in diff)}, level in {sum(d == 0 for d in diff)}, "
              f"behind in {sum(d < 0 for d in diff)}")
    if a.matched:
        same = lambda r, g: r.keys() == g.keys() and all(torch.equal(r[k], g[k]) for k in r)
        pairs = [(f, g) for lvl in levels for f, g in zip(res[('matched', lvl)], res[('fasterai', lvl)])]
        n_same = sum(same(f['weights'], g['weights']) for f, g in pairs)
        print(f"fastsparse at fasterai's counts at every step: final weights, BatchNorm statistics included, bit-identical to fasterai's "
              f"in {n_same} of {len(pairs)} pairs; accuracy equal in {sum(f['acc'] == g['acc'] for f, g in pairs)} of {len(pairs)}")
    for lvl in levels:
        fs, fai = res[('fastsparse', lvl)], res[('fasterai', lvl)]
        print(f"{lvl:.2f}: achieved conv sparsity fastsparse {fs[0]['sparsity']:.5f}, fasterai {fai[0]['sparsity']:.5f}; "
              f"first conv {fs[0]['layer_sparsity']['0']:.4f} vs {fai[0]['layer_sparsity']['0']:.4f}")

if __name__ == '__main__': main()
