"""Global magnitude masks at 90% over a stack of Linear 4096x4096 layers: fastsparse vs fasterai 0.4.1.

Each method runs in its own subprocess on an identical model (same seed), so the peak resident
memory it adds on top of the model's own weights is measured cleanly (`ru_maxrss` after minus
before). Time covers building the sparsifier and computing + applying the masks.

    python bench/global_threshold.py            # 24 layers (~403M weights)
    python bench/global_threshold.py --layers 4 # a quicker run
"""
import argparse, json, os, resource, subprocess, sys, time

def child(method, layers, sparsity, threads):
    import torch, torch.nn as nn
    torch.set_num_threads(threads)
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
    return dict(method=method, weights=N, seconds=dt, extra_bytes_per_weight=(peak - base) / N,
                zeros=zeros, exact=zeros == round(sparsity * N))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--layers', type=int, default=24)
    ap.add_argument('--sparsity', type=float, default=0.9)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--methods', default='fastsparse,fasterai')
    ap.add_argument('--child', default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.layers, a.sparsity, a.threads))); return
    rows = []
    for m in a.methods.split(','):
        out = subprocess.run([sys.executable, __file__, '--child', m, '--layers', str(a.layers), '--sparsity', str(a.sparsity),
                              '--threads', str(a.threads)], capture_output=True, text=True)
        if out.returncode: sys.exit(f"{m} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    N = rows[0]['weights']
    print(f"Global magnitude pruning at {a.sparsity:.0%} of {a.layers} x Linear(4096, 4096) = {N:,} weights, {a.threads} threads")
    print(f"{'method':<12}{'seconds':>10}{'extra B/weight':>16}{'zeros':>14}{'exact':>7}")
    for r in rows:
        print(f"{r['method']:<12}{r['seconds']:>10.2f}{r['extra_bytes_per_weight']:>16.2f}{r['zeros']:>14,}{str(r['exact']):>7}")
    if len(rows) == 2:
        f, o = rows
        print(f"fastsparse vs fasterai: {o['seconds']/f['seconds']:.1f}x faster, "
              f"{o['extra_bytes_per_weight']/max(f['extra_bytes_per_weight'], 1e-9):.1f}x less extra memory "
              f"(targets: >= 5x faster, <= 1.5 extra bytes per weight)")

if __name__ == '__main__': main()
