"""Dynamic sparse training on digits: SET and RigL against a fixed random mask and against gradual magnitude pruning.

On scikit-learn's digits (1,437 training images of 8x8), every `Linear` layer of a 256-wide MLP (`digits_mlp(256)`,
84,480 weights) at 90% and at 95% sparsity, with 3 seeds, one run each of:

- `static`: `FixedSparsityCallback` on the random masks `random_masks` draws -- the very masks SET and RigL start from
  (checked at the start of every SET and RigL run);
- `SET`: `DynamicSparseCallback(regrow='set')`, random regrowth;
- `RigL`: `DynamicSparseCallback(regrow='rigl')`, regrowth where the dense gradient is largest;
- `GMP`: gradual magnitude pruning from dense, `SparsifyCallback(targets, 'weight', 'local', 'large_final', agp)`, to the
  same per-layer targets;
- `dense` (once per seed): the same MLP without masks, for reference.

All runs share the training budget (epochs, batches, one-cycle Adam, initialisation per seed) and the per-layer
allocation (`--distribution`, uniform by default). After every training batch of the static, SET and RigL runs the
number of masked weights of each layer is checked against its exact target, `round(s * n)`, and every masked weight
against zero; at the end of every sparse run (GMP included) the same is checked once more.

    python bench/dst.py                         # writes bench/results/dst.md (about 3 minutes on 2 cores)
    python bench/dst.py --quick --out /tmp/q    # a smoke run: one seed, 2 epochs (about 10 seconds)
"""
import time, warnings
import numpy as np, pandas as pd
import torch, torch.nn as nn
from common import parser, start
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, accuracy, set_seed, defaults
from fastai.callback.progress import ProgressCallback
import fastai.callback.schedule  # noqa: F401 (Learner.fit_one_cycle)
from fastsparse.callback import SparsifyCallback, FixedSparsityCallback, DynamicSparseCallback
from fastsparse.training import MaskedTraining
from fastsparse.schedule import agp
from fastsparse.dst import random_masks, erk_sparsities
from fastsparse.demo import digits_dls, digits_mlp

warnings.filterwarnings('ignore', category=FutureWarning)
pd.set_option('display.width', 200)
METHODS = ('static', 'SET', 'RigL', 'GMP')

class HeldCheck(Callback):
    "Checks the masks of the sparsity callback: the start masks (DST) and, after every training batch, exact counts and zeros"
    order = MaskedTraining.order + 1
    def __init__(self, cb, targets, start=None, every_batch=True):
        self.cb, self.targets, self.start, self.every_batch, self.checked = cb, targets, start, every_batch, 0
    def before_fit(self):
        if self.start is None: return
        for n, m in self.start.items(): assert torch.equal(self.cb.masks[n], m), f"{n}: the start masks are not random_masks'"
        self.start = None   # once: `validate` calls before_fit too
    def after_batch(self):
        if self.training and self.every_batch: self.check()
    def check(self):
        "Every layer: exactly round(t*n) masked weights, all of them zero"
        model = self.cb.sparsifier.model
        for n, t in self.targets.items():
            mask, w = self.cb.masks[f'{n}.weight'], model.get_submodule(n).weight
            assert int((~mask).sum()) == round(t * mask.numel()), (n, int((~mask).sum()), round(t * mask.numel()))
            assert not bool(w[~mask].any()), f"{n}: a masked weight is not zero"
        self.checked += 1

def run(method, sparsity, seed, a):
    "One fit; returns accuracy, loss, seconds, the checks made, and (DST) the share of active connections moved"
    set_seed(seed)
    model = digits_mlp(a.hidden)
    lt = nn.Linear
    if a.distribution == 'erk': targets = erk_sparsities(model, sparsity, lt)
    else: targets = {n: sparsity for n, m in model.named_modules() if isinstance(m, lt)}
    start_masks = random_masks(model, sparsity, a.distribution, lt, seed=seed)
    dst = dict(update_every=a.update_every, fraction=a.fraction, stop_pct=a.stop_pct, distribution=a.distribution,
               layer_type=lt, seed=seed)
    cb = {'static': lambda: FixedSparsityCallback(start_masks),
          'SET':    lambda: DynamicSparseCallback(sparsity, 'set', **dst),
          'RigL':   lambda: DynamicSparseCallback(sparsity, 'rigl', **dst),
          'GMP':    lambda: SparsifyCallback(targets, 'weight', 'local', 'large_final', agp.with_pcts(0., a.stop_pct)),
          'dense':  lambda: None}[method]()
    cbs = []
    if cb is not None:
        chk = HeldCheck(cb, targets, start_masks if method in ('SET', 'RigL') else None, every_batch=method != 'GMP')
        cbs = [cb, chk]
    learn = Learner(digits_dls(seed=42), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    t = time.perf_counter()
    with learn.no_logging(): learn.fit_one_cycle(a.epochs, a.lr)
    secs = time.perf_counter() - t
    res = dict(checks=0, moved=float('nan'), updates=0)
    if cb is not None:
        chk.check()
        res['checks'] = chk.checked
        if method in ('SET', 'RigL'):
            res['updates'] = len(cb.history)
            active0 = sum(int(m.sum()) for m in start_masks.values())
            res['moved'] = sum(int((cb.masks[n] & ~m).sum()) for n, m in start_masks.items()) / active0
            assert res['updates'] > 0 and res['moved'] > 0, f"{method}: no connection moved"
    loss, acc = learn.validate()[:2]
    return dict(accuracy=float(acc), loss=float(loss), seconds=secs, **res)

def plot(df, dense):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    levels = sorted(df.sparsity.unique())
    fig, axs = plt.subplots(1, len(levels), figsize=(3.6 * len(levels), 3), layout='constrained', squeeze=False, sharey=True)
    for ax, s in zip(axs[0], levels):
        d = df[df.sparsity == s]
        meths = list(dict.fromkeys(d.method))
        for i, m in enumerate(meths):
            acc = d[d.method == m].accuracy
            ax.bar(i, acc.mean(), color='tab:blue' if m in ('SET', 'RigL') else 'tab:gray', alpha=0.7)
            ax.plot([i] * len(acc), acc, 'k.', ms=5)
        if len(dense): ax.axhline(dense.accuracy.mean(), color='tab:green', ls='--', lw=1, label='dense')
        lo = min(df.accuracy.min(), dense.accuracy.min() if len(dense) else 1.)
        ax.set_ylim(max(0., lo - 0.03), 1.0)
        ax.set_xticks(range(len(meths)), meths); ax.set_title(f"{s:.0%} sparse", fontsize=9)
        ax.set_ylabel('valid accuracy (bars: mean; dots: seeds)', fontsize=8)
    axs[0][-1].legend(fontsize=7, loc='lower right')
    return fig

def reading(summ, dense, n_seeds):
    out = []
    for s, d in summ.groupby('sparsity', sort=False):
        acc, sd = d.set_index('method')['mean accuracy'], d.set_index('method')['sd']
        best = acc.idxmax()
        parts = [f"At {s}, {best} is ahead ({acc[best]:.4f})"]
        if 'static' in acc:
            for m in ('SET', 'RigL'):
                if m not in acc: continue
                diff = acc[m] - acc['static']
                spread = max(sd[m], sd['static']) if n_seeds > 1 else float('nan')
                word = ('beats the static mask by' if diff > 0 else 'is behind the static mask by' if diff < 0 else 'ties the static mask:')
                within = (f", {'more' if abs(diff) > spread else 'less'} than the larger seed-to-seed spread ({spread:.4f})"
                          if n_seeds > 1 else ', one seed: no spread to compare with')
                parts.append(f"{m} {word} {abs(diff):.4f}{within}")
        if 'GMP' in acc and 'RigL' in acc:
            g = acc['GMP'] - acc['RigL']
            parts.append(f"GMP, which trains dense weights before it prunes them, is {'ahead of' if g > 0 else 'behind' if g < 0 else 'level with'} "
                         f"RigL by {abs(g):.4f}")
        out.append('; '.join(parts) + '.')
    dn = f" The dense MLP reaches {dense.accuracy.mean():.4f}." if len(dense) else ''
    return ("How to read it: mean validation accuracy over " + f"{n_seeds} seed(s) (`sd`: standard deviation over seeds); `moved`: the "
            "share of the active connections at the end that were not active at the start. " + ' '.join(out) + dn)

def intro(a):
    lv = ' and at '.join(f"{s:.0%}" for s in a.sparsities)
    return f"""`bench/dst.py` trains `digits_mlp({a.hidden})` on scikit-learn's digits with all three `Linear` layers at {lv}
sparsity ({a.distribution} per layer), {len(a.seeds)} seed(s), {a.epochs} epochs of one-cycle Adam (lr {a.lr:g}), for each of: a
static random mask (`FixedSparsityCallback` on the masks `random_masks` draws, the same masks SET and RigL start from),
SET and RigL (`DynamicSparseCallback`, `update_every={a.update_every}` batches (22 is one epoch), `fraction={a.fraction:g}`,
`stop_pct={a.stop_pct:g}`), and gradual magnitude pruning from dense (`SparsifyCallback`, AGP until {a.stop_pct:.0%} of
training, to the same per-layer targets); a dense run per seed for reference. After every training batch of the static
and dynamic runs, each layer's masked count is checked to be exactly `round(s * n)` and its masked weights zero; the GMP
runs are checked at the end."""

def main():
    ap = parser(__doc__, quick='one seed, 2 epochs, an update every 6 batches: a smoke run of seconds')
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--hidden', type=int, default=256)
    ap.add_argument('--update-every', type=int, default=22, help='batches between updates (22 = one epoch)')
    ap.add_argument('--fraction', type=float, default=0.3)
    ap.add_argument('--stop-pct', type=float, default=0.75)
    ap.add_argument('--distribution', default='uniform', choices=['uniform', 'erk'])
    ap.add_argument('--sparsities', type=float, nargs='+', default=[0.9, 0.95])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    ap.add_argument('--no-dense', action='store_true', help='leave out the dense reference runs')
    a = ap.parse_args()
    run_ = start('dst', a)
    if a.quick: a.seeds, a.epochs, a.update_every = [0], 2, 6
    defaults.callbacks = [c for c in defaults.callbacks if c is not ProgressCallback]
    t0, rows = time.perf_counter(), []
    print(f"digits_mlp({a.hidden}), Linear layers {a.distribution}, {a.epochs} epochs one-cycle lr={a.lr}, Adam; DST: update "
          f"every {a.update_every} batches, fraction {a.fraction}, stop at {a.stop_pct}; seeds {a.seeds}", flush=True)
    def one(m, s, seed):
        r = run(m, s, seed, a)
        rows.append(dict(sparsity=s, method=m, seed=seed, **r))
        extra = f"  moved {r['moved']:.3f} in {r['updates']} updates" if m in ('SET', 'RigL') else ''
        print(f"  sparsity {s:.2f}  seed {seed}  {m:<6}  accuracy {r['accuracy']:.4f}  valid loss {r['loss']:.4f}  "
              f"masks checked {r['checks']}x{extra}  ({r['seconds']:.1f}s)", flush=True)
    if not a.no_dense:
        for seed in a.seeds: one('dense', 0., seed)
    for s in a.sparsities:
        for seed in a.seeds:
            for m in a.methods: one(m, s, seed)
    df = pd.DataFrame(rows)
    sparse, dense = df[df.method != 'dense'], df[df.method == 'dense']
    checks = int(sparse.checks.sum())
    print(f"\nmasks held: {checks} checks over {len(sparse)} sparse runs, every layer at exactly round(s*n) masked weights, all zero")
    for col, what in (('accuracy', 'Validation accuracy'), ('loss', 'Validation loss')):
        res = sparse.groupby(['sparsity', 'method'], sort=False)[col].agg(['mean', 'std', 'min', 'max']).unstack('sparsity')
        print(f'\n{what} over {len(a.seeds)} seed(s) (mean, std, min, max):')
        print(res.swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False).round(4).to_string())
    if len(dense): print(f"\ndense: accuracy {dense.accuracy.mean():.4f}, valid loss {dense.loss.mean():.4f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    g = sparse.groupby(['sparsity', 'method'], sort=False)
    summ = pd.DataFrame({'mean accuracy': g.accuracy.mean(), 'sd': g.accuracy.std().fillna(0.), 'min': g.accuracy.min(),
                         'valid loss': g.loss.mean(), 'moved': g.moved.mean(), 'seconds': g.seconds.mean()}).reset_index()
    summ['sparsity'] = summ.sparsity.map(lambda v: f"{v:.0%}")
    summ['moved'] = summ.moved.map(lambda v: '' if np.isnan(v) else f"{v:.3f}")
    run_.write(title="Dynamic sparse training: SET and RigL against a static mask", intro=intro(a),
               summary=summ, fig=plot(sparse, dense), reading=reading(summ, dense, len(a.seeds)))

if __name__ == '__main__': main()
