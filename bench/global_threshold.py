"""One global magnitude threshold at 90% over a stack of Linear(4096, 4096) layers: fastsparse against fasterai.

Each method runs in its own subprocess on an identical model (same seed), so that the peak resident memory it adds on
top of the model's own weights is measured cleanly (`ru_maxrss` after, less before). Time covers building the
sparsifier and computing and applying the masks. fastsparse's count of zeros is asserted to be exactly
`round(s * N)`; fasterai's is reported. Without fasterai installed, its row is skipped with the reason.

    python bench/global_threshold.py                        # 24 layers (403M weights): writes bench/results/global_threshold.md
                                                            # (about 1 minute on 2 cores; needs about 10 GB of memory)
    python bench/global_threshold.py --layers 4             # a smaller run
    python bench/global_threshold.py --quick --out /tmp/q   # a smoke run: 2 layers (33.6M weights, about 10 seconds)
"""
import argparse, importlib.metadata, importlib.util, json, resource, subprocess, sys, time
import pandas as pd
from common import parser, start

def child(method, layers, sparsity):
    "Build the model, prune it with `method`, return seconds, peak memory added per weight and the zeros"
    import torch, torch.nn as nn
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(layers)])
    for p in model.parameters(): p.requires_grad_(False)
    N = sum(p.numel() for p in model.parameters())
    if method == 'fasterai':
        import warnings; warnings.simplefilter('ignore')
        from fasterai.sparse.sparsifier import Sparsifier as FSparsifier
        from fasterai.core.criteria import large_final as f_large_final
    else:
        from fastsparse.sparsifier import Sparsifier
    import gc; gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    if method == 'fasterai':
        sp = FSparsifier(model, 'weight', 'global', f_large_final, layer_type=nn.Linear)
        import io, contextlib
        with contextlib.redirect_stdout(io.StringIO()): sp.sparsify_model(sparsity)
    else:
        sp = Sparsifier(model, 'weight', 'global', 'large_final', layer_type=nn.Linear)
        sp.sparsify_model(sparsity)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return dict(method=method, layers=layers, weights=N, seconds=dt, extra_bytes_per_weight=(peak - base) / N, zeros=zeros,
                exact=zeros == round(sparsity * N), threads=torch.get_num_threads())

def plot(df):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(6.5, 2.6), layout='constrained')
    colors = ['tab:blue' if m == 'fastsparse' else 'tab:gray' for m in df.method]
    names = [f"{m}, {l} layer{'s' if l > 1 else ''}" for m, l in zip(df.method, df.layers)]
    for ax, col, label in ((axs[0], 'seconds', 'seconds to prune'), (axs[1], 'extra B/weight', 'peak memory added, bytes per weight')):
        ax.barh(range(len(df)), df[col], color=colors)
        ax.set_yticks(range(len(df)), names, fontsize=8); ax.invert_yaxis(); ax.set_xlabel(label, fontsize=8)
    return fig

def main():
    ap = parser(__doc__, quick='two layers (33.6M weights): a smoke run of seconds')
    ap.add_argument('--layers', type=int, default=24)
    ap.add_argument('--sparsity', type=float, default=0.9)
    ap.add_argument('--methods', default='fastsparse,fasterai')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:   # one method in this process: its result as one JSON line
        if a.threads:
            import torch; torch.set_num_threads(a.threads)
        print(json.dumps(child(a.child, a.layers, a.sparsity))); return
    run = start('global_threshold', a)
    if a.quick: a.layers = 2   # several tensors, more scores than one buffer holds: the full run's path
    rows, skipped, one = [], [], []  # `one`: the same on one layer, whose scores are selected as one held tensor
    for m in a.methods.split(','):
        if m == 'fasterai' and importlib.util.find_spec('fasterai') is None:
            skipped.append(f"fasterai: skipped, not installed (pip install fasterai)"); print(skipped[-1]); continue
        for layers, dest in ((a.layers, rows), (1, one)):
            cmd = [sys.executable, __file__, '--child', m, '--layers', str(layers), '--sparsity', str(a.sparsity)]
            if a.threads: cmd += ['--threads', str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode: sys.exit(f"{m} failed:\n{out.stderr[-3000:]}")
            dest.append(json.loads(out.stdout.strip().splitlines()[-1]))
    N = rows[0]['weights']
    want = round(a.sparsity * N)
    ver = importlib.metadata.version('fasterai') if importlib.util.find_spec('fasterai') else 'not installed'
    print(f"Global magnitude pruning at {a.sparsity:.0%} of {a.layers} x Linear(4096, 4096) = {N:,} weights, "
          f"{rows[0]['threads']} torch threads per process; fasterai {ver}")
    def table(rs):
        print(f"{'method':<12}{'seconds':>10}{'extra B/weight':>16}{'zeros':>14}{'exact':>7}")
        for r in rs:
            print(f"{r['method']:<12}{r['seconds']:>10.2f}{r['extra_bytes_per_weight']:>16.2f}{r['zeros']:>14,}{str(r['exact']):>7}")
    table(rows)
    N1 = one[0]['weights']
    print(f"\nThe same on 1 x Linear(4096, 4096) = {N1:,} weights (the scores selected as one held tensor)")
    table(one)
    res, res1 = {r['method']: r for r in rows}, {r['method']: r for r in one}
    if 'fastsparse' in res:
        for r, n_ in ((res['fastsparse'], N), (res1['fastsparse'], N1)):
            assert r['zeros'] == round(a.sparsity * n_), f"fastsparse pruned {r['zeros']:,} weights, not round(s*N) = {round(a.sparsity * n_):,}"
        print(f"fastsparse: exactly round({a.sparsity:g} x N) zeros in both")
    df = pd.DataFrame([dict(method=r['method'], layers=r['layers'], seconds=r['seconds'],
                            **{'extra B/weight': r['extra_bytes_per_weight']}, zeros=f"{r['zeros']:,}",
                            **{'off by': r['zeros'] - round(a.sparsity * r['weights'])}) for r in rows + one])
    if {'fastsparse', 'fasterai'} <= set(res):
        f, o = res['fastsparse'], res['fasterai']
        speed, mem = o['seconds'] / f['seconds'], o['extra_bytes_per_weight'] / max(f['extra_bytes_per_weight'], 1e-9)
        print(f"fastsparse vs fasterai: {speed:.1f}x as fast, {mem:.1f}x less extra memory")
        reading = (f"How to read it: `extra B/weight` is the peak memory a method adds per weight, beside the model's own 4 "
                   f"bytes. fastsparse prunes the {N:,} weights in {f['seconds']:.2f} s with {f['extra_bytes_per_weight']:.2f} "
                   f"extra bytes per weight (1 of them is the boolean mask it keeps); fasterai takes {o['seconds']:.2f} s "
                   f"({speed:.1f}x {'as long' if speed >= 1 else 'the time: faster'}) and {o['extra_bytes_per_weight']:.2f} bytes per weight. "
                   f"`off by`: the zeros less round({a.sparsity:g} x N) = {want:,}; fastsparse's count is exact (asserted), "
                   + ("fasterai's too." if o['zeros'] == want else
                      f"fasterai's (a threshold taken from `kthvalue`, then compared) is off by {o['zeros'] - want:+,}.")
                   + f" On one layer ({N1:,} weights, whose scores fastsparse selects as one held tensor) fastsparse adds "
                     f"{res1['fastsparse']['extra_bytes_per_weight']:.2f} bytes per weight and fasterai "
                     f"{res1['fasterai']['extra_bytes_per_weight']:.2f}.")
    else:
        f = res['fastsparse']
        reading = (f"How to read it: fastsparse prunes the {N:,} weights in {f['seconds']:.2f} s with {f['extra_bytes_per_weight']:.2f} "
                   f"extra bytes per weight, to exactly round({a.sparsity:g} x N) = {want:,} zeros (asserted). " + ' '.join(skipped))
    intro = (f"`bench/global_threshold.py` prunes {a.layers} `Linear(4096, 4096)` layer{'s' if a.layers > 1 else ''} ({N / 1e6:.0f}M weights), and one such layer, to "
             f"{a.sparsity:.0%} with one global magnitude threshold, with fastsparse's `Sparsifier` and with fasterai {ver}'s "
             "on the same model, each method in its own process so that the peak memory it adds on top of the model's weights "
             "is measured cleanly (`ru_maxrss`). Time covers building the sparsifier and computing and applying the masks. "
             "fasterai concatenates every score and calls `kthvalue`; fastsparse brackets the cut from a sample and resolves "
             "it exactly with one `kthvalue` over the candidates.")
    run.write(title=f"A global threshold over {N / 1e6:.0f}M weights", intro=intro, summary=df, fig=plot(df), reading=reading)

if __name__ == '__main__': main()
