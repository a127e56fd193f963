"""Sensitivity-derived per-layer targets against one sparsity for every layer, a hand-made rule and a global threshold.

On scikit-learn's digits, for each seed: train `digits_cnn(16)` dense, run `analyze_sensitivity` on all its
convolutions and its classifier, then fine-tune the dense model to 90% and to 95% overall sparsity (the fraction of
zero weights over those layers) four ways, each from the same dense weights, with the same schedule, learning rate,
epochs and seed:

- `uniform`: the same sparsity for every layer;
- `ends-dense`: the usual hand-made rule, first and last layer dense, the others uniform at the same overall sparsity;
- `global`: one magnitude threshold over the same layers (`context='global'`), which lets the weights' sizes decide
  how sparse each layer gets (no analysis);
- `derived`: the targets `SensitivityResult.to_layer_targets` chooses from the analysis.

The tiny first convolution (1 input channel) is analysed like every other layer, not excluded: keeping such a layer
dense by hand is the kind of decision the analysis should make. The script asserts that the analysis leaves the model
bit-identical, and that every arm ends with exactly the zeros it asked for: `round(t * n)` in each layer, or
`round(T * N)` over the layers for the global threshold.

    python bench/sensitivity.py                        # writes bench/results/sensitivity.md (about 2 minutes on 2 cores)
    python bench/sensitivity.py --quick --out /tmp/q   # a smoke run: one seed, 2 + 2 epochs (about 10 seconds)
"""
import logging, time, warnings
warnings.filterwarnings('ignore', category=FutureWarning)  # torch.jit deprecation noise from fastai's imports
import pandas as pd
import torch, torch.nn as nn
from common import parser, start
from fastai.basics import Learner, accuracy, CrossEntropyLossFlat, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.callback import SparsifyCallback
from fastsparse.schedule import agp
from fastsparse.sensitivity import analyze_sensitivity

pd.set_option('display.width', 200)
ARMS = ('uniform', 'ends-dense', 'global', 'derived')

def learner(a, seed):
    set_seed(seed, reproducible=True)
    learn = Learner(digits_dls(), digits_cnn(a.width), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.remove_cb(learn.progress)
    return learn

def fit(learn, epochs, lr, cbs=None):
    with learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return float(learn.validate()[1])

def run_seed(a, seed):
    "Dense training, analysis, then for each level the four arms, fine-tuned from the same dense weights"
    t0 = time.perf_counter()
    learn = learner(a, seed)
    dense_acc = fit(learn, a.dense_epochs, a.lr)
    dense = {k: v.clone() for k, v in learn.model.state_dict().items()}
    sens = analyze_sensitivity(learn, a.levels, metric=a.metric, layer_type=(nn.Conv2d, nn.Linear), show_progress=False)
    after = learn.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in dense.items()), "analyze_sensitivity changed the model"
    rows, targets_by_level = [dict(seed=seed, level=0., arm='dense', accuracy=dense_acc, sparsity=0.)], {}
    P = sum(sens.params.values())
    for T in a.targets:
        derived = sens.to_layer_targets(T, max_sparsity=a.max_sparsity)
        first, last = sens.layers[0], sens.layers[-1]
        inner = T * P / (P - sens.params[first] - sens.params[last])
        arms = {'uniform': dict.fromkeys(derived, T), 'ends-dense': {n: (0. if n in (first, last) else inner) for n in sens.layers},
                'global': T, 'derived': derived}
        targets_by_level[T] = derived
        for name in ARMS:
            tg = arms[name]
            ft = learner(a, seed)
            ft.model.load_state_dict(dense)
            ctx, inc = ('global', list(sens.layers)) if name == 'global' else ('local', None)  # (a dict names its layers itself)
            cb = SparsifyCallback(tg, 'weight', ctx, 'large_final', agp.with_pcts(0., a.prune_pct),
                                  layer_type=(nn.Conv2d, nn.Linear), include=inc)
            acc = fit(ft, a.epochs, a.ft_lr, cbs=cb)
            rep = cb.sparsity_report().set_index('layer')
            if name == 'global': assert rep.loc['total', 'zeros'] == round(T * P), (name, T, rep.loc['total', 'zeros'], round(T * P))
            else:
                for n, t in tg.items(): assert rep.loc[n, 'zeros'] == round(t * rep.loc[n, 'params']), (name, T, n)
            rows.append(dict(seed=seed, level=T, arm=name, accuracy=acc, sparsity=rep.loc['total', 'zeros'] / P))
    print(f"seed {seed}: {time.perf_counter() - t0:.0f}s; " + ', '.join(f"{r['arm']}@{r['level']:g} {r['accuracy']:.4f}" for r in rows),
          flush=True)
    return rows, sens, targets_by_level

def plot(df):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    levels = sorted(l for l in df.level.unique() if l > 0)
    fig, axs = plt.subplots(1, len(levels), figsize=(3.6 * len(levels), 3), layout='constrained', squeeze=False, sharey=True)
    dense = df[df.arm == 'dense'].accuracy.mean()
    for ax, T in zip(axs[0], levels):
        d = df[df.level == T]
        for i, arm in enumerate(ARMS):
            acc = d[d.arm == arm].accuracy
            ax.bar(i, acc.mean(), color='tab:blue' if arm == 'derived' else 'tab:gray', alpha=0.7)
            ax.plot([i] * len(acc), acc, 'k.', ms=5)
        ax.axhline(dense, color='tab:green', ls='--', lw=1, label='dense')
        ax.set_xticks(range(len(ARMS)), ARMS, fontsize=8); ax.set_title(f"{T:.0%} sparse overall", fontsize=9)
        ax.set_ylabel('valid accuracy (bars: mean; dots: seeds)', fontsize=8); ax.set_ylim(0, 1)
    axs[0][-1].legend(fontsize=7, loc='lower right')
    return fig

def reading(df, n_seeds):
    out = []
    for T in sorted(l for l in df.level.unique() if l > 0):
        d = df[df.level == T]
        m = d.groupby('arm').accuracy.mean()
        per = {arm: d[d.arm == arm].set_index('seed').accuracy for arm in ARMS}
        top = [k for k in ARMS if m[k] == max(m[k] for k in ARMS)]
        parts = [f"At {T:.0%}, {' and '.join(top)} {'is ahead' if len(top) == 1 else 'are level at the top'} ({m[top[0]]:.4f})"]
        for other in ('uniform', 'ends-dense', 'global'):
            diff = m['derived'] - m[other]
            ahead, level = int((per['derived'] > per[other]).sum()), int((per['derived'] == per[other]).sum())
            by = f"{'ahead of' if diff > 0 else 'behind'} {other} by {abs(diff):.4f}" if diff else f"level with {other}"
            parts.append(f"derived is {by} (ahead in {ahead}, level in {level} of {n_seeds} seed(s))")
        out.append('; '.join(parts) + '.')
    dense = df[df.arm == 'dense'].accuracy.mean()
    return (f"How to read it: mean validation accuracy after fine-tuning, over {n_seeds} seed(s); every arm holds the same "
            f"overall sparsity (`achieved`) over the same layers. " + ' '.join(out) + f" The dense model reaches {dense:.4f}.")

def intro(a):
    return f"""`bench/sensitivity.py` trains `digits_cnn({a.width})` dense on scikit-learn's digits ({a.dense_epochs} epochs,
lr {a.lr:g}), runs `analyze_sensitivity` on its three convolutions and its classifier (metric: valid {a.metric}, levels
{', '.join(f'{l:g}' for l in a.levels)}), then fine-tunes the dense weights to {' and '.join(f'{T:.0%}' for T in a.targets)}
overall sparsity over those layers ({a.epochs} epochs, lr {a.ft_lr:g}, AGP over the first {a.prune_pct:.0%}) four ways: the
same sparsity for every layer (`uniform`), first and last layer dense and the others uniform (`ends-dense`), one
magnitude threshold over the layers (`global`), and the targets `to_layer_targets` derives from the analysis (`derived`,
capped at {a.max_sparsity:g}); {a.seeds} seed(s). Each arm's zeros are asserted to be exactly the counts it asked for, and the
analysis to leave the model bit-identical."""

def main():
    ap = parser(__doc__, quick='one seed, 2 dense + 2 fine-tuning epochs: a smoke run of seconds')
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--width', type=int, default=16, help='digits_cnn width')
    ap.add_argument('--dense-epochs', type=int, default=6)
    ap.add_argument('--epochs', type=int, default=6, help='sparse fine-tuning epochs')
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--ft-lr', type=float, default=5e-3)
    ap.add_argument('--prune-pct', type=float, default=0.6, help='fraction of fine-tuning over which AGP prunes')
    ap.add_argument('--metric', default='loss', help="metric of the analysis ('loss' or 'accuracy')")
    ap.add_argument('--max-sparsity', type=float, default=0.98)
    a = ap.parse_args()
    run = start('sensitivity', a)
    a.levels, a.targets = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98), (0.9, 0.95)
    if a.quick: a.seeds, a.dense_epochs, a.epochs = 1, 2, 2
    logging.getLogger('fastsparse').setLevel(logging.WARNING)
    t0 = time.perf_counter()
    print(f"digits_cnn({a.width}), all Conv2d + Linear layers; dense {a.dense_epochs} epochs (lr {a.lr}), then {a.epochs} epochs "
          f"of fine-tuning (lr {a.ft_lr}, AGP over the first {a.prune_pct:.0%}) per arm; analysis metric: valid {a.metric}, "
          f"levels {a.levels}; max_sparsity {a.max_sparsity}; seeds 0..{a.seeds - 1}", flush=True)
    rows = []
    for seed in range(a.seeds):
        r, sens, tbl = run_seed(a, seed)
        rows += r
        if seed == 0: first = (sens, tbl)
    df = pd.DataFrame(rows)
    print(f"\nexact counts: {sum(df.arm != 'dense')} sparse fine-tunes, each with exactly the zeros it asked for; the analysis "
          f"left the model bit-identical in all {a.seeds} seed(s)")
    wide = df.assign(col=[a_ if a_ == 'dense' else f"{a_}@{l:g}" for a_, l in zip(df.arm, df.level)]).pivot(
        index='seed', columns='col', values='accuracy')
    wide = wide[['dense'] + [f"{arm}@{T:g}" for T in a.targets for arm in ARMS]]
    print("\nFinal validation accuracy per seed:\n")
    print(wide.to_string(float_format=lambda v: f"{v:.4f}"))
    sens, tbl = first
    t = pd.DataFrame({'params': sens.params, **{f"target@{T:g}": v for T, v in tbl.items()}})
    print("\nPer-layer targets derived (seed 0):\n")
    print(t.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\ntotal time {time.perf_counter() - t0:.0f}s")
    g = df[df.arm != 'dense'].groupby(['level', 'arm'], sort=False)
    summ = pd.DataFrame({'mean accuracy': g.accuracy.mean(), 'sd': g.accuracy.std().fillna(0.), 'min': g.accuracy.min(),
                         'achieved': g.sparsity.mean()}).reset_index()
    unif = summ[summ.arm == 'uniform'].set_index('level')['mean accuracy']
    summ['vs uniform'] = summ['mean accuracy'] - summ.level.map(unif)
    summ['level'] = summ.level.map(lambda v: f"{v:.0%}")
    run.write(title="Sensitivity-derived per-layer targets", intro=intro(a),
              summary=summ, fig=plot(df), reading=reading(df, a.seeds))

if __name__ == '__main__': main()
