"""Cost of a mask update against `torch.kthvalue` over the same scores, and of a whole pruning fit against dense and fasterai.

Update: `Linear` layers with random weights (100k: 2 x 224x224; 1M: 4 x 512x512; 25M: 12 x 1448x1448), magnitude
scores (`large_final`), unstructured. Updates to 10%, 20%, ..., 90%, each from an update just before it (untimed) on
whose masked weights it builds, as AGP does (their zeros are the floor the new cut lies above), in two step sizes:
0.05 percentage points (`small step`, AGP late in a fit, or updating every batch) and 10 points (`large step`, AGP's
first updates when it updates once an epoch); each level and step is timed `--repeats` times and its median kept. Each update is timed through the Sparsifier (`sparsify_model`: score, select, apply) and, right
before it, `torch.kthvalue` over the very scores it will select from (computed beforehand, not timed): per layer,
summed over the layers, in local context; over all layers' scores concatenated in global context. The reference
for a selection: finding one k-th value and nothing else. The table gives the medians over the levels, their
ratio, and the largest ratio at any one level (`worst`).

Fit: `digits_cnn()` on `digits_dls()` (scikit-learn's digits, 8x8), 8 epochs of one-cycle Adam (lr 1e-2), pruned
with magnitude in global context over the conv layers, AGP over the whole fit to 95% and to 98%, by fastsparse's
`SparsifyCallback` and by fasterai 0.4.1's; per seed, dense and the four pruned fits run one after the other in one
process (the order rotated by seed), same seed, same initial weights and batch order. Whole wall time of `fit`,
validation included, and the process's CPU time over the fit (less sensitive to other work on the machine, as
torch runs one thread); per seed the ratio to that seed's dense fit, then the median over seeds (`ratio`), and the
fastest of the seeds' fits over the fastest dense fit (`fastest`: other work on the machine only ever slows a fit
down, and every seed does the same arithmetic, so the fastest run is the least disturbed one). Last, the CPU
time spent inside each library's callback (every event it handles: its mask updates and their upkeep), over the
dense fit's CPU time: what pruning adds, without the noise of the whole fit.

Everything runs on torch's default threads and glibc's default heap (`--threads` pins the threads; `--pin-malloc`
starts the script again with glibc's heap trimming off, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` and
`MALLOC_MMAP_THRESHOLD_` set: freed memory then stays with the process instead of coming back as page faults). The
output prints the median minor page faults per fit so that a reader sees which regime it ran in.

    python bench/update_cost.py                 # both parts (25M included); writes bench/results/update_cost.md
    python bench/update_cost.py --sizes 100k,1m # updates without the 25M model
    python bench/update_cost.py --fit-only      # only the whole fits
    python bench/update_cost.py --update-only   # only the updates
"""
import argparse, contextlib, io, os, resource, statistics, sys, time, warnings
import pandas as pd
import torch, torch.nn as nn
from fastsparse.sparsifier import Sparsifier
from common import parser, start

PINNED = {'MALLOC_TRIM_THRESHOLD_': str(1 << 40), 'MALLOC_TOP_PAD_': str(64 << 20), 'MALLOC_MMAP_THRESHOLD_': str(32 << 20)}
SIZES = {'100k': (2, 224), '1m': (4, 512), '25m': (12, 1448)}  # layers, side of each square Linear

def _model(n_layers, side, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(n_layers)])

def _kth_time(sp, s, context):
    "Seconds of `torch.kthvalue` over the scores the update to sparsity `s` selects from (scores computed beforehand)"
    scores = [sp.layer_scores(n)[0]() for n in sp.layers]
    if context == 'global':
        flat = torch.cat(scores)
        t = time.perf_counter(); torch.kthvalue(flat, round(s * flat.numel())); return time.perf_counter() - t
    t = time.perf_counter()
    for x in scores: torch.kthvalue(x, max(1, round(s * x.numel())))
    return time.perf_counter() - t

def update_cost(size, context, levels, repeats, step=0.0005):
    "Per sparsity level (each update from a floor `step` below): median seconds of the update and of kthvalue over the same scores"
    n_layers, side = SIZES[size]
    sp = Sparsifier(_model(n_layers, side), 'weight', context, 'large_final', layer_type=nn.Linear)
    n = sum(m.weight.numel() for m in sp.layers.values())
    upd, kth = [], []
    for s in levels:
        u, q = [], []
        for _ in range(repeats):
            sp.sparsify_model(s - step)  # the floor: weights the previous update masked (untimed)
            q.append(_kth_time(sp, s, context))
            t = time.perf_counter(); sp.sparsify_model(s); u.append(time.perf_counter() - t)
            want = round(s * n) if context == 'global' else sum(round(s * m.weight.numel()) for m in sp.layers.values())
            got = sum(int((m.weight == 0).sum()) for m in sp.layers.values())
            assert got == want, (size, context, s, got, want)  # exactly round(s*n) zeros
        upd.append(statistics.median(u)); kth.append(statistics.median(q))
    return upd, kth, n

def _timed(cb, acc):
    "Add the CPU time of this thread inside every event of `cb` to `acc[0]`"
    cls = type(cb)
    def __call__(self, event_name):
        t = time.thread_time()
        try: return cls.__call__(self, event_name)
        finally: acc[0] += time.thread_time() - t
    object.__setattr__(cb, '__class__', type(cls.__name__, (cls,), {'__call__': __call__}))

def _fit(learn, epochs, lr):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # fasterai prints; we don't
        warnings.simplefilter('ignore')
        f, t, c = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), time.process_time()
        learn.fit_one_cycle(epochs, lr)
        return time.perf_counter() - t, time.process_time() - c, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f

def fit_time(method, sparsity, seed, epochs, lr):
    "Wall and CPU seconds of one whole fit of `method` ('dense', 'fastsparse' or 'fasterai'), the conv sparsity it ends at, the CPU seconds inside the pruning callback and the minor page faults"
    from fastai.basics import Learner, CrossEntropyLossFlat, accuracy, set_seed
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401
    from fastsparse.demo import digits_dls, digits_cnn
    from fastsparse.callback import SparsifyCallback
    from fastsparse.schedule import agp
    set_seed(seed, reproducible=True)
    dls, model = digits_dls(), digits_cnn()
    cbs = []
    if method == 'fastsparse': cbs = [SparsifyCallback(sparsity, 'weight', 'global', 'large_final', agp, layer_type=nn.Conv2d)]
    elif method == 'fasterai':
        from fasterai.sparse.sparsify_callback import SparsifyCallback as FSparsifyCallback
        from fasterai.core.criteria import large_final as f_large_final
        from fasterai.core.schedule import Schedule as FSchedule, sched_agp as f_sched_agp
        cbs = [FSparsifyCallback(sparsity, 'weight', 'global', f_large_final, FSchedule(f_sched_agp, start_pct=0., end_pct=1.),
                                 layer_type=nn.Conv2d)]
    acc = [0.]
    for cb in cbs: _timed(cb, acc)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    wall, cpu, faults = _fit(learn, epochs, lr)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    return wall, cpu, sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs), acc[0], faults

def main():
    ap = parser(__doc__, quick='100k weights, one level, one seed of a one-epoch fit: a smoke run')
    ap.add_argument('--sizes', default='100k,1m,25m', help='comma-separated among ' + ', '.join(SIZES))
    ap.add_argument('--repeats', type=int, default=7, help='updates timed per size, context, step and level (3 at 25M)')
    ap.add_argument('--seeds', type=int, default=7)
    ap.add_argument('--epochs', type=int, default=8)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--levels', default='0.95,0.98')
    g = ap.add_mutually_exclusive_group()
    g.add_argument('--fit-only', action='store_true')
    g.add_argument('--update-only', action='store_true')
    ap.add_argument('--pin-malloc', action='store_true', help="turn glibc's heap trimming off (not a user's default)")
    a = ap.parse_args()
    if a.pin_malloc and any(os.environ.get(k) != v for k,v in PINNED.items()):  # start again with trimming off
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **PINNED})
    run = start('update_cost', a)
    if a.quick: a.sizes, a.repeats, a.seeds, a.epochs, a.levels = '100k', 1, 1, 1, '0.95'
    upd_rows, fit_rows, curves = [], [], []
    if not a.fit_only:
        print(f"\none update (score + select + apply, through Sparsifier.sparsify_model) vs torch.kthvalue over the same scores; "
              f"magnitude, unstructured; updates to 10%, 20%, ..., 90%, each from a floor 0.05 points (small step) or 10 points "
              f"(large step) below, median of {a.repeats} per level ({min(a.repeats, 3)} at 25M); then the median over levels, and "
              f"the worst level's ratio")
        print(f"{'weights':>12} {'layers':>6} {'context':>7} {'step':>5} {'update ms':>10} {'kthvalue ms':>12} {'ratio':>6} {'worst':>6}")
        levels = [0.5] if a.quick else [i / 10 for i in range(1, 10)]
        for size in a.sizes.split(','):
            for context in ('local', 'global'):
                for step, sname in ((0.0005, 'small'), (0.1, 'large')):
                    upd, kth, n = update_cost(size, context, levels, a.repeats if size != '25m' else min(a.repeats, 3), step)
                    mu, mk = statistics.median(upd), statistics.median(kth)
                    ratios = [u / k for u, k in zip(upd, kth)]
                    print(f"{n:>12,} {SIZES[size][0]:>6} {context:>7} {sname:>5} {mu*1e3:>10.2f} {mk*1e3:>12.2f} {mu/mk:>6.2f} "
                          f"{max(ratios):>6.2f}", flush=True)
                    upd_rows.append({'weights': f"{n:,}", 'context': context, 'step': sname, 'update ms': mu*1e3,
                                     'ratio (median level)': mu/mk, 'worst level': max(ratios)})
                    curves.append((size, context, sname, levels, ratios))
    if not a.update_only:
        from fastai.basics import defaults
        from fastai.callback.progress import ProgressCallback
        defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
        try: import fasterai  # noqa: F401
        except ImportError: libs = ('fastsparse',); print("fasterai is not installed: its fits are skipped")
        else: libs = ('fastsparse', 'fasterai')
        levels = [float(x) for x in a.levels.split(',')]
        print(f"\nwhole fit: digits_cnn() on digits 8x8, {a.epochs} epochs one-cycle lr {a.lr}, magnitude, global over the convs, "
              f"AGP over the whole fit; {a.seeds} seeds, median of the per-seed ratios to dense")
        runs = ['dense'] + [f"{m}@{lvl}" for lvl in levels for m in libs]
        res = {r: [] for r in runs}
        for seed in range(a.seeds):
            order = runs[seed % len(runs):] + runs[:seed % len(runs)]  # rotate: no run always goes first
            for r in order:
                m, _, lvl = r.partition('@')
                res[r].append(fit_time(m, float(lvl) if lvl else 0., seed, a.epochs, a.lr))
        for what, i in (('wall', 0), ('CPU', 1)):
            dense = [r[i] for r in res['dense']]
            print(f"{what} time; dense: median {statistics.median(dense):.2f} s (per seed {', '.join(f'{t:.2f}' for t in dense)})")
            print(f"{'sparsity':>8} {'library':>10} {'seconds':>8} {'ratio':>6} {'fastest':>7}  {'per seed':<36} {'conv sparsity':>13}")
            for lvl in levels:
                for m in libs:
                    rs = res[f"{m}@{lvl}"]
                    ratios = [r[i] / d for r, d in zip(rs, dense)]
                    fastest = min(r[i] for r in rs) / min(dense)
                    print(f"{lvl:>8.2f} {m:>10} {statistics.median(r[i] for r in rs):>8.2f} {statistics.median(ratios):>6.3f} {fastest:>7.3f}  "
                          f"{', '.join(f'{x:.3f}' for x in ratios):<36} {rs[0][2]:>13.5f}")
        dense_w, dense = [r[0] for r in res['dense']], [r[1] for r in res['dense']]
        print("CPU time inside the pruning callback (all its events: mask updates and upkeep) over the dense fit's CPU time, median over seeds:")
        for lvl in levels:
            parts = [f"{m} {100*statistics.median(r[3] / d for r, d in zip(res[f'{m}@{lvl}'], dense)):.2f}%" for m in libs]
            print(f"{lvl:>8.2f} " + ', '.join(parts))
            for m in libs:
                rs = res[f"{m}@{lvl}"]
                fit_rows.append({'sparsity': f"{lvl:.0%}", 'library': m,
                                 'wall / dense': statistics.median(r[0] / d for r, d in zip(rs, dense_w)),
                                 'CPU / dense': statistics.median(r[1] / d for r, d in zip(rs, dense)),
                                 'callback CPU share': f"{100*statistics.median(r[3] / d for r, d in zip(rs, dense)):.2f}%"})
        faults = {r: statistics.median(x[4] for x in res[r]) for r in runs}
        print("minor page faults per fit, median over seeds: " + ', '.join(f"{r} {v:,.0f}" for r, v in faults.items()))
    upd, fits = pd.DataFrame(upd_rows), pd.DataFrame(fit_rows)
    run.write(title="Mask update cost against kthvalue, and a whole pruning fit", intro=INTRO,
              summary=_tables(upd, fits), fig=plot(curves) if curves else None,
              reading=reading(upd, fits))

def _tables(upd, fits):
    from common import md_table
    out = []
    if len(upd): out.append("One update over one `kthvalue` of its scores:\n\n" + md_table(upd))
    if len(fits): out.append("A whole pruning fit over a dense fit (medians over seeds), and the CPU time inside the callback:\n\n" + md_table(fits))
    return '\n\n'.join(out)

INTRO = """`bench/update_cost.py` times one mask update -- scoring, exact selection and applying the masks, through
`Sparsifier.sparsify_model` -- against `torch.kthvalue` over the very scores the update selects from (per layer,
summed, in local context; over all layers' scores in global context): finding one k-th value and nothing else.
Models are square `Linear` layers (100k weights: 2 layers; 1M: 4; 25M: 12 of about 2M), magnitude scores,
unstructured; levels 10% to 90%, each update building on one just below it, by a small step (0.05 percentage points,
as when AGP updates every batch) or a large one (10 points, as AGP's first updates once an epoch). Every update is
checked to zero exactly round(s x n) weights. The second part trains `digits_cnn()` on `digits_dls()`, pruning the conv
layers with magnitude in global context, AGP over the whole fit, with fastsparse's `SparsifyCallback` and with fasterai
0.4.1's, next to a dense fit, in one process, and reports wall and CPU time per fit over dense and the CPU time spent
inside each library's callback. The script's docstring defines each column."""

def plot(curves):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(8, 3), layout='constrained', sharey=True)
    for ax, step in zip(axs, ('small', 'large')):
        for size, context, sname, levels, ratios in curves:
            if sname == step: ax.plot([100*l for l in levels], ratios, 'o-' if context == 'global' else 's--', ms=3,
                                      label=f"{size} {context}")
        ax.axhline(1, color='k', lw=0.8); ax.set_xlabel('sparsity of the update (%)', fontsize=8)
        ax.set_title(f"{step} step ({'0.05' if step == 'small' else '10'} points)", fontsize=9)
    axs[0].set_ylabel('update time / kthvalue time', fontsize=8)
    axs[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1), frameon=False)
    return fig

def reading(upd, fits):
    parts = []
    if len(upd):
        for step in ('small', 'large'):
            u = upd[upd.step == step]
            parts.append(f"- **{step.capitalize()} steps**: an update costs {u['ratio (median level)'].min():.2f}-"
                         f"{u['ratio (median level)'].max():.2f} `kthvalue`s at the median level, and at most {u['worst level'].max():.2f} "
                         f"at any level, size and context.")
    if len(fits):
        for lvl, f in fits.groupby('sparsity', sort=False):
            d = f.set_index('library')
            s = (f"- **Whole fit at {lvl}**: fastsparse {d.loc['fastsparse', 'wall / dense']:.3f}x dense wall time, "
                 f"callback {d.loc['fastsparse', 'callback CPU share']} of a dense fit's CPU time")
            if 'fasterai' in d.index:
                s += (f"; fasterai {d.loc['fasterai', 'wall / dense']:.3f}x, callback {d.loc['fasterai', 'callback CPU share']}")
            parts.append(s + '.')
    return "How to read it: `ratio` is the median update over the median kthvalue; `worst level` the largest ratio at any one level.\n\n" + '\n'.join(parts)

if __name__ == '__main__': main()
