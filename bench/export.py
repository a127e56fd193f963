"""Benchmark of fastsparse.export: do shrinking and sparse kernels make pruned models faster and smaller?

1. A ResNet-style CNN at 50% filter sparsity, shrunk, vs dense: CPU inference at batch 1 and 32.
2. An MLP with 4096-wide layers at 90% unstructured sparsity, converted with `to_sparse_inference`, vs dense.
3. Sizes: in memory, as stored sparse, and saved compressed vs `torch.save(state_dict)`.
4. On a CUDA GPU: 2:4 semi-structured Linear layers vs dense, in fp16 and bf16.

Timings are medians of interleaved calls (dense and sparse in turn) on a fixed number of CPU threads.
Usage: python bench/export.py [--quick] [--threads 1] [--repeats 30]
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
        df = time_inference({'dense': dense, 'masked 50% filters': masked, 'shrunk': small}, x, n=n, warmup=2,
                            num_threads=a.threads)
        print(f"\nbatch {bs} ({n} interleaved runs each, median):")
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
        sparse,rep = to_sparse_inference(masked, x, n=max(5, n//2), num_threads=a.threads)
        with torch.no_grad(): err = (sparse(x) - masked(x)).abs().max().item()
        print(f"\nbatch {bs}: to_sparse_inference per layer (max |sparse - masked| = {err:.1e}):")
        print(rep.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        df = time_inference({'dense': dense, 'masked 90%': masked, 'sparse (converted)': sparse}, x, n=n, warmup=2,
                            num_threads=a.threads)
        print(f"\nbatch {bs}, whole model ({n} interleaved runs each, median):")
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

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='small models and few repeats: a smoke run')
    p.add_argument('--threads', type=int, default=1, help='CPU threads for every timing (default 1)')
    p.add_argument('--repeats', type=int, default=None, help='timed calls per model (default 30, quick 5)')
    a = p.parse_args()
    a.repeats = a.repeats or (5 if a.quick else 30)
    torch.set_num_threads(a.threads)  # for everything, not only the timings (OpenMP threads spin when the CPUs are shared)
    print(f"# fastsparse export benchmark{' (--quick)' if a.quick else ''}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch.set_num_threads({a.threads}) for every timing, {a.repeats} repeats; load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    t0 = time.perf_counter()
    cnn_dense,cnn_small = bench_cnn(a)
    mlp_dense,mlp_masked,mlp_sparse = bench_mlp(a)
    bench_sizes({'ResNet dense': cnn_dense, 'ResNet shrunk': cnn_small, 'MLP dense': mlp_dense,
                 'MLP masked 90%': mlp_masked, 'MLP converted (batch 1)': mlp_sparse})
    bench_gpu(a)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
