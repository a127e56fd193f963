"""Cost of a mask update against `torch.kthvalue` over the same scores, and of a whole pruning fit against dense and fasterai.

Update: `Linear` layers with random weights (100k: 2 x 224x224; 1M: 4 x 512x512; 25M: 12 x 1448x1448), magnitude
scores (`large_final`), unstructured. Updates to 10%, 20%, ..., 90%: each asks 0.05 points more than an update just
before it (untimed), on the weights that update masked, as AGP does (their zeros are the floor the new cut lies
just above); each level is timed `--repeats` times and its median kept. Each update is timed through the Sparsifier (`sparsify_model`: score, select, apply) and, right
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

Everything runs with `torch.set_num_threads(1)`, and with glibc's heap trimming off: the script starts itself again
with `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` and `MALLOC_MMAP_THRESHOLD_` set (`--default-malloc` keeps glibc's
defaults). With the defaults, freed memory goes back to the system and comes back as page faults, between 50k and
250k minor faults per fit on the machine these figures come from, whatever the library (0.1-0.6 s of a 3 s fit,
dense fits included); the output prints the median faults per fit so that a reader sees which regime it ran in.

    python bench/update_cost.py                 # both parts (25M included; about 5 minutes on a 2-core CPU)
    python bench/update_cost.py --sizes 100k,1m # updates without the 25M model
    python bench/update_cost.py --fit-only      # only the whole fits
    python bench/update_cost.py --update-only   # only the updates
"""
import argparse, contextlib, io, os, resource, statistics, sys, time, warnings
import torch, torch.nn as nn
from fastsparse.sparsifier import Sparsifier

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

def update_cost(size, context, levels, repeats):
    "Per sparsity level (each update from a floor 0.05 points below): median seconds of the update and of kthvalue over the same scores"
    n_layers, side = SIZES[size]
    sp = Sparsifier(_model(n_layers, side), 'weight', context, 'large_final', layer_type=nn.Linear)
    n = sum(m.weight.numel() for m in sp.layers.values())
    upd, kth = [], []
    for s in levels:
        u, q = [], []
        for _ in range(repeats):
            sp.sparsify_model(s - 0.0005)  # the floor: weights the previous update masked (untimed)
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='100k,1m,25m', help='comma-separated among ' + ', '.join(SIZES))
    ap.add_argument('--repeats', type=int, default=7, help='updates timed per size, context and level (3 at 25M)')
    ap.add_argument('--seeds', type=int, default=7)
    ap.add_argument('--epochs', type=int, default=8)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--levels', default='0.95,0.98')
    g = ap.add_mutually_exclusive_group()
    g.add_argument('--fit-only', action='store_true')
    g.add_argument('--update-only', action='store_true')
    ap.add_argument('--default-malloc', action='store_true', help="keep glibc's heap trimming on")
    a = ap.parse_args()
    if not a.default_malloc and any(os.environ.get(k) != v for k,v in PINNED.items()):  # start again with trimming off
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **PINNED})
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, "
          + ("glibc malloc defaults" if a.default_malloc else "glibc heap trimming off (" + ', '.join(f'{k}={v}' for k,v in PINNED.items()) + ")"))
    if not a.fit_only:
        print(f"\none update (score + select + apply, through Sparsifier.sparsify_model) vs torch.kthvalue over the same scores; "
              f"magnitude, unstructured; updates to 10%, 20%, ..., 90%, each 0.05 points above the one before, median of "
              f"{a.repeats} per level ({min(a.repeats, 3)} at 25M); then the median over levels, and the worst level's ratio")
        print(f"{'weights':>12} {'layers':>6} {'context':>7} {'update ms':>10} {'kthvalue ms':>12} {'ratio':>6} {'worst':>6}")
        for size in a.sizes.split(','):
            for context in ('local', 'global'):
                levels = [i / 10 for i in range(1, 10)]
                upd, kth, n = update_cost(size, context, levels, a.repeats if size != '25m' else min(a.repeats, 3))
                mu, mk = statistics.median(upd), statistics.median(kth)
                worst = max(u / k for u, k in zip(upd, kth))
                print(f"{n:>12,} {SIZES[size][0]:>6} {context:>7} {mu*1e3:>10.2f} {mk*1e3:>12.2f} {mu/mk:>6.2f} {worst:>6.2f}", flush=True)
    if not a.update_only:
        from fastai.basics import defaults
        from fastai.callback.progress import ProgressCallback
        defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
        levels = [float(x) for x in a.levels.split(',')]
        print(f"\nwhole fit: digits_cnn() on digits 8x8, {a.epochs} epochs one-cycle lr {a.lr}, magnitude, global over the convs, "
              f"AGP over the whole fit; {a.seeds} seeds, median of the per-seed ratios to dense")
        runs = ['dense'] + [f"{m}@{lvl}" for lvl in levels for m in ('fastsparse', 'fasterai')]
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
                for m in ('fastsparse', 'fasterai'):
                    rs = res[f"{m}@{lvl}"]
                    ratios = [r[i] / d for r, d in zip(rs, dense)]
                    fastest = min(r[i] for r in rs) / min(dense)
                    print(f"{lvl:>8.2f} {m:>10} {statistics.median(r[i] for r in rs):>8.2f} {statistics.median(ratios):>6.3f} {fastest:>7.3f}  "
                          f"{', '.join(f'{x:.3f}' for x in ratios):<36} {rs[0][2]:>13.5f}")

        dense = [r[1] for r in res['dense']]
        print("CPU time inside the pruning callback (all its events: mask updates and upkeep) over the dense fit's CPU time, median over seeds:")
        for lvl in levels:
            parts = [f"{m} {100*statistics.median(r[3] / d for r, d in zip(res[f'{m}@{lvl}'], dense)):.2f}%" for m in ('fastsparse', 'fasterai')]
            print(f"{lvl:>8.2f} " + ', '.join(parts))
        print("minor page faults per fit, median over seeds: " + ', '.join(f"{r} {statistics.median(x[4] for x in res[r]):,.0f}" for r in runs))

if __name__ == '__main__': main()
