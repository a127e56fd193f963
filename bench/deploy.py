"""Benchmark of sparse + int8 deployment on the CPU: which form is fastest and smallest, layer by layer?

1. One 4096x4096 Linear layer at 70% and 90% sparsity, batch 1 and 32: dense fp32, CSR, `Int8Linear` with each of
   its kernels, and the int8 alternatives that are not used (torchao if installed, QNNPACK's block-sparse int8).
2. An MLP 2048-4096-4096-1000 (every layer masked) at 70% and 90%, batch 1 and 32: dense fp32, CSR only, int8 only
   (every layer forced to that form) and the mix `to_sparse_inference(..., forms=['csr', 'int8'])` chooses (each
   layer's fastest form, unless the model in one of those forms alone runs faster whole).
3. File sizes of that MLP: `torch.save(state_dict)`, `save_compressed` (bit-exact) and `save_compressed(bits=8)`.
4. scikit-learn's digits, trained sparse with `SparsifyCallback`: validation accuracy of the fp32 model, of the
   deployed model (the chosen mix, and every Linear in int8), and of the model loaded from its int8 file.

Timings are medians of rounds in which every form runs once, in an order shuffled every round (seeded), on torch's
default number of CPU threads (`--threads` pins another); a model that is the same computation as another (the mix
when it chose one form for every layer) is reported as identical to it, not timed again. The script prints the
machine's load and the other processes using the CPU when it starts and ends, since they share its cores.

    python bench/deploy.py                   # writes bench/results/deploy.md and deploy.png
    python bench/deploy.py --quick --out /tmp/d   # a smoke run: small sizes, few repeats
"""
import argparse, copy, os, platform, statistics, subprocess, tempfile, time, warnings
from pathlib import Path
import torch, torch.nn as nn
import pandas as pd
from fastsparse.sparsifier import Sparsifier
from fastsparse.export import (to_sparse_inference, time_inference, save_compressed, load_compressed, size_report,
                               SparseLinear, Int8Linear, quantize_int8, time_calls)
from fastsparse.export.timing import max_rel_error
from common import parser, start

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
    d = 256 if a.quick else 4096
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
            old_e = torch.backends.quantized.engine
            try:
                # QNNPACK's sparse op runs under its own engine; the others do not read the setting
                if qn is not None: torch.backends.quantized.engine = 'qnnpack'
                ts = time_calls(fns, n=a.repeats, warmup=3)
            finally: torch.backends.quantized.engine = old_e
            with torch.inference_mode():
                ref = lin(x)
                errs = {k:max_rel_error(m(x), ref) for k,m in cands.items()}
            med = {k:statistics.median(v) for k,v in ts.items()}
            for k,v in med.items():
                rows.append(dict(sparsity=f"{sp:.0%}", batch=bs, kernel=k, ms=v, speedup=med['dense fp32']/v,
                                 error=errs.get(k, 0. if k == 'dense fp32' else float('nan'))))
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    a.kernels = df
    print("\nerror: max |output - dense output| / max |dense output| on that input (CSR is exact up to rounding)")

def mlp(sp, widths=(2048, 4096, 4096, 1000)):
    torch.manual_seed(0)
    layers = []
    for ni,no in zip(widths[:-1], widths[1:]): layers += [nn.Linear(ni, no), nn.ReLU()]
    m = nn.Sequential(*layers[:-1]).eval()
    Sparsifier(m, 'weight', layer_type=nn.Linear).sparsify_model(sp)
    return m

def bench_mlp(a):
    widths = (256, 512, 512, 128) if a.quick else (2048, 4096, 4096, 1000)
    section(f"2. MLP {'-'.join(map(str, widths))}, every layer masked: dense, CSR only, int8 only, the chosen mix (CPU)")
    summary,sizes = [],[]
    for sp in (0.7, 0.9):
        masked = mlp(sp, widths)
        for bs in (1, 32):
            x = torch.randn(bs, widths[0])
            kw = dict(n=max(5, a.repeats//3))
            csr,_ = to_sparse_inference(masked, x, forms='csr', min_speedup=1e-9, min_sparsity=0, **kw)
            i8,_ = to_sparse_inference(masked, x, forms='int8', min_speedup=1e-9, **kw)
            mix,rep = to_sparse_inference(masked, x, forms=['csr', 'int8'], **kw)
            print(f"\n{sp:.0%} sparse, batch {bs}: the mix, per layer")
            print(rep.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
            if rep.attrs.get('whole_model'):
                print("the whole model, as to_sparse_inference timed it (median ms): "
                      + ', '.join(f"{k} {v:.3g}" for k,v in rep.attrs['whole_model'].items()))
            df = time_inference({'dense fp32': masked, 'CSR only': csr, 'int8 only': i8, 'chosen mix': mix}, x,
                                n=a.repeats, warmup=3)
            with torch.inference_mode():
                ref = masked(x)
                err = {k:max_rel_error(m(x), ref) for k,m in (('dense fp32', masked), ('CSR only', csr), ('int8 only', i8),
                                                              ('chosen mix', mix))}
            df['error'] = df.model.map(err)
            print(f"\n{sp:.0%} sparse, batch {bs}: whole model ({a.repeats} rounds in shuffled order, median and interquartile range)")
            print(df[['model', 'ms', 'iqr', 'speedup', 'ms_min', 'error', 'note']].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
            s = df.set_index('model').speedup
            same = df.attrs['identical'].get('chosen mix')
            best = max(s['CSR only'], s['int8 only'])
            summary.append({'sparsity': f"{sp:.0%}", 'batch': bs, 'CSR only': s['CSR only'], 'int8 only': s['int8 only'],
                            'chosen mix': s['chosen mix'], 'mix forms': '/'.join(rep.form),
                            'mix vs best single form': f"identical to {same}" if same else f"{s['chosen mix']/best:.3f}x"})
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
    print("\nsummary: speed-ups over dense fp32 (whole model, medians); the mix against the best single form, or the form it is "
          "identical to when it chose that form for every layer (then it was not timed again)")
    print(pd.DataFrame(summary).to_string(index=False, float_format=f2))
    a.mlp = pd.DataFrame(summary)
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
    for name,arch,lt,sp in setups[:1] if a.quick else setups:
        torch.manual_seed(0)
        cb = SparsifyCallback(sp, 'weight', 'local', 'large_final', agp.with_pcts(0., 0.75), layer_type=lt)
        learn = Learner(digits_dls(), arch(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1 if a.quick else 8, 1e-2)
        m = learn.model.eval()
        x32 = xv[:32]
        mix,rep = to_sparse_inference(m, x32, forms=['csr', 'int8'], n=10)
        all8,_ = to_sparse_inference(m, x32, forms='int8', min_speedup=1e-9, n=2)
        with tempfile.TemporaryDirectory() as d:
            info = save_compressed(m, Path(d)/'m.fsz', bits=8)
            m8 = load_compressed(Path(d)/'m.fsz', copy.deepcopy(m))
        fp = digits_acc(m, xv, yv)
        rows.append(dict(model=name, sparsity=f"{sp:.0%}", fp32=fp, chosen_mix=digits_acc(mix, xv, yv),
                         forms='/'.join(rep.form), every_linear_int8=digits_acc(all8, xv, yv),
                         int8_file=digits_acc(m8, xv, yv), int8_file_pct=f"{1/info['ratio']:.1%}"))
    df = pd.DataFrame(rows)
    for c in ('chosen_mix', 'every_linear_int8', 'int8_file'): df[f"{c}_drop"] = df.fp32 - df[c]
    a.digits = df
    print(f"validation set: {len(yv)} images; accuracy as a fraction (one image = {1/len(yv):.4f})")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nint8_file: weights of 2+ dims (Conv2d too) quantized per output channel by save_compressed(bits=8), "
          "loaded back in fp32; int8_file_pct: its size against torch.save")

INTRO = """`bench/deploy.py` asks which form makes a sparse model fastest and smallest on a CPU. Section 1 times one
4096x4096 `Linear` layer at 70% and 90% unstructured sparsity in every form there is a kernel for: dense fp32, CSR
(`SparseLinear`), `Int8Linear` with its two kernels (FBGEMM's packed int8 GEMM and `torch._int_mm`), and two int8
kernels that fastsparse does not use -- QNNPACK's block-sparse int8 `torch.ops.sparse.qlinear_dynamic`, and torchao's
`Int8DynamicActivationInt8WeightConfig` when torchao is installed. Section 2 converts an MLP 2048-4096-4096-1000 with
every layer masked to CSR only, to int8 only (every layer forced to that form) and to the mix
`to_sparse_inference(model, x, forms=['csr', 'int8'])` chooses (each layer's fastest form; when that mixes forms, it
times the whole model as the mix and in each form alone, and keeps the fastest), and times the four models at batch 1
and 32, every model once per round in a shuffled order; when the mix chose one form for every layer it *is* that
model, and it is reported as identical to it. Section 3 saves that MLP; section 4 trains scikit-learn's digits sparse
with `SparsifyCallback` and checks the accuracy of the deployed models. The [deployment tutorial](tutorial_deploy.md)
shows the API. The table: speed-ups of the whole MLP over dense fp32 (medians)."""

def plot(mlp):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3), layout='constrained')
    labels = [f"{r.sparsity}, batch {r.batch}" for r in mlp.itertuples()]
    w = 0.27
    for i, (col, c) in enumerate((('CSR only', 'tab:blue'), ('int8 only', 'tab:orange'), ('chosen mix', 'tab:green'))):
        ax.bar([j + (i - 1)*w for j in range(len(mlp))], mlp[col], w, label=col, color=c)
    ax.axhline(1, color='k', lw=0.8); ax.set_xticks(range(len(mlp)), labels, fontsize=8)
    ax.set_ylabel('speed-up over dense fp32', fontsize=8); ax.set_title('MLP 2048-4096-4096-1000, every layer masked', fontsize=9)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1), frameon=False)
    return fig

def reading(a):
    parts = []
    if getattr(a, 'kernels', None) is not None:
        k = a.kernels.set_index(['sparsity', 'batch', 'kernel']).speedup
        def rng(name): v = [k[i] for i in k.index if i[2] == name]; return f"{min(v):.2f}-{max(v):.2f}x"
        parts.append(f"- **One layer** (section 1): FBGEMM's int8 kernel runs the layer {rng('int8 fbgemm')} as fast as dense "
                     f"fp32, CSR {rng('csr')}, `torch._int_mm` {rng('int8 int_mm')}"
                     + (f", QNNPACK's sparse int8 {rng('qnnpack sparse int8')}" if any(i[2] == 'qnnpack sparse int8' for i in k.index) else '')
                     + (f", torchao's int8 {rng('torchao int8 dynamic')}" if any(i[2] == 'torchao int8 dynamic' for i in k.index) else '')
                     + " (ranges over sparsity and batch). CSR has no int8 kernel.")
    if getattr(a, 'mlp', None) is not None:
        m = a.mlp
        ident = m[m['mix vs best single form'].str.startswith('identical')]
        timed = m[~m['mix vs best single form'].str.startswith('identical')]
        s = f"- **The mix** (section 2) chose one form for every layer in {len(ident)} of {len(m)} cells, where it is the same model as that form"
        if len(timed):
            r = [float(v[:-1]) for v in timed['mix vs best single form']]
            span = f"{r[0]:.3f}x" if len(r) == 1 else f"{min(r):.3f}-{max(r):.3f}x"
            s += (f"; in the other {len(timed)} it mixes forms and runs at {span} the speed of the best single form "
                  + ("(level with it: within 2%)" if all(abs(v - 1) <= 0.02 for v in r) else
                     "(ahead)" if min(r) > 1 else
                     "(behind: to_sparse_inference times the mix whole against each of its forms where it paid, not against every "
                     "layer forced to one form, as here; compare the single forms' speed-ups before deploying a mix)" if max(r) < 1 else
                     "(within the run's noise either way)"))
        parts.append(s + ".")
    if getattr(a, 'digits', None) is not None:
        d = a.digits
        parts.append(f"- **Accuracy** (section 4): the deployed mix loses at most {d.chosen_mix_drop.max():.4f} of the fp32 "
                     f"accuracy, every Linear in int8 at most {d.every_linear_int8_drop.max():.4f}, the int8 file at most "
                     f"{d.int8_file_drop.max():.4f} (one validation image is {1/359:.4f}).")
    return "How to read it:\n\n" + '\n'.join(parts)

def main():
    p = parser(__doc__)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--only', default='kernels,mlp,digits', help='comma-separated sections to run')
    a = p.parse_args()
    run = start('deploy', a)
    if a.quick: a.repeats = 5
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {a.repeats} timed rounds{' (quick)' if a.quick else ''}")
    machine_load("start")
    t0 = time.time()
    for k,f in (('kernels', bench_kernels), ('mlp', bench_mlp), ('digits', bench_digits)):
        if k in a.only.split(','): f(a)
    print()
    machine_load(f"end ({time.time() - t0:.0f} s)")
    mlp = getattr(a, 'mlp', None)
    run.write(title="Deployment on the CPU: sparse, int8, and the mix chosen per layer", intro=INTRO,
              summary=mlp, fig=plot(mlp) if mlp is not None else None, reading=reading(a))

if __name__ == '__main__': main()
