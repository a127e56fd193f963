"""Sparse training and inference on a CUDA GPU: what the callback costs per batch, one mask update against `torch.kthvalue`,
and which sparse inference form pays.

1. Training. torchvision's ResNet-50 (random init) on random 224x224 images and labels already on the GPU, batch 128, fastai's
   Adam, in bf16 (`learn.to_bf16()`) and fp16 (`learn.to_fp16()`), its conv layers pruned with magnitude (`large_final`),
   unstructured, to 80%. Every variant trains in fits of its own, on a fresh copy of the same model, in a shuffled order each
   round (seeded; the order is printed):
   - steady masks: the model pruned to 80% beforehand (local or global), the callback's schedule settled from its first
     batch (no mask update in the fit, which the output shows), so every batch pays the upkeep only: fastsparse local and
     global, and fasterai's callback (local) the same way;
   - updating: from dense to 80% along AGP over the whole fit, the masks updated every batch (`update_every=1`), or every
     100 batches (a fit of 100 batches, whose last is its update), local and global; fasterai's callback (local), which
     updates at every batch.
   Per training batch after the first `--warmup` of each fit: the whole batch's wall time (the GPU synchronised at the end
   of every batch); the callback's own time on the host (inside its batch events, fastai's dispatch to it included, as
   bench/overhead.py measures it) and on the GPU (CUDA events around the same events: the kernels it queues). `own` is the
   larger of the two, over the dense batch's median. Steady variants report medians over their batches (and quartiles),
   updating ones the mean over the fit (the updates are spikes that a median would hide).
2. One mask update. `Linear` weights on the GPU (25M: 12 x 1448x1448; 400M: 24 x 4096x4096), magnitude scores,
   unstructured, local and global: `Sparsifier.sparsify_model` (score, select, apply) to 50% and to 90%, each from a floor
   0.05 points below (as AGP's next update finds it), against `torch.kthvalue` over the very scores it selects from on the
   GPU (per tensor, summed, in local context; over all scores concatenated in global context); medians of `--repeats`
   (one fewer from 100M weights on).
   Every update is checked to zero exactly round(s*n) weights. `extra B/w` is the peak GPU memory an update allocates beyond
   what was allocated before it, per weight.
3. Sparse inference. A 2:4-pruned `Linear` layer (4096 -> 4096, and 4096 -> 11008) in fp16 and bf16 at batch 1, 16, 256 and
   2048: dense, 2:4 `semi_structured` and CSR timed interleaved (`time_calls`); then the form `to_sparse_inference` chooses
   by its own measurement (a form that is not `min_speedup` = 1.1x faster than dense leaves the layer dense, and its note
   says so). Last, ResNet-50 with half the filters of its block-internal convs removed (`shrink`) against dense, in bf16 and
   fp16, at batch 1 and 128.

    python bench/gpu.py                                       # everything, within --budget seconds (240 by default)
    python bench/gpu.py --write-result bench/results/gpu.md   # ... and write the Benchmarks page's section from this run
    python bench/gpu.py --quick --device cpu                  # a smoke run on the CPU: tiny sizes, seconds
"""
import argparse, contextlib, copy, datetime, io, os, platform, random, statistics, subprocess, sys, time, traceback, warnings
from pathlib import Path
import torch, torch.nn as nn
from common import stamp

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')
warnings.filterwarnings('ignore', category=FutureWarning)  # (torch.jit's deprecation, on importing fasterai)

class Tee(io.TextIOBase):
    "Write to the terminal and keep a copy (the verbatim output of the result file)"
    def __init__(self, out): self.out, self.buf = out, io.StringIO()
    def write(self, s): self.out.write(s); self.buf.write(s); return len(s)
    def flush(self): self.out.flush()

def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)

def med_q(xs):
    "Median and quartiles"
    if len(xs) < 2: return (xs[0],) * 3 if xs else (float('nan'),) * 3
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[0], q[2]

class Budget:
    "Deadlines for the sections, as fractions of `--budget` seconds: a part that would start after its section's deadline is skipped, and the output says so"
    def __init__(self, seconds): self.t0, self.s = time.perf_counter(), seconds
    def left(self, frac): return self.t0 + frac * self.s - time.perf_counter()
    def elapsed(self): return time.perf_counter() - self.t0

# ---------------------------------------------------------------- 1. training
_BATCH_EVENTS = set("before_batch after_pred after_loss before_backward after_backward before_step after_step "
                    "after_cancel_step after_batch".split())

class Batches:
    "A loader of `n` batches: the same random images and labels, already on the device (no data loading in the timings)"
    def __init__(self, x, y, n): self.x, self.y, self.n, self.device = x, y, n, x.device
    def __len__(self): return self.n
    def __iter__(self): return ((self.x, self.y) for _ in range(self.n))
    def to(self, device): return self

class Rec:
    "The records of one fit: per training batch after the warm-up, the wall time, the callback's host and GPU time"
    def __init__(self, dev, warmup, count=None):  # count: the callback's number of mask updates so far (None: not known)
        self.dev, self.warmup, self.count, self.rows, self.i, self.on, self.skipped = dev, warmup, count, [], 0, False, 0

def _callbacks(rec):
    from fastai.basics import Callback
    class BatchStart(Callback):
        "First at every event: start a batch's clock (the GPU is idle: the last batch ended synchronised)"
        order, can_move_zeros = -1000, False
        def before_batch(self):
            rec.on = self.training and rec.i >= rec.warmup
            rec.host, rec.events, rec.h0 = 0., [], rec.count() if rec.count else None
            rec.t0 = time.perf_counter()
        def after_cancel_step(self): rec.skipped += 1
    class BatchEnd(Callback):
        "Last at every event: synchronise, stop the batch's clock"
        order = 10_000
        def after_batch(self):
            if not self.training: return
            sync(rec.dev)
            if rec.on:
                gpu = sum(e0.elapsed_time(e1) for e0, e1 in rec.events) / 1e3 if rec.dev.type == 'cuda' else rec.host
                rec.rows.append(dict(batch=time.perf_counter() - rec.t0, host=rec.host, gpu=gpu,
                                     updates=rec.count() - rec.h0 if rec.count else None))
            rec.i += 1; rec.on = False
    return [BatchStart(), BatchEnd()]

def time_events(cb, rec):
    "Let `cb` add the time of its batch events to `rec` (host clock, and CUDA events around them on a GPU)"
    cls = type(cb)
    def __call__(self, event_name):
        if not (rec.on and event_name in _BATCH_EVENTS): return cls.__call__(self, event_name)
        cuda = rec.dev.type == 'cuda'
        if cuda: e0 = torch.cuda.Event(enable_timing=True); e0.record()
        t = time.perf_counter()
        try: return cls.__call__(self, event_name)
        finally:
            rec.host += time.perf_counter() - t
            if cuda: e1 = torch.cuda.Event(enable_timing=True); e1.record(); rec.events.append((e0, e1))
    object.__setattr__(cb, '__class__', type(cls.__name__, (cls,), {'__call__': __call__}))

def _fasterai():
    "fasterai's SparsifyCallback and what it takes, or None where it is not installed"
    try:
        import fasterai
        from fasterai.sparse.sparsify_callback import SparsifyCallback as FSparsifyCallback
        from fasterai.core.criteria import large_final as f_large_final
        from fasterai.core.schedule import Schedule as FSchedule, sched_agp as f_sched_agp
    except Exception as e: return None, f"{type(e).__name__}: {e}"
    return (FSparsifyCallback, f_large_final, FSchedule, f_sched_agp), getattr(fasterai, '__version__', '?')

def make_cb(variant, a, fai):
    "The callback of a training variant ('dense' none), and whether it starts from the pruned model"
    from fastsparse.callback import SparsifyCallback
    from fastsparse.schedule import agp
    lib, ctx, mode = variant
    if lib == 'dense': return None
    if lib == 'fastsparse':
        if mode == 'steady': return SparsifyCallback(a.sparsity, 'weight', ctx, 'large_final', agp.with_pcts(0., 0.01), layer_type=nn.Conv2d)
        return SparsifyCallback(a.sparsity, 'weight', ctx, 'large_final', agp, layer_type=nn.Conv2d, update_every=mode)
    FSparsifyCallback, f_large_final, FSchedule, f_sched_agp = fai
    end = 0.01 if mode == 'steady' else 1.
    return FSparsifyCallback(a.sparsity, 'weight', ctx, f_large_final, FSchedule(f_sched_agp, start_pct=0., end_pct=end), layer_type=nn.Conv2d)

def vname(v):
    lib, ctx, mode = v
    if lib == 'dense': return 'dense'
    when = 'steady masks' if mode == 'steady' else ('AGP, update every batch' if mode in (1, 'every') else f'AGP, update every {mode} batches')
    return f"{lib} {ctx}, {when}"

def train_fit(v, models, x, y, n_batches, a, prec, fai):
    "One fit of variant `v`: its records, the number of mask updates (fastsparse) and of skipped steps"
    from fastai.basics import Learner, DataLoaders, CrossEntropyLossFlat
    dev = x.device
    lib, ctx, mode = v
    model = copy.deepcopy(models[ctx if mode == 'steady' and lib != 'dense' else 'dense'])
    cb = make_cb(v, a, fai)
    rec = Rec(dev, a.warmup, (lambda: len(cb.history)) if lib == 'fastsparse' else None)
    cbs = _callbacks(rec)
    if cb is not None: time_events(cb, rec); cbs.append(cb)
    dls = DataLoaders(Batches(x, y, n_batches), Batches(x[:8], y[:8], 1))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=cbs)
    if prec == 'bf16': learn.to_bf16()
    elif prec == 'fp16': learn.to_fp16()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # fasterai prints; ours warn when skipped steps cut the schedule short
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-3)
    rec.rezero = cb.rezero_after_step() if lib == 'fastsparse' else None   # whether its weights were re-zeroed after each step
    del learn, model, dls
    return rec

def bench_training(a, dev, budget, res):
    print("\n## 1. Training: the callback's cost per batch\n")
    from fastai.basics import defaults
    from fastai.callback.progress import ProgressCallback
    import fastai.callback.fp16  # noqa: F401 (Learner.to_fp16 / to_bf16)
    from fastsparse.sparsifier import Sparsifier
    defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]
    fai, fai_note = _fasterai()
    print(f"fasterai: {fai_note if fai is None else 'version ' + fai_note}{'' if fai else ' (not installed: skipped)'}")
    torch.manual_seed(0)
    if a.quick:
        from fastsparse.demo import small_resnet
        base, side, name = small_resnet((8, 16), 1, in_channels=3, n_out=10), 16, 'small_resnet((8, 16)) at 16x16'
    else:
        import torchvision
        base, side, name = torchvision.models.resnet50(), 224, 'torchvision resnet50 (random init) at 224x224'
    base = base.to(dev)
    with torch.no_grad(): n_out = base.eval()(torch.zeros(1, 3, side, side, device=dev)).shape[1]
    base.train()
    models = {'dense': base}
    for ctx in ('local', 'global'):
        models[ctx] = copy.deepcopy(base)
        Sparsifier(models[ctx], 'weight', ctx, 'large_final', layer_type=nn.Conv2d).sparsify_model(a.sparsity)
    n_conv = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(a.bs, 3, side, side, device=dev)
    y = torch.randint(0, n_out, (a.bs,), device=dev)
    steady = [('dense', None, 'steady'), ('fastsparse', 'local', 'steady'), ('fastsparse', 'global', 'steady')]
    steady += [('fasterai', 'local', 'steady')] if fai else []
    updating = [('fastsparse', c, u) for c in ('local', 'global') for u in (1, a.every)]
    updating += [('fasterai', 'local', 'every')] if fai else []
    res['setup'] = dict(model=name)
    print(f"{name}, {n_conv:,} conv weights pruned to {a.sparsity:.0%} (magnitude, unstructured); batch {a.bs}, fastai Adam lr 1e-3; "
          f"{a.warmup} warm-up batches per fit not timed")
    print(f"steady: {a.rounds} rounds of one {a.steady_batches}-batch fit per variant; updating: {a.update_rounds} round(s) of one fit "
          f"per variant, of {a.update_batches} batches when it updates every batch, and of {a.every} batches in all when every {a.every} "
          f"(its one update at the last batch); order shuffled each round with random.Random({a.seed}); `updates`: mask updates "
          f"in the timed batches")
    rng = random.Random(a.seed)
    for prec in a.precisions:
        recs = {v: [] for v in steady + updating}
        skipped = {}
        for what, vs, rounds, n in (('steady', steady, a.rounds, a.steady_batches), ('updating', updating, a.update_rounds, a.update_batches)):
            for r in range(rounds):
                order = rng.sample(vs, len(vs))
                print(f"{prec} {what} round {r + 1}: " + ' | '.join(vname(v) for v in order), flush=True)
                for v in order:
                    if budget.left(a.train_share) < 0:
                        print(f"  skipped (over --budget): {vname(v)}"); continue
                    # updating every `every` batches: a fit of `every` batches, whose last step is its one update
                    try: rec = train_fit(v, models, x, y, a.every if what == 'updating' and v[2] == a.every else a.warmup + n, a, prec, fai)
                    except Exception as e:   # the other variants still run; the run's exit code says it failed
                        res['errors'].append(f"{prec} {vname(v)}: {type(e).__name__}: {e}")
                        print(f"  FAILED {vname(v)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"); continue
                    recs[v].append(rec); skipped[v] = skipped.get(v, 0) + rec.skipped
        rows = {v: [row for rec in recs[v] for row in rec.rows] for v in recs}
        if not rows[steady[0]]: print(f"{prec}: no dense batch timed"); continue
        dense = med_q([r['batch'] for r in rows[steady[0]]])
        print(f"\n{prec}, batch {a.bs}: dense batch {dense[0]*1e3:.2f} ms (median; quartiles {dense[1]*1e3:.2f}-{dense[2]*1e3:.2f})")
        print(f"{'variant':<52} {'batches':>7} {'batch ms':>9} {'q1-q3':>15} {'/dense':>7} {'cb host ms':>10} {'cb GPU ms':>10} {'own':>7} {'updates':>7} {'skipped':>7}")
        out = {}
        for v in steady + updating:
            rs = rows[v]
            if not rs: continue
            agg = (lambda xs: med_q(xs)[0]) if v in steady else statistics.mean
            b, h, g = agg([r['batch'] for r in rs]), agg([r['host'] for r in rs]), agg([r['gpu'] for r in rs])
            _, q1, q3 = med_q([r['batch'] for r in rs])
            own = max(h, g) / dense[0] if v[0] != 'dense' else 0.
            u = None if rs[0]['updates'] is None else sum(r['updates'] for r in rs)
            us = '-' if u is None else str(u)
            print(f"{vname(v):<52} {len(rs):>7} {b*1e3:>9.2f} {f'{q1*1e3:.2f}-{q3*1e3:.2f}':>15} {b/dense[0]:>7.3f} {h*1e3:>10.3f} {g*1e3:>10.3f} {100*own:>6.2f}% {us:>7} {skipped[v]:>7}")
            out[v] = dict(batch=b, host=h, gpu=g, own=own, updates=u)
        rz = {r.rezero for v in recs for r in recs[v] if r.rezero is not None}
        print("(steady rows: medians over their batches; updating rows: means over the fit's timed batches; q1-q3: quartiles of "
              "the batch times; `own`: the larger of "
              "the callback's host and GPU time over the dense batch's median; fastsparse re-zeroed the weights after each step: "
              f"{'yes' if rz == {True} else 'no' if rz == {False} else 'in some fits'})")
        res['training'][prec] = dict(dense=dense[0], rows=out)

# ---------------------------------------------------------------- 2. one mask update
SIZES = {'100k': (2, 224), '1m': (4, 512), '25m': (12, 1448), '400m': (24, 4096)}  # layers, side of each square Linear

def _kth_time(sp, s, context, dev):
    "Seconds of `torch.kthvalue` over the scores the update to sparsity `s` selects from (scores computed beforehand, not timed)"
    scores = [sp.layer_scores(n)[0]() for n in sp.layers]
    if context == 'global':
        flat = torch.cat(scores); del scores
        sync(dev); t = time.perf_counter(); torch.kthvalue(flat, max(1, round(s * flat.numel()))); sync(dev)
        return time.perf_counter() - t
    sync(dev); t = time.perf_counter()
    for x in scores: torch.kthvalue(x, max(1, round(s * x.numel())))
    sync(dev)
    return time.perf_counter() - t

def bench_updates(a, dev, budget, res):
    print("\n## 2. One mask update against torch.kthvalue over the same scores\n")
    from fastsparse.sparsifier import Sparsifier
    cuda = dev.type == 'cuda'
    print(f"magnitude, unstructured, updates to {', '.join(f'{s:.0%}' for s in a.levels)}, each from a floor 0.05 points below; "
          f"median of {a.repeats} per level ({max(1, a.repeats - 1)} from 100M weights on); `extra B/w`: peak memory an update allocates over what was allocated before it, per weight")
    print(f"{'weights':>13} {'layers':>6} {'context':>7} {'level':>5} {'update ms':>10} {'kthvalue ms':>12} {'ratio':>6} {'extra B/w':>9} {'exact':>5}")
    for size in a.sizes:
        n_layers, side = SIZES[size]
        repeats = a.repeats if n_layers * side * side < 100e6 else max(1, a.repeats - 1)   # (fewer at 400M: kthvalue takes long there)
        for context in ('global', 'local'):
            if budget.left(a.update_share) < 0: print(f"{size} {context}: skipped (over --budget)"); continue
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(side, side, bias=False, device=dev) for _ in range(n_layers)])
            sp = Sparsifier(model, 'weight', context, 'large_final', layer_type=nn.Linear)
            n = sum(m.weight.numel() for m in sp.layers.values())
            for s in a.levels:
                u, q, extra, ok = [], [], [], True
                for _ in range(repeats):
                    sp.sparsify_model(s - 0.0005)  # the floor: the weights the update before masked (untimed)
                    q.append(_kth_time(sp, s, context, dev))
                    if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev); before = torch.cuda.memory_allocated(dev)
                    sync(dev); t = time.perf_counter(); sp.sparsify_model(s); sync(dev); u.append(time.perf_counter() - t)
                    if cuda: extra.append((torch.cuda.max_memory_allocated(dev) - before) / n)
                    want = round(s * n) if context == 'global' else sum(round(s * m.weight.numel()) for m in sp.layers.values())
                    ok &= sum(int((m.weight == 0).sum()) for m in sp.layers.values()) == want
                mu, mk = statistics.median(u), statistics.median(q)
                xs = f"{max(extra):.2f}" if extra else 'n/a'
                print(f"{n:>13,} {n_layers:>6} {context:>7} {s:>5.0%} {mu*1e3:>10.2f} {mk*1e3:>12.2f} {mu/mk:>6.2f} {xs:>9} {'yes' if ok else 'NO':>5}", flush=True)
                res['updates'].append(dict(size=size, n=n, context=context, level=s, update=mu, kth=mk, ratio=mu / mk,
                                           extra=max(extra) if extra else None, exact=ok))
            del sp, model
            if cuda: torch.cuda.empty_cache()

# ---------------------------------------------------------------- 3. sparse inference
def _macs(m, x):
    "Multiply-accumulates of the Conv2d and Linear layers of `m` on `x`"
    tot = [0]
    def hook(mod, i, o): tot[0] += o.numel() * (mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features)
    hs = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad(): m(x)
    for h in hs: h.remove()
    return tot[0]

def bench_inference(a, dev, budget, res):
    print("\n## 3. Sparse inference: 2:4 and CSR Linear layers, and a shrunk ResNet-50\n")
    from fastsparse.sparsifier import Sparsifier
    from fastsparse.export import SparseLinear, to_sparse_inference, time_inference, shrink, shrinkable_layers, time_calls
    cuda = dev.type == 'cuda'
    forms = ['semi_structured', 'csr'] if cuda else ['csr']
    print(f"Linear layers 2:4-pruned (Sparsifier(nm=True), 50%); {a.inf_repeats} interleaved calls each (median ms); "
          f"`chosen`: the form to_sparse_inference(forms={forms}) measured fastest by at least 1.1x, or dense")
    print(f"{'dtype':>8} {'in->out':>11} {'batch':>5} {'dense ms':>9} {'2:4 ms':>8} {'2:4 x':>6} {'csr ms':>8} {'csr x':>6} {'chosen':>15}  note")
    for dt in a.inf_dtypes:
        for (ni, no) in a.linear_shapes:
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(ni, no)).to(dev, dt).eval()
            Sparsifier(m, 'weight', nm=True, layer_type=nn.Linear).sparsify_model(0.5)
            lin = m[0]
            sparse = {} if cuda else {'2:4': 'needs a CUDA GPU'}
            for f, key in ((('semi_structured', '2:4'),) if cuda else ()) + (('csr', 'csr'),):
                try: sparse[key] = SparseLinear(lin, f)
                except Exception as e: sparse[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
            for bs in a.inf_batches:
                if budget.left(a.inference_share) < 0: print(f"{dt} {ni}->{no} batch {bs}: skipped (over --budget)"); continue
                x = torch.randn(bs, ni, device=dev, dtype=dt)
                fns, notes = {'dense': lambda: lin(x)}, []
                with torch.inference_mode(): ref = lin(x).float()
                for key, s in sparse.items():
                    if isinstance(s, str): notes.append(f"{key}: {s}"); continue
                    try:
                        with torch.inference_mode(): err = (s(x).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
                        if not err <= 2e-2: notes.append(f"{key}: error {err:.1e}"); continue
                        fns[key] = lambda s=s: s(x)
                    except Exception as e: notes.append(f"{key}: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
                ts = time_calls(fns, n=a.inf_repeats, warmup=3, device=dev)
                md = {k: statistics.median(v) for k, v in ts.items()}
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore')
                    _, rep = to_sparse_inference(m, x, forms=forms, n=a.inf_repeats)
                chosen = rep.form.iloc[0]
                cell = lambda k: (f"{md[k]:>8.3f}", f"{md['dense']/md[k]:>6.2f}") if k in md else (f"{'-':>8}", f"{'-':>6}")
                (s24, x24), (scsr, xcsr) = cell('2:4'), cell('csr')
                print(f"{str(dt).replace('torch.', ''):>8} {f'{ni}->{no}':>11} {bs:>5} {md['dense']:>9.3f} {s24} {x24} {scsr} {xcsr} {chosen:>15}  "
                      f"{'; '.join(notes + [rep.note.iloc[0]])}", flush=True)
                res['inference'].append(dict(dtype=str(dt).replace('torch.', ''), shape=f"{ni}->{no}", batch=bs, dense=md['dense'],
                                             semi=md.get('2:4'), csr=md.get('csr'), chosen=chosen))
    if budget.left(a.inference_share) < 0: print("shrunk ResNet-50: skipped (over --budget)"); return
    torch.manual_seed(0)
    if a.quick:
        from fastsparse.demo import small_resnet
        dense, side, name = small_resnet((8, 16), 1, in_channels=3, n_out=10), 16, 'small_resnet((8, 16)) at 16x16'
    else:
        import torchvision
        dense, side, name = torchvision.models.resnet50(), 224, 'torchvision resnet50 at 224x224'
    for bn in dense.modules():  # BatchNorm statistics as after training
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad(): bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(.5, 2); bn.bias.uniform_(-.5, .5)
    dense.eval()
    x1 = torch.randn(1, 3, side, side)
    layers = shrinkable_layers(dense, x1)
    masked = copy.deepcopy(dense)
    Sparsifier(masked, 'filter', include=layers).sparsify_model(0.5)
    t = time.perf_counter(); small = shrink(masked, x1); t_shrink = time.perf_counter() - t
    P = lambda m: sum(p.numel() for p in m.parameters())
    print(f"\n{name}: Sparsifier(model, 'filter', include=shrinkable_layers(...)) at 50% on {len(layers)} convs, shrink: {t_shrink:.1f} s "
          f"on the CPU; params {P(dense):,} -> {P(small):,}; multiply-adds per image {_macs(dense, x1)/1e6:,.1f} M -> {_macs(small, x1)/1e6:,.1f} M")
    print(f"{'dtype':>8} {'batch':>5} {'dense ms':>9} {'shrunk ms':>10} {'speed-up':>8}")
    for dt in a.inf_dtypes:
        d, s = copy.deepcopy(dense).to(dev, dt), copy.deepcopy(small).to(dev, dt)
        for bs in (1, a.bs):
            if budget.left(a.inference_share) < 0: print(f"{dt} batch {bs}: skipped (over --budget)"); continue
            x = torch.randn(bs, 3, side, side, device=dev, dtype=dt)
            df = time_inference({'dense': d, 'shrunk': s}, x, n=a.inf_repeats, warmup=3)
            print(f"{str(dt).replace('torch.', ''):>8} {bs:>5} {df.ms.iloc[0]:>9.3f} {df.ms.iloc[1]:>10.3f} {df.speedup.iloc[1]:>8.2f}", flush=True)
            res['shrink'].append(dict(dtype=str(dt).replace('torch.', ''), batch=bs, dense=df.ms.iloc[0], shrunk=df.ms.iloc[1]))

# ---------------------------------------------------------------- the result file
def _commit():
    "The commit that ran (and whether the tree had changes), from git or `FASTSPARSE_COMMIT`"
    try:
        c = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if c.returncode == 0 and c.stdout.strip():
            d = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return c.stdout.strip() + (' with uncommitted changes' if d.stdout.strip() else '')
    except (OSError, subprocess.SubprocessError): pass
    return os.environ.get('FASTSPARSE_COMMIT', 'unknown')

def device_name(dev):
    if dev.type == 'cuda':
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

def summary(res, a):
    "The headline rows: (what, measured, target)"
    rows = []
    tr = res['training'].get('bf16') or next(iter(res['training'].values()), None)
    prec = 'bf16' if 'bf16' in res['training'] else (next(iter(res['training']), '?'))
    if tr:
        st = {k: v for k, v in tr['rows'].items() if k[2] == 'steady' and k[0] != 'dense'}
        fai = [v['own'] for k, v in st.items() if k[0] == 'fasterai']
        for k, v in st.items():
            if k[0] != 'fastsparse': continue
            verdict = 'met' if v['own'] <= 0.02 and (not fai or v['own'] < fai[0]) else 'not met'
            rows.append((f"callback's own time per batch, steady masks, {k[1]} ({prec}, batch {a.bs})",
                         f"{100*v['own']:.2f}% of a dense batch ({tr['dense']*1e3:.1f} ms)" + (f"; fasterai {100*fai[0]:.2f}%" if fai else ''),
                         f"at most 2% and below fasterai: {verdict}"))
    ups = [u for u in res['updates'] if u['context'] == 'global']
    if ups:
        big = max(u['n'] for u in ups)
        worst = max((u for u in ups if u['n'] == big), key=lambda u: u['ratio'])
        ok = all(u['exact'] for u in res['updates'])
        rows.append((f"global mask update over {big:,} weights, against kthvalue over the same scores",
                     f"{worst['ratio']:.2f}x at worst ({worst['update']*1e3:.1f} vs {worst['kth']*1e3:.1f} ms at {worst['level']:.0%})"
                     + (f"; {worst['extra']:.2f} extra bytes per weight" if worst['extra'] is not None else ''),
                     f"within 2x, exact: {'met' if worst['ratio'] <= 2 and ok else 'not met'}"))
    inf = res['inference']
    if inf:
        semi = [r for r in inf if r['semi'] is not None]
        faster = [r for r in semi if r['dense'] / r['semi'] >= 1.1]
        best = max(semi, key=lambda r: r['dense'] / r['semi'], default=None)
        rows.append(("2:4 semi-structured Linear against dense",
                     (f"faster by 1.1x or more in {len(faster)} of {len(semi)} cases; best {best['dense']/best['semi']:.2f}x "
                      f"({best['dtype']}, {best['shape']}, batch {best['batch']})" if best else "not run (no CUDA GPU of compute capability 8.0 or more)")
                     + f"; layers converted to 2:4 by to_sparse_inference: {sum(r['chosen'] == 'semi_structured' for r in inf)} of {len(inf)}",
                     "measured; a layer converts only where faster"))
    return rows

def write_result(path, res, a, text, cmd, dev):
    rows = summary(res, a)
    table = '\n'.join(['| what | measured | target |', '| --- | --- | --- |'] + [f"| {w} | {m} | {t} |" for w, m, t in rows])
    md = f"""## On a GPU: training cost, mask updates and sparse inference

{_run_line()}

Measured on {device_name(dev)} with torch {torch.__version__} (CUDA {torch.version.cuda}), commit {_commit()},
{datetime.date.today().isoformat()}, by `{cmd}` (`tools/gpu_check.sh` runs it after the CUDA tests).

{table}

How to read it: section 1 trains {res.get('setup', {}).get('model', 'a model')} at batch {a.bs} with fastai in
{' and '.join(a.precisions)}; each variant runs in fits of its own, in a shuffled order each round. `cb host ms` is the
time spent inside the callback's batch events on the host, `cb GPU ms` the GPU time of the work it queues there (CUDA
events around the same events), and `own` the larger of the two over a dense batch. With steady masks a batch pays only
the upkeep (gradients masked after backward; the re-zero after the step is skipped for fastai's Adam); with AGP updating
every batch it also pays a mask update per batch, and updating every {a.every} batches one in {a.every}. Section 2 times
one update (score, exact selection, apply) against `torch.kthvalue` over the same scores -- finding one k-th value and
nothing more -- and checks that it zeros exactly round(s*n) weights. Section 3 times 2:4 and CSR `Linear` layers against
dense, and shows the form `to_sparse_inference` picks by measuring (a form that is not at least 1.1x faster leaves the
layer dense); then a ResNet whose pruned filters `shrink` removed, against the dense one.
The script's docstring defines every column.

<details markdown="1"><summary>Command and output</summary>

```text
$ {cmd}
{text.rstrip()}
```

</details>
"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(md, encoding='utf-8')

def _run_line():
    "The stamp line every result file carries"
    s = stamp()
    return (f"Run: commit `{s['commit']}`, {s['date']}, {s['cpu']}, {s['threads']} torch threads, python {s['python']}, "
            f"torch {s['torch']}, fastai {s['fastai']}; environment: {s['conditions']}.")

# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default=None, help="'cuda' (the default where there is one) or 'cpu'")
    ap.add_argument('--quick', action='store_true', help='tiny sizes and few repeats: a smoke run (on the CPU: seconds)')
    ap.add_argument('--budget', type=float, default=240., help='seconds for the whole run; a part that would start past its '
                    "section's share (training 50%%, updates 75%%, inference 100%%) is skipped, and the output says so")
    ap.add_argument('--sections', default='1,2,3', help='which sections to run')
    ap.add_argument('--bs', type=int, default=128, help='batch of the ResNet-50 (training, and the shrunk model)')
    ap.add_argument('--sparsity', type=float, default=0.8)
    ap.add_argument('--rounds', type=int, default=3, help='rounds of steady fits (one per variant each)')
    ap.add_argument('--steady-batches', type=int, default=15, help='timed batches of a steady fit')
    ap.add_argument('--update-rounds', type=int, default=1)
    ap.add_argument('--update-batches', type=int, default=30, help='timed batches of a fit that updates every batch')
    ap.add_argument('--every', type=int, default=100, help='the slower update interval of the updating fits (and their timed batches)')
    ap.add_argument('--warmup', type=int, default=3, help='untimed batches at the start of every fit')
    ap.add_argument('--sizes', default='25m,400m', help='models of section 2, among ' + ', '.join(SIZES))
    ap.add_argument('--levels', default='0.5,0.9')
    ap.add_argument('--repeats', type=int, default=3, help='updates timed per size, context and level')
    ap.add_argument('--inf-repeats', type=int, default=20, help='timed calls per form in section 3')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--write-result', default=None, help='write the Benchmarks page section (Markdown) to this file')
    a = ap.parse_args()
    cmd = 'python bench/gpu.py' + (' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else '')
    dev = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dev.type == 'cuda' and not torch.cuda.is_available(): ap.error("--device cuda: torch finds no CUDA GPU here")
    if a.quick:
        a.bs, a.rounds, a.steady_batches, a.update_batches, a.every, a.warmup = 8, 1, 3, 4, 2, 1
        a.sizes, a.repeats, a.inf_repeats = '100k', 1, 3
    a.sizes = [s for s in a.sizes.split(',') if s]
    for s in a.sizes:
        if s not in SIZES: ap.error(f"--sizes: {s!r} is not one of {list(SIZES)}")
    a.levels = [float(s) for s in a.levels.split(',')]
    sections = {s.strip() for s in a.sections.split(',')}
    a.precisions = ['bf16', 'fp16'] if dev.type == 'cuda' else ['fp32']
    a.inf_dtypes = [torch.float16, torch.bfloat16] if dev.type == 'cuda' else [torch.float32]
    a.linear_shapes = [(4096, 4096), (4096, 11008)] if not a.quick else [(256, 256)]
    a.inf_batches = [1, 16, 256, 2048] if not a.quick else [1, 16]
    a.train_share, a.update_share, a.inference_share = 0.5, 0.75, 1.0
    sys.stdout = tee = Tee(sys.stdout)
    print(f"# fastsparse on a GPU{' (--quick)' if a.quick else ''}")
    print(f"device {device_name(dev)}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if dev.type == 'cuda' else '-'}; python {platform.python_version()}; commit {_commit()}")
    budget = Budget(a.budget)
    res = {'training': {}, 'updates': [], 'inference': [], 'shrink': [], 'errors': []}
    if dev.type == 'cuda': torch.backends.cudnn.benchmark = True   # what GPU training usually runs with
    else: torch.set_num_threads(1)   # (a smoke run on a CPU that others share: threads that wait for each other only add noise)
    for s, f in (('1', bench_training), ('2', bench_updates), ('3', bench_inference)):
        if s not in sections: continue
        try: f(a, dev, budget, res)
        except Exception as e:   # the next sections still run; the run's exit code says it failed
            res['errors'].append(f"section {s}: {type(e).__name__}: {e}")
            print(f"\nFAILED section {s}: {type(e).__name__}: {e}"); traceback.print_exc(file=sys.stdout)
        if dev.type == 'cuda': torch.cuda.empty_cache()
    print(f"\ntotal {budget.elapsed():.0f} s" + (f"; {len(res['errors'])} failures:\n  " + '\n  '.join(res['errors']) if res['errors'] else ''))
    sys.stdout = tee.out
    if a.write_result:
        write_result(a.write_result, res, a, tee.buf.getvalue(), cmd, dev)
        print(f"wrote {a.write_result}")
    if res['errors']: sys.exit(1)

if __name__ == '__main__': main()
