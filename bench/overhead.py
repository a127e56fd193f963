"""Training overhead and accuracy: dense vs fastsparse vs fasterai 0.4.1, same model, data and seeds.

A CNN on scikit-learn's digits (upsampled to 16x16) is trained with Adam and a one-cycle policy.
Both libraries prune the conv layers with magnitude (`large_final`), local context, the AGP cubic
schedule from 0% to 50% of training; the second half is the steady state, where the masks are fixed
and only their upkeep costs time.

Accuracy: for each level and seed, dense, fastsparse and fasterai train separately from the same
initial weights on the same batch order. `fastsparse@fasterai-counts` trains fastsparse once more,
pruning at every mask update exactly as many weights per layer as fasterai prunes there. fasterai takes
the `kthvalue` at `k = max(1, int(s*n))` and keeps every weight `>=` it, so it prunes `k - 1`: one or two
weights per layer fewer than `round(s*n)`, which matters in the 288-weight first conv (7 kept instead of
6 at 98%); and it reads its schedule at `round(pct_train, 3)`. Same kept counts at every step, same
initial weights and batches: the like-for-like comparison of the two training rules. The script
compares the final weights of the two runs bit for bit.

The same three sparse runs are repeated in global context (one magnitude threshold over all conv layers,
each library's `context='global'`; fasterai prunes `k - 1` of all the conv weights there, `k = int(s*N)`):
the two libraries against each other, and what a global threshold buys over the same sparsity in every
layer. The cost is measured in local context only: in steady state the masks are fixed, and their upkeep
does not depend on how they were chosen.

Cost: separate runs can't resolve it. Two identical dense runs, one after the other or even taking turns
batch by batch in two threads, differ by several percent per batch on this machine (4-10% in the runs of
`bench/run_to_run.py`), and the difference sticks to the run (its memory, not the moment). So the cost is measured inside one fit (`alternate`) that carries
both libraries' callbacks: in the steady epochs every training batch runs as dense, fastsparse or
fasterai (a fresh random order each round of three), on the same model, optimizer and memory; a gated
callback doesn't run at all. Per fit, each variant's batches give
- `time/dense`: median wall time of a batch over dense's median, minus 1. Forward and backward are the
  same for all three and dominate its noise (about 1% per fit);
- `added`: median time from the end of backward to the end of every callback's `after_step` (callbacks,
  optimizer step, `zero_grad`) minus dense's, plus the callback's (median) time in its other batch events, over
  dense's median batch: what the callback adds to a batch, the optimizer's share included (work right
  after backward can move time into or out of the step that follows, so the step is counted too);
- `callback`: median time inside the callback itself per batch (all its batch events, fastai's dispatch to it
  included) over dense's median batch.
In that fit the masked weights drift in dense batches (nothing holds them); the timing doesn't depend on
the values. fasterai's callback is declared `can_move_zeros = False` there (it only multiplies weights by
its masks), so fastsparse skips the re-zero after the step as it does in its own run; the script checks it.

    python bench/overhead.py                # 90% and 98%, 3 seeds, local and global, fastsparse also at fasterai's counts
                                            # (about 6 minutes on 2 cores); writes bench/results/overhead.md
    python bench/overhead.py --levels 0.8,0.9,0.95,0.98   # more levels
    python bench/overhead.py --quick --out /tmp/o          # one level, one seed, few epochs: a smoke run
"""
import argparse, contextlib, io, random, statistics, sys, time, warnings
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pandas as pd
import torch, torch.nn as nn
from common import parser, start
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, accuracy, defaults, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.callback.progress import ProgressCallback
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.callback import SparsifyCallback
from fastsparse.schedule import agp
from fastsparse.sparse_training import GradualPruning

class Alternate(Callback):
    "From epoch `steady_from` on, run each training batch as dense, fastsparse or fasterai, in a fresh random order every round; time each batch"
    order = -100  # first at every event
    can_move_zeros = False  # it only reads the clock: fastsparse needn't re-zero weights after each step on its account
    variants = ('dense', 'fastsparse', 'fasterai')
    variant, _rec = None, None  # class defaults: a Callback hands unknown attributes on to the Learner
    def __init__(self, cbs:dict, steady_from:int, seed:int):  # cbs: {'fastsparse': callback, 'fasterai': callback}
        self.steady_from, self.rng, self.queue, self.variant, self.records = steady_from, random.Random(seed), [], None, []
        for name, cb in cbs.items(): _gate(cb, self, name)
    def before_batch(self):
        self.variant, self._rec = None, None  # None: every callback runs (the schedule's epochs, validation)
        if self.training and self.epoch >= self.steady_from:
            if not self.queue: self.queue = self.rng.sample(self.variants, len(self.variants))
            self.variant = self.queue.pop()
            self._rec = dict(variant=self.variant, cb=0., outside=0.)
            self.records.append(self._rec)
        self._t = time.perf_counter()
    def after_backward(self): self._b = time.perf_counter()  # backward done; no other callback has run yet
    def after_batch(self):  # every callback's after_step, the optimizer step and zero_grad are done; no other after_batch has run
        if self._rec is not None: self._rec['span'] = time.perf_counter() - self._b

class BatchEnd(Callback):
    "Close `alt`'s batch record after every callback's `after_batch` (fastsparse moves its schedule's clock there)"
    order = 10_000  # last at every event
    def __init__(self, alt): self.alt = alt
    def after_batch(self):
        if self.alt._rec is not None: self.alt._rec['batch'] = time.perf_counter() - self.alt._t

def _gate(cb, alt, name):
    "Let `cb` run only in `alt`'s batches of variant `name` (and outside them), adding the time of its batch events to the batch's record"
    cls = type(cb)
    def __call__(self, event_name):
        if alt.variant not in (None, name): return None
        t = time.perf_counter()
        try: return cls.__call__(self, event_name)
        finally:
            if alt._rec is not None and event_name in _BATCH_EVENTS:
                dt = time.perf_counter() - t
                alt._rec['cb'] += dt
                if event_name not in _SPAN_EVENTS: alt._rec['outside'] += dt
    object.__setattr__(cb, '__class__', type(cls.__name__, (cls,), {'__call__': __call__}))

_BATCH_EVENTS = set("before_batch after_pred after_loss before_backward after_backward before_step after_step "
                    "after_cancel_step after_batch".split())
_SPAN_EVENTS = set("after_backward before_step after_step after_cancel_step".split())  # inside the post-backward span

class AtFasteraiCounts(GradualPruning):
    "fastsparse's gradual pruning, pruning at every mask update as many weights per layer as fasterai 0.4.1 prunes at that point of training"
    _pos, n_iter, n_epoch = 0., None, None  # n_iter, n_epoch: the fit's batches per epoch and epochs (set before the fit)
    def update(self, st, pos):
        self._pos = pos  # fraction of training done: fasterai's `pct_train` at the next batch
        return super().update(st, pos)
    def fastai_pct(self, pos):
        "fastai's `pct_train` where fastsparse's clock reads `pos`: set to epoch/n_epoch at each epoch, then summed batch by batch in floating point"
        i = round(pos * self.n_iter * self.n_epoch)  # training batches done
        e, j = divmod(i, self.n_iter)
        pct = e / self.n_epoch
        for _ in range(j): pct += 1. / (self.n_iter * self.n_epoch)
        return pct
    def targets_at(self, frac):
        from fasterai.core.schedule import Schedule as FSchedule, sched_agp as f_sched_agp
        # fasterai reads its schedule at round(pct_train, 3): where a batch count lands on a half-thousandth exactly (8 epochs
        # of 22 batches: 11/176 = 0.0625), fastai's summed pct_train rounds the other way than the exact fraction would
        pct = min(1., self.fastai_pct(self._pos)) if self.n_iter else min(1., self._pos)
        progress = FSchedule(f_sched_agp, start_pct=self.schedule.start_pct, end_pct=self.schedule.end_pct).progress(round(pct, 3))  # our window
        # fasterai: threshold = kthvalue(k), k = max(1, int(s*n)); keeps scores >= threshold, so prunes k - 1
        if self.context == 'global':  # one threshold over all layers' scores: n is every selected weight
            return (max(1, int(self.sparsity * progress * self._G)) - 1) / self._G
        return {n: (max(1, int(t * progress * self._groups[n])) - 1) / self._groups[n] for n,t in self.targets.items()}

class ZeroCounts(Callback):
    "Each conv layer's count of zero weights in every training batch, once both libraries have updated their masks for it"
    order = 10_000
    def __init__(self): self.counts = []  # (not reset in before_fit: `validate` runs before_fit too)
    def after_pred(self):  # fastsparse updates after the batch before, fasterai in this batch's before_batch
        if self.learn.training: self.counts.append(tuple(int((m.weight == 0).sum()) for m in self.model.modules() if isinstance(m, nn.Conv2d)))

def conv_zeros(model):
    return {n: int((m.weight == 0).sum()) for n,m in model.named_modules() if isinstance(m, nn.Conv2d)}

def _fasterai_cb(sparsity, context='local'):
    from fasterai.sparse.sparsify_callback import SparsifyCallback as FSparsifyCallback
    from fasterai.core.criteria import large_final as f_large_final
    from fasterai.core.schedule import Schedule as FSchedule, sched_agp as f_sched_agp
    return FSparsifyCallback(sparsity, 'weight', context, f_large_final, FSchedule(f_sched_agp, start_pct=0., end_pct=0.5),
                             layer_type=nn.Conv2d)

def _fit(learn, a):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # fasterai prints; we don't
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(a.epochs, a.lr)

def _setup(sparsity, seed, a):
    set_seed(seed, reproducible=True)  # torch, numpy and python's random (fastai's shuffling): paired runs per seed
    dls, model = digits_dls(bs=64, size=a.size, seed=42), digits_cnn(a.width)
    if a.first_dense:  # the 288-weight first conv stays dense in both libraries: equal kept counts elsewhere
        sparsity = {n: sparsity for n,m in model.named_modules() if isinstance(m, nn.Conv2d) and n != '0'}
    return dls, model, sparsity

def run(method, sparsity, seed, a):
    "Train one run of `method` ('dense', 'fastsparse', 'fasterai' or 'matched'; '/global' after a sparse one: one threshold over all conv layers); return its accuracy, sparsity and final weights"
    method, _, context = method.partition('/')
    context = context or 'local'
    dls, model, sparsity = _setup(sparsity, seed, a)
    if context == 'global' and isinstance(sparsity, dict): raise ValueError("--first-dense gives per-layer targets, which need the local context")
    cb = None
    if method in ('fastsparse', 'matched'):
        cb = SparsifyCallback(sparsity, 'weight', context, 'large_final', agp.with_pcts(0., 0.5), layer_type=nn.Conv2d)
        if method == 'matched':  # the same callback with the counts of fasterai
            cb.policy = AtFasteraiCounts(sparsity, 'weight', context, 'large_final', agp.with_pcts(0., 0.5), layer_type=nn.Conv2d)
            cb.policy.n_iter, cb.policy.n_epoch = len(dls.train), a.epochs
    elif method == 'fasterai': cb = _fasterai_cb(sparsity, context)
    zlog = ZeroCounts()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[cb, zlog] if cb else [])
    _fit(learn, a)
    with contextlib.redirect_stdout(io.StringIO()): acc = float(learn.validate()[1])  # fasterai prints here too
    zeros = conv_zeros(model)
    sizes = {n: m.weight.numel() for n,m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return dict(acc=acc, zero_counts=zlog.counts, sparsity=sum(zeros.values()) / sum(sizes.values()), layer_sparsity={n: zeros[n] / sizes[n] for n in zeros},
                weights={k: v.detach().clone() for k,v in model.state_dict().items() if not k.split('.')[-1].startswith('_')})  # not fasterai's buffers

def alternate(sparsity, seed, a):
    "One fit with both libraries' callbacks; in the steady epochs each batch runs as dense, fastsparse or fasterai: per-batch records"
    dls, model, sparsity = _setup(sparsity, seed, a)
    fs = SparsifyCallback(sparsity, 'weight', 'local', 'large_final', agp.with_pcts(0., 0.5), layer_type=nn.Conv2d)
    fai = _fasterai_cb(sparsity)
    fai.__dict__['can_move_zeros'] = False  # its after_step only multiplies weights by its masks: fastsparse needn't re-zero on its account
    alt = Alternate({'fastsparse': fs, 'fasterai': fai}, steady_from=a.epochs // 2 + 1, seed=seed)  # the schedule ends at 50%
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[alt, fs, fai, BatchEnd(alt)])
    _fit(learn, a)
    assert not fs.rezero_after_step()  # as in fastsparse's own run: no re-zero after the step
    return alt.records

def main():
    ap = parser(__doc__, quick='one level, one seed, few epochs: a smoke run')
    ap.add_argument('--levels', default='0.9,0.98')
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--epochs', type=int, default=8)
    ap.add_argument('--cost-epochs', type=int, default=16, help='epochs of each fit that measures the cost (AGP over the first half)')
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--size', type=int, default=16)
    ap.add_argument('--width', type=int, default=32)
    ap.add_argument('--no-matched', dest='matched', action='store_false', help="skip fastsparse at fasterai's counts")
    ap.add_argument('--first-dense', action='store_true', help='keep the first conv dense in both libraries (local context only)')
    ap.add_argument('--no-global', dest='global_', action='store_false', help='skip the runs in global context')
    a = ap.parse_args()
    run_ = start('overhead', a)
    if a.first_dense: a.global_ = False  # per-layer targets need the local context
    if a.quick: a.levels, a.seeds, a.epochs, a.cost_epochs, a.global_ = '0.9', 1, 2, 4, False
    defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
    levels = [float(x) for x in a.levels.split(',')]
    res, cost = {}, {}
    for lvl in levels:
        for seed in range(a.seeds):
            methods = ['dense', 'fastsparse', 'fasterai'] + (['matched'] if a.matched else [])
            methods = methods[seed % 3:3] + methods[:seed % 3] + methods[3:]  # rotate the order: no method always runs first
            methods += [m + '/global' for m in methods if m != 'dense'] if a.global_ else []
            for m in methods:
                r = run(m, lvl, seed, a)
                res.setdefault((m, lvl), []).append(r)
                print(f"  {m:<17} sparsity {lvl:.2f} seed {seed}: acc {r['acc']:.4f}  conv sparsity {r['sparsity']:.5f}", flush=True)
            recs = alternate(lvl, seed, argparse.Namespace(**{**vars(a), 'epochs': a.cost_epochs}))
            med = lambda v, k: statistics.median(r[k] for r in recs if r['variant'] == v)
            d_batch, d_span = med('dense', 'batch'), med('dense', 'span')
            for v in ('fastsparse', 'fasterai'):
                c = dict(time=med(v, 'batch') / d_batch - 1, cb=med(v, 'cb') / d_batch, cb_us=med(v, 'cb'), dense_batch=d_batch,
                         added=(med(v, 'span') - d_span + med(v, 'outside')) / d_batch, n=sum(r['variant'] == v for r in recs))
                cost.setdefault((v, lvl), []).append(c)
                print(f"  alternating sparsity {lvl:.2f} seed {seed}: {v:<10} batch {100*c['time']:+.2f}% over dense ({d_batch*1e3:.2f} ms), "
                      f"callback {c['cb_us']*1e6:.0f} us, added {100*c['added']:+.2f}% ({c['n']} batches)", flush=True)
    contexts = ['local'] + (['global'] if a.global_ else [])
    key = lambda m, ctx: m if ctx == 'local' else f"{m}/global"  # the method's name in `res`
    print(f"digits {a.size}x{a.size}, digits_cnn({a.width}), {a.epochs} epochs ({a.cost_epochs} in the fits that measure the cost), "
          f"one-cycle lr {a.lr}, AGP over 0-50%, {a.seeds} seeds, {torch.get_num_threads()} torch threads" + (", first conv dense in both" if a.first_dense else ''))
    acc = lambda m, lvl: statistics.mean(r['acc'] for r in res[(m, lvl)])
    cols = ['fastsparse', 'fasterai'] + (['matched'] if a.matched else [])
    name = {'fastsparse': 'fastsparse', 'fasterai': 'fasterai', 'matched': 'fastsparse@fasterai-counts'}
    print(f"\naccuracy, mean over {a.seeds} seeds (separate {a.epochs}-epoch runs):")
    heads = [f"{ctx} {name[m]}" if i == 0 else name[m] for ctx in contexts for i, m in enumerate(cols)]
    arms = [key(m, ctx) for ctx in contexts for m in cols]
    print(f"{'sparsity':>8} | {'dense':>6} | " + ' | '.join(heads))
    for lvl in levels:
        print(f"{lvl:>8.2f} | {acc('dense', lvl):>6.4f} | " + ' | '.join(f"{acc(k, lvl):>{len(h)}.4f}" for k, h in zip(arms, heads)))
    pct = lambda x: f"{100*x:+.2f}%"
    cm = lambda v, lvl, k: statistics.mean(c[k] for c in cost[(v, lvl)])
    print(f"\nsteady-state cost (local context), mean over {a.seeds} fits where dense, fastsparse and fasterai batches alternate:")
    print(f"{'sparsity':>8} | {'time/dense fs':>13} | {'fai':>7} | {'added fs':>8} | {'fai':>7} | {'callback fs':>11} | {'fai':>7}")
    for lvl in levels:
        print(f"{lvl:>8.2f} | {pct(cm('fastsparse', lvl, 'time')):>13} | {pct(cm('fasterai', lvl, 'time')):>7} | "
              f"{pct(cm('fastsparse', lvl, 'added')):>8} | {pct(cm('fasterai', lvl, 'added')):>7} | "
              f"{pct(cm('fastsparse', lvl, 'cb')):>11} | {pct(cm('fasterai', lvl, 'cb')):>7}")
    allc = lambda v, k: [c[k] for lvl in levels for c in cost[(v, lvl)]]  # one value per fit, every level
    n = len(allc('fastsparse', 'time'))
    print(f"\nsteady-state cost, measured in {n} fits where dense, fastsparse and fasterai batches alternate "
          f"({sum(allc('fastsparse', 'n'))} fastsparse batches in all); per fit, then the mean over fits:")
    for what, k in [('time per batch over dense', 'time'), ('added after backward, over a dense batch', 'added'),
                    ("callback's own time, over a dense batch", 'cb')]:
        fs, fai = allc('fastsparse', k), allc('fasterai', k)
        d = [f - g for f, g in zip(fs, fai)]  # paired by fit
        se = statistics.stdev(d) / len(d) ** .5 if len(d) > 1 else float('nan')
        print(f"  {what}: fastsparse {pct(statistics.mean(fs))} (max {pct(max(fs))}), fasterai {pct(statistics.mean(fai))} "
              f"(max {pct(max(fai))}); fastsparse - fasterai {pct(statistics.mean(d))} (standard error {100*se:.2f} points), lower in {sum(x < 0 for x in d)} of {n}")
    print(f"  callback time per batch: fastsparse {statistics.mean(allc('fastsparse', 'cb_us'))*1e6:.0f} us, "
          f"fasterai {statistics.mean(allc('fasterai', 'cb_us'))*1e6:.0f} us; dense batch {statistics.mean(allc('fastsparse', 'dense_batch'))*1e3:.2f} ms")
    # accuracy, paired by seed: how far apart two arms land, and how far a seed moves either of them
    spread = lambda m, lvl: max(r['acc'] for r in res[(m, lvl)]) - min(r['acc'] for r in res[(m, lvl)])
    def paired(f, g, lvl):
        d = [x['acc'] - y['acc'] for x, y in zip(res[(f, lvl)], res[(g, lvl)])]
        return d, statistics.stdev(d) / len(d) ** .5 if len(d) > 1 else float('nan')
    identical = {}  # context: (pairs bit-identical, pairs)
    for ctx in contexts:
        fai = key('fasterai', ctx)
        print(f"\n{ctx} context:")
        for lvl in levels:
            for m, what in [('fastsparse', 'at the target counts'), ('matched', "at fasterai's counts")]:
                if (key(m, ctx), lvl) not in res: continue
                diff, se = paired(key(m, ctx), fai, lvl)
                print(f"{lvl:.2f}: accuracy fastsparse {what} - fasterai, paired by seed: mean {statistics.mean(diff):+.4f} "
                      f"(standard error {se:.4f}; per seed {', '.join(f'{d:+.4f}' for d in diff)}); "
                      f"spread over seeds fastsparse {spread(key(m, ctx), lvl):.4f}, fasterai {spread(fai, lvl):.4f}")
        for m, what in [('fastsparse', 'at the target counts'), ('matched', "at fasterai's counts")]:  # every level together
            if not all((key(m, ctx), lvl) in res for lvl in levels): continue
            diff = [d for lvl in levels for d in paired(key(m, ctx), fai, lvl)[0]]
            se = statistics.stdev(diff) / len(diff) ** .5 if len(diff) > 1 else float('nan')
            print(f"all levels: accuracy fastsparse {what} - fasterai over {len(diff)} pairs: mean {statistics.mean(diff):+.4f} "
                  f"(standard error {se:.4f}); ahead in {sum(d > 0 for d in diff)}, level in {sum(d == 0 for d in diff)}, "
                  f"behind in {sum(d < 0 for d in diff)}")
        if a.matched:
            same = lambda r, g: r.keys() == g.keys() and all(torch.equal(r[k], g[k]) for k in r)
            pairs = [(f, g) for lvl in levels for f, g in zip(res[(key('matched', ctx), lvl)], res[(fai, lvl)])]
            n_same = sum(same(f['weights'], g['weights']) for f, g in pairs)
            differ = [(f, g) for f, g in pairs if not same(f['weights'], g['weights'])]
            n_counts = sum(f['zero_counts'] != g['zero_counts'] for f, g in differ)
            identical[ctx] = (n_same, len(pairs), n_counts)
            for f, g in differ:
                i = next((i for i, (x, y) in enumerate(zip(f['zero_counts'], g['zero_counts'])) if x != y), None)
                print(f"  a pair that differs: " + (f"zero counts first differ at batch {i}: fastsparse {f['zero_counts'][i]}, fasterai {g['zero_counts'][i]}"
                                                  if i is not None else "the same zero counts at every batch"))
            print(f"fastsparse at fasterai's counts at every step: final weights, BatchNorm statistics included, bit-identical to fasterai's "
                  f"in {n_same} of {len(pairs)} pairs; accuracy equal in {sum(f['acc'] == g['acc'] for f, g in pairs)} of {len(pairs)}")
        for lvl in levels:
            fs, fa = res[(key('fastsparse', ctx), lvl)], res[(fai, lvl)]
            per_layer = lambda r: ', '.join(f"{v:.4f}" for v in r['layer_sparsity'].values())
            print(f"{lvl:.2f}: achieved conv sparsity fastsparse {fs[0]['sparsity']:.5f}, fasterai {fa[0]['sparsity']:.5f}; "
                  f"per conv (seed 0) {per_layer(fs[0])} vs {per_layer(fa[0])}")
    if a.global_:  # what one threshold over all layers buys over the same sparsity in every layer
        print("\nglobal - local context, paired by seed:")
        for lvl in levels:
            parts = []
            for m in ('fastsparse', 'fasterai'):
                diff, se = paired(key(m, 'global'), m, lvl)
                parts.append(f"{m} {statistics.mean(diff):+.4f} (standard error {se:.4f}, ahead in {sum(d > 0 for d in diff)} of {len(diff)})")
            print(f"{lvl:.2f}: accuracy " + '; '.join(parts))
    write(run_, a, levels, contexts, res, cost, identical, acc, cm, allc, key)

INTRO = """`bench/overhead.py` trains a CNN on scikit-learn's digits (16x16) with Adam and a one-cycle policy, dense and made
sparse by fastsparse and by fasterai 0.4.1 (magnitude, AGP from 0% to 50% of the fit, the conv layers), from the same
initial weights on the same batch order, per seed. `fastsparse@fasterai-counts` prunes at every update exactly as many
weights per layer as fasterai does (fasterai keeps every weight at or above its `kthvalue`, one or two more than the
target): same counts, same weights and batches, so its final weights are compared with fasterai's bit for bit. The
steady-state cost (masks fixed) is measured inside single fits in which every training batch runs as dense, fastsparse
or fasterai, in a fresh random order every round of three: separate fits differ by several percent per batch from one
run to the next (see the run-to-run benchmark), more than the cost itself."""

def write(run_, a, levels, contexts, res, cost, identical, acc, cm, allc, key):
    "The summary table, the plot and the reading of the run"
    rows = []
    for lvl in levels:
        r = {'sparsity': f"{lvl:.0%}", 'dense acc': acc('dense', lvl)}
        for ctx in contexts:
            for m, nm in [('fastsparse', 'fastsparse'), ('fasterai', 'fasterai')]:
                r[f"{nm} {ctx}"] = acc(key(m, ctx), lvl)
        r['callback us fastsparse'] = cm('fastsparse', lvl, 'cb_us') * 1e6
        r['callback us fasterai'] = cm('fasterai', lvl, 'cb_us') * 1e6
        r['batch over dense fastsparse'] = f"{100*cm('fastsparse', lvl, 'time'):+.2f}%"
        r['batch over dense fasterai'] = f"{100*cm('fasterai', lvl, 'time'):+.2f}%"
        rows.append(r)
    summ = pd.DataFrame(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4), layout='constrained')
    x = [100 * l for l in levels]
    ax1.plot(x, [acc('dense', l) for l in levels], 'k*--', label='dense')
    for ctx, ls in zip(contexts, ['-', ':']):
        for m, mk in [('fastsparse', 'o'), ('fasterai', 's')]:
            ax1.plot(x, [acc(key(m, ctx), l) for l in levels], mk + ls, label=f"{m} {ctx}")
    ax1.set_xlabel('conv sparsity (%)'); ax1.set_ylabel(f'valid accuracy, mean of {a.seeds} seeds'); ax1.legend(fontsize=7)
    ax1.set_title('accuracy', fontsize=9)
    w = 0.38
    for i, (v, what) in enumerate([('fastsparse', 'fastsparse'), ('fasterai', 'fasterai')]):
        ax2.bar([j + (i - .5) * w for j in range(len(levels))], [100 * cm(v, l, 'added') for l in levels], w, label=what)
    ax2.axhline(0, color='k', lw=.5)
    ax2.set_xticks(range(len(levels)), [f"{l:.0%}" for l in levels]); ax2.set_xlabel('conv sparsity')
    ax2.set_ylabel('added per batch, % of a dense batch'); ax2.legend(fontsize=7)
    ax2.set_title('steady-state cost (callback, step and zero_grad)', fontsize=9)
    fs_add, fa_add = allc('fastsparse', 'added'), allc('fasterai', 'added')
    fs_t, fa_t = allc('fastsparse', 'time'), allc('fasterai', 'time')
    n = len(fs_t)
    ident = '; '.join(f"in {ctx} context, fastsparse at fasterai's counts ends bit-identical to fasterai in {k} of {m} runs"
                      for ctx, (k, m, _) in identical.items())
    ident = ident[:1].upper() + ident[1:]
    n_differ, n_counts = sum(m - k for k, m, _ in identical.values()), sum(c for *_, c in identical.values())
    wins = [(lvl, ctx) for lvl in levels for ctx in contexts if acc(key('fastsparse', ctx), lvl) > acc(key('fasterai', ctx), lvl)]
    reading = (f"How to read it: accuracies are means over {a.seeds} seeds of separate {a.epochs}-epoch fits. fastsparse at its own "
               f"(exact) target counts is ahead of fasterai in {len(wins)} of {len(levels) * len(contexts)} level-context cells. "
               + (ident + (': with the same kept counts the two training rules are the same computation. ' if not n_differ else
                           f'. In {n_counts} of the {n_differ} runs that differ, the zero counts differ at some batch (the output says where): '
                           'fasterai keeps every weight equal to its threshold, so where two weights tie there it prunes one fewer than '
                           'the k - 1 that the emulation of its counts prunes; ' + ('in the others the two training rules differ. '
                           if n_counts < n_differ else 'with the same counts at every batch, the two rules are the same computation. '))
                  if ident else '')
               + f"Steady-state cost over {n} alternating fit(s): a fastsparse batch's time differs from a dense one's by {100*statistics.mean(fs_t):+.2f}% "
               f"on average (largest {100*max(fs_t):+.2f}%), fasterai's {100*statistics.mean(fa_t):+.2f}% "
               f"(largest {100*max(fa_t):+.2f}%); what the callback adds after backward (its own time, the step and zero_grad) is "
               f"{100*statistics.mean(fs_add):+.2f}% for fastsparse and {100*statistics.mean(fa_add):+.2f}% for fasterai. The whole-batch "
               "figure carries the noise of forward and backward (about 1% per fit); the added figure is the cleaner one.")
    run_.write(title='Training overhead and accuracy against fasterai', intro=INTRO, summary=summ, reading=reading, fig=fig)

if __name__ == '__main__': main()
