"""Benchmark of sparse + int8 deployment on the CPU: which form is fastest and smallest, layer by layer?

1. One 4096x4096 Linear layer at 70% and 90% sparsity, batch 1 and 32: dense fp32, CSR, `Int8Linear` with each of
   its kernels, and the int8 alternatives that are not used (torchao if installed, QNNPACK's block-sparse int8).
2. An MLP 2048-4096-4096-1000 (every layer masked) at 70% and 90%, batch 1 and 32: dense fp32, CSR only, int8 only
   (every layer forced to that form) and the mix `to_sparse_inference(..., forms=['csr', 'int8'])` chooses.
3. File sizes of that MLP: `torch.save(state_dict)`, `save_compressed` (bit-exact) and `save_compressed(bits=8)`.
4. scikit-learn's digits, trained sparse with `SparsifyCallback`: validation accuracy of the fp32 model, of the
   deployed model (the chosen mix, and every Linear in int8), and of the model loaded from its int8 file.

Timings are medians of interleaved calls on a fixed number of CPU threads; the script prints the machine's load and
the other processes using the CPU when it starts and ends, since they share its cores.
Usage: python bench/deploy.py [--quick] [--threads 1] [--repeats 30] [--only kernels,mlp,digits]
"""
import argparse, copy, os, platform, statistics, subprocess, tempfile, time, warnings
from pathlib import Path
import torch, torch.nn as nn
import pandas as pd
from fastsparse.sparsifier import Sparsifier
from fastsparse.export import (to_sparse_inference, time_inference, save_compressed, load_compressed, size_report,
                               SparseLinear, Int8Linear, quantize_int8, time_calls)
from fastsparse.export.timing import max_rel_error

warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')  # raised by an import in fastai
pd.set_option('display.width', 220); pd.set_option('display.max_columns', 20); pd.set_option('display.max_colwidth', 70)

def section(title): print(f"\n## {title}\n", flush=True)
def mb(b): return f"{b/2**20:.2f} MB"
def f2(v): return f"{v:.2f}"

def machine_load(when):
    "The load average and the other processes using the CPU now"
    la = os.getloadavg()
    ps = subprocess.run(['ps', '-eo', 'pid,pcpu,args', '--sort=-pcpu'], capture_output=True, text=True).stdout.splitlines()[1:]
    busy = [l.split(None, 1)[1] for l in ps if int(l.split()[0]) != os.getpid() and float(l.split()[1]) >= 10][:6]
    print(f"{when}: load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} on {os.cpu_count()} cores; "
          f"other processes over 10% CPU: {len(busy)}")
    for l in busy: print(f"    {l[:110]}")

def masked_linear(ni, no, sp, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(ni, no).eval()
    Sparsifier(lin, 'weight', layer_type=nn.Linear).sparsify_model(sp)
    return lin

def bench_kernels(a):
    d = 1024 if a.quick else 4096
    section(f"1. Kernels for one {d}x{d} Linear layer (CPU)")
    rows = []
    for sp in (0.7, 0.9):
        lin = masked_linear(d, d, sp)
        cands = {'csr': SparseLinear(lin), 'int8 fbgemm': Int8Linear(lin, 'fbgemm'), 'int8 int_mm': Int8Linear(lin, 'int_mm')}
        try:
            from torchao.quantization import quantize_, Int8DynamicActivationInt8WeightConfig
            ao = nn.Sequential(copy.deepcopy(lin)); quantize_(ao, Int8DynamicActivationInt8WeightConfig())
            cands['torchao int8 dynamic'] = ao
        except ImportError: pass
        qn = None
        if 'qnnpack' in torch.backends.quantized.supported_engines:
            q,scale = quantize_int8(lin.weight)
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(d, dtype=torch.long), 0)
            old = torch.backends.quantized.engine
            torch.backends.quantized.engine = 'qnnpack'
            try: qn = torch.ops.sparse.qlinear_prepack(qw, lin.bias.detach(), 1, 4)
            except RuntimeError: qn = None
            finally: torch.backends.quantized.engine = old
        for bs in (1, 32):
            x = torch.randn(bs, d)
            fns = {'dense fp32': lambda: lin(x), **{k:(lambda m=m: m(x)) for k,m in cands.items()}}
            if qn is not None: fns['qnnpack sparse int8'] = lambda: torch.ops.sparse.qlinear_dynamic(x, qn)
            old_t,old_e = torch.get_num_threads(),torch.backends.quantized.engine
            torch.set_num_threads(a.threads)
            try:
                # QNNPACK's sparse op runs under its own engine; the others do not read the setting
                if qn is not None: torch.backends.quantized.engine = 'qnnpack'
                ts = time_calls(fns, n=a.repeats, warmup=3)
            finally: torch.set_num_threads(old_t); torch.backends.quantized.engine = old_e
            with torch.inference_mode():
                ref = lin(x)
                errs = {k:max_rel_error(m(x), ref) for k,m in cands.items()}
            med = {k:statistics.median(v) for k,v in ts.items()}
            for k,v in med.items():
                rows.append(dict(sparsity=f"{sp:.0%}", batch=bs, kernel=k, ms=v, speedup=med['dense fp32']/v,
                                 error=errs.get(k, 0. if k == 'dense fp32' else float('nan'))))
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nerror: max |output - dense output| / max |dense output| on that input (CSR is exact up to rounding)")

def mlp(sp, widths=(2048, 4096, 4096, 1000)):
    torch.manual_seed(0)
    layers = []
    for ni,no in zip(widths[:-1], widths[1:]): layers += [nn.Linear(ni, no), nn.ReLU()]
    m = nn.Sequential(*layers[:-1]).eval()
    Sparsifier(m, 'weight', layer_type=nn.Linear).sparsify_model(sp)
    return m

def bench_mlp(a):
    widths = (512, 1024, 1024, 250) if a.quick else (2048, 4096, 4096, 1000)
    section(f"2. MLP {'-'.join(map(str, widths))}, every layer masked: dense, CSR only, int8 only, the chosen mix (CPU)")
    summary,sizes = [],[]
    for sp in (0.7, 0.9):
        masked = mlp(sp, widths)
        for bs in (1, 32):
            x = torch.randn(bs, widths[0])
            kw = dict(n=max(5, a.repeats//3), num_threads=a.threads)
            csr,_ = to_sparse_inference(masked, x, forms='csr', min_speedup=1e-9, min_sparsity=0, **kw)
            i8,_ = to_sparse_inference(masked, x, forms='int8', min_speedup=1e-9, **kw)
            mix,rep = to_sparse_inference(masked, x, forms=['csr', 'int8'], **kw)
            print(f"\n{sp:.0%} sparse, batch {bs}: the mix, per layer")
            print(rep.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
            df = time_inference({'dense fp32': masked, 'CSR only': csr, 'int8 only': i8, 'chosen mix': mix}, x,
                                n=a.repeats, warmup=3, num_threads=a.threads)
            with torch.inference_mode():
                ref = masked(x)
                err = {k:max_rel_error(m(x), ref) for k,m in (('dense fp32', masked), ('CSR only', csr), ('int8 only', i8),
                                                              ('chosen mix', mix))}
            df['error'] = df.model.map(err)
            print(f"\n{sp:.0%} sparse, batch {bs}: whole model ({a.repeats} interleaved runs each, median)")
            df['speedup_min'] = df.ms_min.iloc[0]/df.ms_min
            print(df[['model', 'ms', 'speedup', 'ms_min', 'speedup_min', 'error']].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
            s,smin = df.set_index('model').speedup,df.set_index('model').speedup_min
            best,best_min = max(s['CSR only'], s['int8 only']),max(smin['CSR only'], smin['int8 only'])
            summary.append(dict(sparsity=f"{sp:.0%}", batch=bs, csr=s['CSR only'], int8=s['int8 only'], mix=s['chosen mix'],
                                mix_vs_best_single=s['chosen mix']/best, mix_vs_best_single_min=smin['chosen mix']/best_min,
                                mix_vs_dense_min=smin['chosen mix'],
                                forms='/'.join(rep.form),
                                same_model_as={'int8': 'int8 only', 'csr': 'CSR only'}.get(rep.form.iloc[0], '-')
                                if rep.form.nunique() == 1 else '-'))
        with tempfile.TemporaryDirectory() as d:
            plain = Path(d)/'plain.pt'; torch.save(masked.state_dict(), plain); plain_bytes = plain.stat().st_size
            full = save_compressed(masked, Path(d)/'full.fsz')
            i8f = save_compressed(masked, Path(d)/'int8.fsz', bits=8)
            back = load_compressed(Path(d)/'int8.fsz')
        sr = size_report(masked).iloc[-1]
        zeros_exact = all(torch.equal(back[k] == 0, v == 0) for k,v in masked.state_dict().items())
        sizes.append({'sparsity': f"{sp:.0%}", 'torch.save': mb(plain_bytes), 'save_compressed': mb(full['file_bytes']),
                      'bits=8': mb(i8f['file_bytes']), 'bits=8 / torch.save': f"{i8f['file_bytes']/plain_bytes:.1%}",
                      'size_report int8_bitmask': mb(sr.int8_bitmask_bytes), 'zeros exact after load': zeros_exact})
    print("\nsummary: speed-ups over dense fp32 (whole model, medians), and the mix against the best single form (medians, and "
          "fastest runs: _min);\nsame_model_as: the mix chose that single form for every layer, so the two are the same kernels "
          "and differ only by timing noise")
    print(pd.DataFrame(summary).to_string(index=False, float_format=f2))
    section(f"3. File sizes of that MLP")
    print(pd.DataFrame(sizes).to_string(index=False))

def digits_acc(m, x, y):
    with torch.inference_mode(): return (m(x).argmax(1) == y).float().mean().item()

def bench_digits(a):
    section("4. Digits (scikit-learn), trained sparse, deployed on the CPU")
    from fastai.basics import Learner, CrossEntropyLossFlat, accuracy
    from fastsparse.callback import SparsifyCallback
    from fastsparse.schedule import agp
    from fastsparse.demo import digits_dls, digits_data, digits_mlp, digits_cnn
    _,val = digits_data()
    xv,yv = val.x,val.y
    rows = []
    setups = [('MLP 64-256-256-10', digits_mlp, nn.Linear, 0.9), ('MLP 64-256-256-10', digits_mlp, nn.Linear, 0.7),
              ('CNN (digits_cnn)', digits_cnn, (nn.Conv2d, nn.Linear), 0.7), ('CNN (digits_cnn)', digits_cnn, (nn.Conv2d, nn.Linear), 0.9)]
    for name,arch,lt,sp in setups:
        torch.manual_seed(0)
        cb = SparsifyCallback(sp, 'weight', 'local', 'large_final', agp.with_pcts(0., 0.75), layer_type=lt)
        learn = Learner(digits_dls(), arch(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2 if a.quick else 8, 1e-2)
        m = learn.model.eval()
        x32 = xv[:32]
        mix,rep = to_sparse_inference(m, x32, forms=['csr', 'int8'], num_threads=a.threads, n=10)
        all8,_ = to_sparse_inference(m, x32, forms='int8', min_speedup=1e-9, num_threads=a.threads, n=2)
        with tempfile.TemporaryDirectory() as d:
            info = save_compressed(m, Path(d)/'m.fsz', bits=8)
            m8 = load_compressed(Path(d)/'m.fsz', copy.deepcopy(m))
        fp = digits_acc(m, xv, yv)
        rows.append(dict(model=name, sparsity=f"{sp:.0%}", fp32=fp, chosen_mix=digits_acc(mix, xv, yv),
                         forms='/'.join(rep.form), every_linear_int8=digits_acc(all8, xv, yv),
                         int8_file=digits_acc(m8, xv, yv), int8_file_pct=f"{1/info['ratio']:.1%}"))
    df = pd.DataFrame(rows)
    for c in ('chosen_mix', 'every_linear_int8', 'int8_file'): df[f"{c}_drop"] = df.fp32 - df[c]
    print(f"validation set: {len(yv)} images; accuracy as a fraction (one image = {1/len(yv):.4f})")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nint8_file: weights of 2+ dims (Conv2d too) quantized per output channel by save_compressed(bits=8), "
          "loaded back in fp32; int8_file_pct: its size against torch.save")

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--quick', action='store_true'); p.add_argument('--threads', type=int, default=1)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--only', default='kernels,mlp,digits', help='comma-separated sections to run')
    a = p.parse_args()
    if a.quick: a.repeats = 5
    print(f"# fastsparse deploy benchmark\n\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), {a.threads} threads, "
          f"{a.repeats} timed runs{' (quick)' if a.quick else ''}")
    torch.set_num_threads(a.threads)  # training in section 4 too
    machine_load("start")
    t0 = time.time()
    for k,f in (('kernels', bench_kernels), ('mlp', bench_mlp), ('digits', bench_digits)):
        if k in a.only.split(','): f(a)
    print()
    machine_load(f"end ({time.time() - t0:.0f} s)")

if __name__ == '__main__': main()
