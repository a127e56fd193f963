"""Benchmark of fastsparse.export: do shrinking and sparse kernels make pruned models faster and smaller?

1. A ResNet-style CNN at 50% filter sparsity, shrunk, vs dense: CPU inference at batch 1 and 32.
2. An MLP with 4096-wide layers at 90% unstructured sparsity, converted with `to_sparse_inference`, vs dense.
3. Sizes: in memory, as stored sparse, and saved compressed vs `torch.save(state_dict)`.
4. On a CUDA GPU: 2:4 semi-structured Linear layers vs dense, in fp16 and bf16.

Timings are medians of rounds in which every model runs once, in an order shuffled every round, on torch's default
number of CPU threads (`--threads` pins another).

    python bench/export.py                        # writes bench/results/export.md and export.png
    python bench/export.py --quick --out /tmp/e   # a smoke run: small models, few repeats
"""
import argparse, copy, io, os, platform, tempfile, time, warnings
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F
import pandas as pd
from fastsparse.sparsifier import Sparsifier
from fastsparse.export import (shrink, shrink_plan, shrinkable_layers, to_sparse_inference, time_inference, count_params,
                               size_report, save_compressed, SparseLinear, time_calls)

warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')
pd.set_option('display.width', 200); pd.set_option('display.max_columns', 20); pd.set_option('display.max_colwidth', 60)

from fastsparse.demo import small_resnet
from common import parser, start

HEAD = []   # (model, batch, variant, speed-up over dense)

def resnet(widths=(32, 64, 128, 256), blocks=2, n_out=10):
    "A CIFAR-style ResNet (ResNet-18 layout at the given widths)"
    torch.manual_seed(0)
    m = small_resnet(widths, blocks, in_channels=3, n_out=n_out)
    for bn in m.modules():  # BatchNorm statistics as after training
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(.5, 2); nn.init.uniform_(bn.bias, -.5, .5)
    return m.eval()

def mlp(width=4096, depth=3, n_in=1024, n_out=10):
    torch.manual_seed(0)
    layers,ni = [],n_in
    for _ in range(depth): layers += [nn.Linear(ni, width), nn.ReLU()]; ni = width
    return nn.Sequential(*layers, nn.Linear(ni, n_out)).eval()

def mb(b): return f"{b/2**20:.2f} MB"

def macs(m, x):
    "Multiply-accumulates of the Conv2d and Linear layers of `m` on `x`"
    tot = [0]
    def hook(mod, i, o): tot[0] += o.numel() * (mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features)
    hs = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    return tot[0]

def fmt_times(df):
    return df[['model', 'ms', 'speedup', 'params', 'nonzero', 'note']].to_string(index=False, float_format=lambda v: f"{v:.2f}")

def section(title): print(f"\n## {title}\n")

def bench_cnn(a):
    section("1. ResNet-style CNN, 50% filter sparsity, shrunk vs dense (CPU)")
    widths,res = ((16, 32, 64, 128), 16) if a.quick else ((64, 128, 256, 512), 32)
    dense = resnet(widths)
    x1 = torch.randn(1, 3, res, res)
    layers = shrinkable_layers(dense, x1)
    masked = copy.deepcopy(dense)
    Sparsifier(masked, 'filter', include=layers).sparsify_model(0.5)
    t0 = time.perf_counter(); small = shrink(masked, x1); t_shrink = time.perf_counter() - t0
    with torch.no_grad():
        xc = torch.randn(8, 3, res, res)
        err = (small(xc) - masked(xc)).abs().max().item()
    print(f"ResNet-18 layout, widths {widths}, input {res}x{res}; Sparsifier(model, 'filter', include=shrinkable_layers(...))"
          f" at 50% on the {len(layers)} block-internal convs: {', '.join(layers[:3])}, ...")
    print(f"shrink: {t_shrink:.1f} s; max |shrunk - masked| on 8 inputs = {err:.1e}; multiply-adds per image: "
          f"{macs(dense, x1)/1e6:.0f} M dense, {macs(small, x1)/1e6:.0f} M shrunk ({macs(dense, x1)/macs(small, x1):.2f}x fewer)")
    for bs in (1, 32):
        x = torch.randn(bs, 3, res, res)
        n = max(3, a.repeats // (4 if bs == 32 else 1))
        df = time_inference({'dense': dense, 'masked 50% filters': masked, 'shrunk': small}, x, n=n, warmup=2)
        HEAD.extend(('ResNet, 50% filters', bs, k, v) for k,v in zip(df.model[1:], df.speedup[1:]))
        print(f"\nbatch {bs} ({n} rounds in shuffled order, median):")
        print(fmt_times(df))
    # the naive recipe: every conv at 50% -- residual-stream filters are coupled and mostly stay
    naive = copy.deepcopy(dense)
    Sparsifier(naive, 'filter').sparsify_model(0.5)
    plan = shrink_plan(naive, x1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        naive_small = shrink(naive, x1)
    P = lambda m: int(count_params(m).params.iloc[-1])
    print(f"\nfor comparison, every conv at 50% filter sparsity: {int(plan.zero.sum())} zero channels, "
          f"{int(plan.removable.sum())} removable (the others are coupled through residual additions); "
          f"params {P(dense):,} dense -> {P(naive_small):,} shrunk, vs {P(small):,} with shrinkable_layers")
    return dense, small

def bench_mlp(a):
    section("2. MLP, 90% unstructured sparsity, sparse kernels vs dense (CPU)")
    width = 1024 if a.quick else 4096
    dense = mlp(width)
    masked = copy.deepcopy(dense)
    Sparsifier(masked, 'weight', layer_type=nn.Linear, exclude=str(len(dense) - 1)).sparsify_model(0.9)
    print(f"MLP 1024 -> {width} -> {width} -> {width} -> 10, Sparsifier(model, 'weight', layer_type=nn.Linear) at 90% "
          f"(classifier dense)")
    out = {}
    for bs in (1, 32):
        x = torch.randn(bs, 1024)
        n = max(5, a.repeats // (2 if bs == 32 else 1))
        sparse,rep = to_sparse_inference(masked, x, n=max(5, n//2))
        with torch.no_grad(): err = (sparse(x) - masked(x)).abs().max().item()
        print(f"\nbatch {bs}: to_sparse_inference per layer (max |sparse - masked| = {err:.1e}):")
        print(rep.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        df = time_inference({'dense': dense, 'masked 90%': masked, 'sparse (converted)': sparse}, x, n=n, warmup=2)
        HEAD.extend(('MLP, 90% weights', bs, k, v) for k,v in zip(df.model[1:], df.speedup[1:]))
        print(f"\nbatch {bs}, whole model ({n} rounds in shuffled order, median):")
        print(fmt_times(df))
        out[bs] = sparse
    return dense, masked, out[1]

def bench_sizes(models):
    section("3. Sizes")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name,m in models.items():
            sr = size_report(m).iloc[-1]
            info = save_compressed(m, Path(d)/'m.pt')
            rows.append(dict(model=name, in_memory=mb(sr.stored_bytes), simulated_sparse=bool(sr.simulated),
                             dense=mb(sr.dense_bytes), bitmask=mb(sr.bitmask_bytes), csr=mb(sr.csr_bytes),
                             **{'torch.save': mb(info['state_dict_bytes']), 'save_compressed': mb(info['file_bytes']),
                                'ratio': f"{info['ratio']:.2f}x"}))
    print(pd.DataFrame(rows).to_string(index=False))
    return pd.DataFrame(rows)

def bench_gpu(a):
    section("4. 2:4 semi-structured Linear vs dense (CUDA)")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipped"); return
    dev = torch.device('cuda')
    print(f"{torch.cuda.get_device_name(dev)}, compute capability {torch.cuda.get_device_capability(dev)}")
    if torch.cuda.get_device_capability(dev) < (8, 0): print("needs compute capability >= 8.0: skipped"); return
    rows = []
    shapes = [(4096, 4096)] if a.quick else [(4096, 4096), (8192, 8192), (4096, 16384)]
    for dt in (torch.float16, torch.bfloat16):
        for (ni,no) in shapes:
            for tokens in (32, 2048):
                torch.manual_seed(0)
                lin = nn.Linear(ni, no).to(dev, dt).eval()
                Sparsifier(lin, 'weight', nm=True, layer_type=nn.Linear).sparsify_model(0.5)
                x = torch.randn(tokens, ni, device=dev, dtype=dt)
                try: s = SparseLinear(lin, 'semi_structured')
                except Exception as e: rows.append(dict(dtype=str(dt), shape=f"{ni}->{no}", tokens=tokens, note=str(e)[:60])); continue
                ts = time_calls({'dense': lambda: lin(x), '2:4': lambda: s(x)}, n=a.repeats, warmup=5, device=dev)
                md,ms = [sorted(ts[k])[len(ts[k])//2] for k in ('dense', '2:4')]
                with torch.no_grad(): err = (s(x) - lin(x)).abs().max().item()
                rows.append(dict(dtype=str(dt).replace('torch.', ''), shape=f"{ni}->{no}", tokens=tokens, dense_ms=md,
                                 sparse_ms=ms, speedup=md/ms, max_abs_err=err))
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))

INTRO = """`bench/export.py` puts the [export](export_package.md) package together: a ResNet-style CNN at 50% filter sparsity,
shrunk (`shrink`), against the dense one on the CPU at batch 1 and 32; an MLP with 4096-wide layers at 90%
unstructured sparsity converted with `to_sparse_inference`, at batch 1 and 32; sizes in memory and on disk; and, on a
CUDA GPU, 2:4 `Linear` layers against dense ones in fp16 and bf16 (skipped without one). The table: speed-ups over
the dense model (medians of rounds in shuffled order)."""

def plot(head):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3), layout='constrained')
    labels = [f"{m}\n{v}, batch {b}" for m,b,v,_ in head.itertuples(index=False)]
    ax.barh(range(len(head)), head.speedup, color=['tab:gray' if v.startswith('masked') else 'tab:green' for v in head.variant])
    ax.axvline(1, color='k', lw=0.8); ax.set_yticks(range(len(head)), labels, fontsize=7); ax.invert_yaxis()
    ax.set_xlabel('speed-up over the dense model (CPU)', fontsize=8)
    return fig

def reading(head, sizes):
    h = head.set_index(['model', 'batch', 'variant']).speedup
    masked = [v for (m,b,k),v in h.items() if k.startswith('masked')]
    shr = [h[('ResNet, 50% filters', b, 'shrunk')] for b in (1, 32)]
    cv = [h[('MLP, 90% weights', b, 'sparse (converted)')] for b in (1, 32)]
    mc = sizes.set_index('model')
    return (f"How to read it:\n\n- **Masked models** run at {min(masked):.2f}-{max(masked):.2f}x the dense speed"
            + (" -- no faster" if max(masked) < 1.1 else "") + f": their zeros are stored densely (`simulated_sparse` in the sizes table).\n- **Shrinking** the ResNet makes it {shr[0]:.2f}x as fast at batch 1 "
            f"and {shr[1]:.2f}x at batch 32 (the output's difference from the masked model is printed above).\n- **CSR kernels** make the "
            f"90% sparse MLP {cv[0]:.2f}x as fast at batch 1 and {cv[1]:.2f}x at batch 32; `save_compressed` writes the masked MLP in "
            f"{mc.loc['MLP masked 90%', 'save_compressed']} instead of {mc.loc['MLP masked 90%', 'torch.save']} "
            f"({mc.loc['MLP masked 90%', 'ratio']} smaller). int8, a form that changes outputs, is measured by `bench/deploy.py`.")

if __name__ == '__main__':
    p = parser(__doc__)
    p.add_argument('--repeats', type=int, default=None, help='timed calls per model (default 30, quick 5)')
    a = p.parse_args()
    run = start('export', a)
    a.repeats = a.repeats or (5 if a.quick else 30)
    print(f"{a.repeats} repeats; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    t0 = time.perf_counter()
    cnn_dense,cnn_small = bench_cnn(a)
    mlp_dense,mlp_masked,mlp_sparse = bench_mlp(a)
    sizes = bench_sizes({'ResNet dense': cnn_dense, 'ResNet shrunk': cnn_small, 'MLP dense': mlp_dense,
                         'MLP masked 90%': mlp_masked, 'MLP converted (batch 1)': mlp_sparse})
    bench_gpu(a)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    head = pd.DataFrame(HEAD, columns=['model', 'batch', 'variant', 'speedup'])
    run.write(title="Real speed-ups and sizes: shrinking, sparse kernels, compressed files", intro=INTRO, summary=head,
              fig=plot(head), reading=reading(head, sizes))
