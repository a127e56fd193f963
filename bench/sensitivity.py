"""Benchmark of fastsparse.sensitivity: do sensitivity-derived per-layer targets beat one sparsity for every layer, and a global threshold?

On scikit-learn's digits, for each seed: train `digits_cnn` dense, run `analyze_sensitivity` on all its
convolutions and its classifier, then fine-tune the dense model to 90% and to 95% overall sparsity (the fraction
of zero weights over those layers) twice -- with the targets from `to_layer_targets`, and with the same
sparsity for every layer (uniform). Both arms sparsify the same layers, to the same parameter-weighted mean,
with the same schedule, learning rate, epochs and seed. A third arm, for reference, is the usual hand-made rule:
first and last layer dense, the others uniform at the same overall sparsity ('ends-dense'). A fourth needs no
analysis either: one magnitude threshold over the same layers ('global' context), which lets the weights'
sizes decide how sparse each layer gets. Prints the mean and std of the final validation
accuracy over the seeds, the per-seed numbers, and the targets of the first seed.

The tiny first convolution (1 input channel) is analysed like every other layer, not excluded: keeping such a
layer dense by hand is exactly the kind of decision the analysis should make (and does).

Usage: python bench/sensitivity.py [--seeds 3] [--width 16] [--threads 1] [--quick]
"""
import argparse, logging, platform, statistics, time, warnings
warnings.filterwarnings('ignore', category=FutureWarning)  # torch.jit deprecation noise from fastai's imports
import torch, torch.nn as nn
import pandas as pd
from fastai.basics import Learner, accuracy, CrossEntropyLossFlat, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.callback import SparsifyCallback
from fastsparse.schedule import agp
from fastsparse.sensitivity import analyze_sensitivity

pd.set_option('display.width', 200)
log = logging.getLogger('bench.sensitivity')

def learner(a, seed):
    set_seed(seed, reproducible=True)
    learn = Learner(digits_dls(), digits_cnn(a.width), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.remove_cb(learn.progress)
    return learn

def fit(learn, epochs, lr, cbs=None):
    with learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return float(learn.validate()[1])

def run_seed(a, seed):
    "Dense training, analysis, then for each level: derived vs uniform fine-tuning from the same dense weights"
    t0 = time.time()
    learn = learner(a, seed)
    dense_acc = fit(learn, a.dense_epochs, a.lr)
    dense = {k: v.clone() for k,v in learn.model.state_dict().items()}
    sens = analyze_sensitivity(learn, a.levels, metric=a.metric, layer_type=(nn.Conv2d, nn.Linear), show_progress=False)
    row = dict(seed=seed, dense=dense_acc)
    targets_by_level = {}
    for T in a.targets:
        derived = sens.to_layer_targets(T, max_sparsity=a.max_sparsity)
        uniform = dict.fromkeys(derived, T)
        # the usual hand-made rule: first and last layer dense, the others uniform, same overall sparsity
        first,last,P = sens.layers[0],sens.layers[-1],sum(sens.params.values())
        inner = T*P / (P - sens.params[first] - sens.params[last])
        keep_ends = {n: (0. if n in (first, last) else inner) for n in sens.layers}
        targets_by_level[T] = derived
        # and one magnitude threshold over the same layers (no analysis): global context at T
        for name,tg in (('uniform', uniform), ('ends-dense', keep_ends), ('global', T), ('derived', derived)):
            ft = learner(a, seed)
            ft.model.load_state_dict(dense)
            ctx,inc = ('global', list(sens.layers)) if name == 'global' else ('local', None)  # (a dict names its layers itself)
            cb = SparsifyCallback(tg, 'weight', ctx, 'large_final', agp.with_pcts(0., a.prune_pct), layer_type=(nn.Conv2d, nn.Linear), include=inc)
            row[f"{name}@{T:g}"] = fit(ft, a.epochs, a.ft_lr, cbs=cb)
            rep = cb.sparsity_report().set_index('layer')
            if name == 'global': assert rep.loc['total', 'zeros'] == round(T*P), (name, T); continue
            for n,t in tg.items(): assert rep.loc[n, 'zeros'] == round(t*rep.loc[n, 'params']), (name, T, n)
    log.info(f"seed {seed}: {time.time()-t0:.0f}s {row}")
    return row,sens,targets_by_level

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--width', type=int, default=16, help='digits_cnn width')
    p.add_argument('--dense-epochs', type=int, default=6)
    p.add_argument('--epochs', type=int, default=6, help='sparse fine-tuning epochs')
    p.add_argument('--lr', type=float, default=1e-2)
    p.add_argument('--ft-lr', type=float, default=5e-3)
    p.add_argument('--prune-pct', type=float, default=0.6, help='fraction of fine-tuning over which AGP prunes')
    p.add_argument('--metric', default='loss', help="metric of the analysis ('loss' or 'accuracy')")
    p.add_argument('--max-sparsity', type=float, default=0.98)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--quick', action='store_true', help='1 seed, 2+2 epochs (smoke test)')
    a = p.parse_args()
    a.levels, a.targets = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98), (0.9, 0.95)
    if a.quick: a.seeds, a.dense_epochs, a.epochs = 1, 2, 2
    logging.basicConfig(level=logging.WARNING, format='%(message)s'); log.setLevel(logging.INFO)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    print(f"# Sensitivity-derived vs uniform per-layer sparsity on digits\n")
    print(f"digits_cnn({a.width}), all Conv2d + Linear layers; dense {a.dense_epochs} epochs (lr {a.lr}), then "
          f"{a.epochs} epochs of fine-tuning (lr {a.ft_lr}, AGP over the first {a.prune_pct:.0%}) per arm; "
          f"analysis metric: valid {a.metric}, levels {a.levels}; max_sparsity {a.max_sparsity}; seeds 0..{a.seeds-1}")
    print(f"torch {torch.__version__}, {a.threads} thread(s), {platform.processor() or platform.machine()}\n")
    rows = []
    for seed in range(a.seeds):
        row,sens,tbl = run_seed(a, seed)
        rows.append(row)
        if seed == 0: first = (sens, tbl)
    df = pd.DataFrame(rows).set_index('seed')
    print("Final validation accuracy per seed:\n")
    print(df.to_string(float_format=lambda v: f"{v:.4f}"), "\n")
    print("Mean (std) over seeds:\n")
    sd = lambda s: statistics.stdev(s) if len(s) > 1 else 0.
    for T in a.targets:
        u,e,g,d = df[f"uniform@{T:g}"],df[f"ends-dense@{T:g}"],df[f"global@{T:g}"],df[f"derived@{T:g}"]
        print(f"  {T:.0%} sparse: uniform {u.mean():.4f} ({sd(u):.4f})  ends-dense {e.mean():.4f} ({sd(e):.4f})  "
              f"global {g.mean():.4f} ({sd(g):.4f})  derived {d.mean():.4f} ({sd(d):.4f})  derived - uniform {d.mean()-u.mean():+.4f}  "
              f"derived - global {d.mean()-g.mean():+.4f} (ahead in {int((d > g).sum())}, level in {int((d == g).sum())} of {len(d)})")
    print(f"  dense: {df.dense.mean():.4f} ({sd(df.dense):.4f})\n")
    sens,tbl = first
    t = pd.DataFrame({'params': sens.params, **{f"target@{T:g}": v for T,v in tbl.items()}})
    print("Per-layer targets (seed 0):\n")
    print(t.to_string(float_format=lambda v: f"{v:.3f}"), "\n")
    print(f"total time {time.time()-t0:.0f}s")

if __name__ == '__main__': main()
