"""Benchmark of fastsparse.dst: does moving connections while training beat a fixed random mask?

On scikit-learn's digits (1,437 training images of 8x8), at 90% and 95% sparsity of every Linear layer of a
256-wide MLP (`digits_mlp(256)`, 84,480 weights), with 3 seeds, one run each of:

- static: `FixedSparsityCallback` on the random masks `random_masks` draws -- the very masks SET and RigL start from;
- SET:    `DynamicSparseCallback(regrow='set')`, random regrowth;
- RigL:   `DynamicSparseCallback(regrow='rigl')`, regrowth where the dense gradient is largest;
- GMP:    gradual magnitude pruning from dense, `SparsifyCallback(..., large_final, agp)`, to the same per-layer targets.

All runs share the training budget (same epochs, batches, one-cycle learning-rate schedule, Adam, init per seed) and
the per-layer allocation (`--distribution`, uniform by default: see the note below). Prints the final validation accuracy per run and the
mean (and spread) per method.

Usage: python bench/dst.py [--epochs 20] [--update-every 22] [--distribution uniform] [--quick]
"""
import argparse, os, time, warnings
import torch, torch.nn as nn
import pandas as pd
from fastai.basics import Learner, CrossEntropyLossFlat, accuracy, set_seed, defaults
from fastai.callback.progress import ProgressCallback
import fastai.callback.schedule  # noqa: F401 (Learner.fit_one_cycle)
from fastsparse.callback import SparsifyCallback, FixedSparsityCallback
from fastsparse.schedule import agp
from fastsparse.dst import DynamicSparseCallback, random_masks, erk_sparsities
from fastsparse.demo import digits_dls, digits_mlp

warnings.filterwarnings('ignore', category=FutureWarning)
pd.set_option('display.width', 200)

def run(method, sparsity, seed, args):
    set_seed(seed)
    model = digits_mlp(args.hidden)
    lt = nn.Linear
    if args.distribution == 'erk': targets = erk_sparsities(model, sparsity, lt)
    else: targets = {n: sparsity for n,m in model.named_modules() if isinstance(m, lt)}
    dst = dict(update_every=args.update_every, fraction=args.fraction, stop_pct=args.stop_pct,
               distribution=args.distribution, layer_type=lt, seed=seed)
    cb = {'static': lambda: FixedSparsityCallback(random_masks(model, sparsity, args.distribution, lt, seed=seed)),
          'SET':    lambda: DynamicSparseCallback(sparsity, 'set', **dst),
          'RigL':   lambda: DynamicSparseCallback(sparsity, 'rigl', **dst),
          'GMP':    lambda: SparsifyCallback(targets, 'weight', 'local', 'large_final', agp.with_pcts(0., args.stop_pct)),
          'dense':  lambda: None}[method]()
    learn = Learner(digits_dls(seed=42), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb)
    with learn.no_logging(): learn.fit_one_cycle(args.epochs, args.lr)
    # every method ends exactly at the per-layer targets
    if method != 'dense':
        for n,t in targets.items():
            w = model.get_submodule(n).weight
            assert int((w == 0).sum()) >= round(t * w.numel()), (method, n)
    loss,acc = learn.validate()[:2]
    return float(loss),float(acc)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--hidden', type=int, default=256)
    p.add_argument('--update-every', type=int, default=22, help='optimizer steps between updates (22 = one epoch)')
    p.add_argument('--fraction', type=float, default=0.3)
    p.add_argument('--stop-pct', type=float, default=0.75)
    p.add_argument('--distribution', default='uniform', choices=['uniform', 'erk'])
    p.add_argument('--sparsities', type=float, nargs='+', default=[0.9, 0.95])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--methods', nargs='+', default=['static', 'SET', 'RigL', 'GMP'])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--quick', action='store_true', help='one seed, 4 epochs: a smoke test')
    args = p.parse_args()
    if args.quick: args.seeds,args.epochs,args.update_every = [0],4,8
    torch.set_num_threads(args.threads)
    defaults.callbacks = [c for c in defaults.callbacks if c is not ProgressCallback]
    t0,rows = time.time(),[]
    print(f"digits_mlp({args.hidden}), Linear layers {args.distribution}, {args.epochs} epochs one-cycle lr={args.lr}, "
          f"Adam; DST: update every {args.update_every} steps, fraction {args.fraction}, stop at {args.stop_pct}; "
          f"seeds {args.seeds}; torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    for s in args.sparsities:
        for seed in args.seeds:
            for m in args.methods:
                t = time.time()
                loss,acc = run(m, s, seed, args)
                rows.append(dict(sparsity=s, method=m, seed=seed, accuracy=acc, loss=loss, seconds=time.time()-t))
                print(f"  sparsity {s:.2f}  seed {seed}  {m:<6}  accuracy {acc:.4f}  valid loss {loss:.4f}  ({time.time()-t:.1f}s)", flush=True)
    df = pd.DataFrame(rows)
    for col,what in (('accuracy', 'Validation accuracy'), ('loss', 'Validation loss')):
        res = df.groupby(['sparsity', 'method'], sort=False)[col].agg(['mean', 'std', 'min', 'max']).unstack('sparsity')
        print(f'\n{what} over {len(args.seeds)} seeds (mean, std, min, max):')
        print(res.swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False).round(4).to_string())
    print(f"\ntotal {time.time()-t0:.0f}s")
    return df

if __name__ == '__main__': main()
