"""Sparse training on several CPU processes with fastai's own distributed training: every rank must end with the same masks.

One `torchrun` launch starts the processes; in each, for every case, a `Learner` trains `digits_cnn(16)` on its own
shard of scikit-learn's digits inside fastai's `learn.distrib_ctx()` (accelerate's DistributedDataParallel; here over
gloo on CPU processes, with the one shim `tests/gloo_shim.py` that fastai's CPU path needs: fastai broadcasts the sample
order as a CUDA tensor), each rank initialised differently (DDP starts them all from rank 0's weights). The cases, one
of each kind of data a criterion reads:

- `magnitude, global`: `SparsifyCallback(s, 'weight', 'global', 'large_final')` (the weights alone);
- `taylor, global`: |w*g| accumulated over the steps (gradients, reduced over the ranks);
- `movement, local`: the weights' history;
- `wanda, local`: activation norms (reduced over the ranks);
- `RigL`: `DynamicSparseCallback(s, 'rigl')`, regrowth from the dense gradients.

Rank 0 prints its training history and, per rank: the training samples it drew in the first epoch (and how many no
other rank drew), the digests of its masks and weights, the sparsity of the selected layers, and the masked weights
against the exact count asked for (`round(s*n)` per layer, or `round(s*N)` over the layers in global context). The
script asserts, for every case, that the masks and weights are identical on all ranks, that the counts are exact and
that every masked weight is zero, and reports the return code of the launch (a launch that ends with an error fails
the run).

    python bench/distributed.py                         # writes bench/results/distributed.md (about half a minute on 2 cores)
    python bench/distributed.py --quick --out /tmp/q    # a smoke run: every case for one epoch (about 15 seconds)
    python bench/distributed.py --criteria taylor --context local     # one case (writes no result unless --out is given)
    python bench/distributed.py --dst set --sparsity 0.9
    torchrun --nproc_per_node 2 bench/distributed.py    # a rank started by torchrun itself (prints, writes nothing)
"""
import argparse, hashlib, json, os, subprocess, sys, tempfile, time, warnings
from pathlib import Path

def parse():
    from common import parser
    ap = parser(__doc__, quick='every case for one epoch: a smoke run of seconds')
    ap.add_argument('--nprocs', type=int, default=2)
    ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--sparsity', type=float, default=0.8)
    ap.add_argument('--criteria', default=None, help='run one case with this criterion (default: every case)')
    ap.add_argument('--context', default='global', choices=['local', 'global'], help='context of the one --criteria case')
    ap.add_argument('--granularity', default='weight')
    ap.add_argument('--schedule', default='agp')
    ap.add_argument('--dst', default=None, choices=['set', 'rigl'], help='run one case of dynamic sparse training')
    ap.add_argument('--linear', action='store_true', help='sparsify the Linear head too')
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--width', type=int, default=16)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--port', type=int, default=29533, help='rendezvous port on 127.0.0.1')
    ap.add_argument('--result', default=None, help=argparse.SUPPRESS)   # where rank 0 writes its results (set by the launcher)
    return ap.parse_args()

def cases(o):
    "[(name, kind, settings)]: the one asked for, or every case"
    if o.dst: return [(f"{o.dst.upper() if o.dst == 'set' else 'RigL'}", 'dst', dict(regrow=o.dst))]
    if o.criteria: return [(f"{o.criteria}, {o.context}", 'prune', dict(criteria=o.criteria, context=o.context))]
    return [('magnitude, global', 'prune', dict(criteria='large_final', context='global')),
            ('taylor, global', 'prune', dict(criteria='taylor', context='global')),
            ('movement, local', 'prune', dict(criteria='movement', context='local')),
            ('wanda, local', 'prune', dict(criteria='wanda', context='local')),
            ('RigL', 'dst', dict(regrow='rigl'))]

# ------------------------------------------------------------------ one rank (started by torchrun)
def weights_digest(model):
    import torch
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()): h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def train(o, name, kind, kw, seen):
    "This rank, one case: build the Learner (a different initialisation on each rank), fit inside fastai's `distrib_ctx`"
    import torch, torch.nn as nn, torch.distributed as dist
    from fastai.basics import Learner, CrossEntropyLossFlat, accuracy
    from fastsparse.demo import digits_dls, digits_cnn
    from fastsparse.callback import SparsifyCallback, DynamicSparseCallback
    from fastsparse.distributed import mask_digest, masks_agree
    rank = int(os.environ['RANK'])
    torch.manual_seed(o.seed + 100 * rank)
    lt = (nn.Conv2d, nn.Linear) if o.linear else nn.Conv2d
    if kind == 'dst': cb = DynamicSparseCallback(o.sparsity, kw['regrow'], update_every=5, layer_type=lt, seed=o.seed)
    else: cb = SparsifyCallback(o.sparsity, o.granularity, kw['context'], kw['criteria'], o.schedule, layer_type=lt, seed=o.seed)
    learn = Learner(digits_dls(bs=o.bs), digits_cnn(o.width), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb)
    seen.clear()
    t0 = time.perf_counter()
    with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(o.epochs, o.lr)
        history = (list(learn.recorder.metric_names[1:-1]), [list(map(float, v)) for v in learn.recorder.values])
        acc = float(learn.validate()[1])   # gathered over the ranks: the whole validation set
    secs = time.perf_counter() - t0
    sp = cb.sparsifier
    agree = masks_agree(sp.masks)
    masks = {n: sp.masks[sp.weight_name(n)] for n in sp.layers}
    masked = {n: int((~m).sum()) for n, m in masks.items()}
    numel = {n: m.numel() for n, m in masks.items()}
    held = all(not bool(m.weight[~masks[n]].any()) for n, m in sp.layers.items())
    global_ = kind == 'prune' and kw['context'] == 'global'
    expected = round(o.sparsity * sum(numel.values())) if global_ else sum(round(sp.targets[n] * numel[n]) for n in numel)
    res = dict(rank=rank, seen=[len(s) for s in seen], first=sorted(seen[0]) if seen else [], masks=mask_digest(sp.masks),
               weights=weights_digest(learn.model), held=held, masked=sum(masked.values()), expected=expected,
               numel=sum(numel.values()), agree=agree, acc=acc, secs=secs, history=history, threads=torch.get_num_threads())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    return gathered

def rank_main(o):
    "One process of the launch: every case in turn; rank 0 prints them and writes the results for the launcher"
    warnings.simplefilter('ignore')
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'tests'))
    import torch
    import fastai.distributed as fd
    import fastai.callback.schedule  # noqa: F401 (patches Learner)
    import gloo_shim
    gloo_shim.patch()
    if o.threads: torch.set_num_threads(o.threads)
    seen = []
    get_idxs = fd.DistributedDL.get_idxs
    def record(self):  # which training samples this rank draws in each epoch
        idxs = get_idxs(self)
        if self.dl.shuffle: seen.append(list(idxs))
        return idxs
    fd.DistributedDL.get_idxs = record
    out = []
    for name, kind, kw in cases(o):
        res = train(o, name, kind, kw, seen)
        if int(os.environ['RANK']) == 0: report(o, name, res)
        out.append(dict(case=name, ranks=res))
    if int(os.environ['RANK']) == 0 and o.result: Path(o.result).write_text(json.dumps(out))

def report(o, name, res):
    "Rank 0: the case's history, a line per rank, and whether the ranks agree"
    r0 = res[0]
    print(f"\n{name}: {len(res)} CPU processes (fastai's distrib_ctx, gloo), sparsity {o.sparsity}, {o.epochs} epochs, "
          f"{r0['threads']} torch thread(s) per process")
    names, values = r0['history']
    print('epoch ' + ' '.join(f'{n:>10}' for n in names))
    for i, v in enumerate(values): print(f'{i:>5} ' + ' '.join(f'{x:>10.4f}' for x in v))
    print(f"{'rank':>4} {'samples':>7} {'own':>5} {'masks sha256':>14} {'weights sha256':>14} {'sparsity':>8} {'masked':>13} {'valid acc':>9} {'fit s':>6}")
    sets = [set(r['first']) for r in res]   # first epoch
    for r, s in zip(res, sets):
        r['own'] = len(s - set().union(*(t for t in sets if t is not s)))
        cnt = f"{r['masked']}/{r['expected']}"
        print(f"{r['rank']:>4} {len(s):>7} {r['own']:>5} {r['masks'][:12]:>14} {r['weights'][:12]:>14} {r['masked'] / r['numel']:>8.4f} "
              f"{cnt:>13} {r['acc']:>9.4f} {r['secs']:>6.1f}")
    ok = all(r['masked'] == r['expected'] and r['held'] for r in res)
    same_m = len({r['masks'] for r in res}) == 1 and all(r['agree'] for r in res)
    same_w = len({r['weights'] for r in res}) == 1
    print(f"masks identical on all {len(res)} ranks: {'yes' if same_m else 'NO'}; weights identical: {'yes' if same_w else 'NO'}; "
          f"exact sparsity, masked weights zero: {'yes' if ok else 'NO'}", flush=True)

# ------------------------------------------------------------------ the launcher
def plot(summ):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.45 * len(summ)), layout='constrained')
    ax.barh(range(len(summ)), summ['valid acc'], color=['tab:green' if ok else 'tab:red' for ok in summ['agree']])
    for i, (acc, ok, masked) in enumerate(zip(summ['valid acc'], summ.agree, summ.masked)):
        ax.text(acc + 0.01, i, f"masks {'identical' if ok else 'DIFFER'}, {masked} masked", va='center', fontsize=7)
    ax.set_yticks(range(len(summ)), summ.case, fontsize=8); ax.invert_yaxis(); ax.set_xlim(0, 1)
    ax.set_xlabel('validation accuracy, gathered over the ranks (green: every rank agrees, counts exact)', fontsize=8)
    return fig

def main():
    o = parse()
    if 'RANK' in os.environ: return rank_main(o)
    from common import start
    import pandas as pd
    run = start('distributed', o)
    if o.quick: o.epochs = 1
    one = bool(o.criteria or o.dst)
    if one and not o.out: run.out = None   # one case asked for: a check, not the benchmark's result
    cs = cases(o)
    print(f"{len(cs)} case(s), {o.nprocs} processes, {o.epochs} epoch(s) each, sparsity {o.sparsity}, digits_cnn({o.width}), "
          f"bs {o.bs} per rank; one torchrun launch", flush=True)
    with tempfile.TemporaryDirectory() as d:
        result = Path(d)/'result.json'
        args = sys.argv[1:] + (['--epochs', str(o.epochs)] if o.quick else [])   # (the ranks write nothing of their own)
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(o.nprocs), '--master_addr', '127.0.0.1',
               '--master_port', str(o.port), __file__, *args, '--result', str(result)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        print(p.stdout.rstrip())
        aborted = int(p.returncode != 0)
        print(f"\n{aborted} of 1 launch(es) ended with an error (return code {p.returncode}); {secs:.1f} s, start-up included")
        if p.returncode or not result.exists():
            print(p.stderr[-4000:]); sys.exit(1)
        got = json.loads(result.read_text())
    rows, bad = [], []
    for c in got:
        res = c['ranks']
        agree = len({r['masks'] for r in res}) == 1 and all(r['agree'] for r in res)
        same_w = len({r['weights'] for r in res}) == 1
        exact = all(r['masked'] == r['expected'] and r['held'] for r in res)
        if not (agree and same_w and exact): bad.append(c['case'])
        firsts = [set(r['first']) for r in res]
        own = sum(len(s - set().union(*(t for t in firsts if t is not s))) for s in firsts)
        rows.append({'case': c['case'], 'ranks': len(res), 'agree': agree and same_w and exact,
                     'masks identical': 'yes' if agree else 'NO', 'weights identical': 'yes' if same_w else 'NO',
                     'masked': f"{res[0]['masked']:,}/{res[0]['expected']:,}", 'exact, zeros': 'yes' if exact else 'NO',
                     'valid acc': res[0]['acc'], 'fit s': max(r['secs'] for r in res),
                     '_own': own, '_seen': sum(len(s) for s in firsts), '_threads': res[0]['threads']})
    summ = pd.DataFrame(rows)
    assert not bad, f"ranks disagree, or a count is off, in: {bad}"
    n = len(summ)
    reading = (f"How to read it: in all {n} case(s) the {o.nprocs} ranks end with identical masks and identical weights, and "
               f"every rank masks exactly the count asked for, with every masked weight zero (asserted; `masked` is rank 0's "
               f"count against the exact one). Each rank draws its own shard: in the first epoch of the first case, "
               f"{rows[0]['_own']} of the {rows[0]['_seen']} samples drawn were drawn by one rank only. "
               f"{aborted} of 1 torchrun launch ended with an error. Validation accuracy after {o.epochs} epoch(s) is "
               f"{summ['valid acc'].min():.3f} to {summ['valid acc'].max():.3f} (one in ten is chance); each rank ran "
               f"{rows[0]['_threads']} torch thread(s)"
               + (" (torchrun sets `OMP_NUM_THREADS=1` for its processes unless it is set)." if not o.threads else " (--threads)."))
    intro = (f"`bench/distributed.py` trains `digits_cnn({o.width})` on scikit-learn's digits in {o.nprocs} CPU processes "
             f"started by one `torchrun` launch, inside fastai's own `learn.distrib_ctx()` (DistributedDataParallel over gloo, with `tests/gloo_shim.py` making "
             f"fastai's `DistributedDL` broadcast its sample order as a CPU tensor rather than a CUDA one), "
             f"{o.epochs} epoch(s) at {o.sparsity:.0%} sparsity of the convolutions, each rank initialised differently, for "
             f"{'the case asked for' if one else 'one case of each kind of data a criterion reads: the weights (magnitude), gradients (taylor), the weights history (movement), activations (wanda) and dense gradients for regrowth (RigL)'}. "
             "It compares the ranks' masks and weights by their sha256 digests and counts each rank's masked weights.")
    run.write(title="Sparse training on several processes: every rank ends with the same masks", intro=intro,
              summary=summ[[c for c in summ.columns if not c.startswith('_') and c != 'agree']], fig=plot(summ), reading=reading)

if __name__ == '__main__':
    if 'RANK' not in os.environ: main()
    else:  # a rank ends without the interpreter's teardown, which aborts now and then in gloo's threads ("terminate called")
        rc = 0
        try: main()
        except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
        except BaseException: import traceback; traceback.print_exc(); rc = 1
        sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)
