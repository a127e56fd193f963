"""Sparse training on N CPU processes with fastai's own distributed training and fastsparse: every rank must end with the same masks.

Each process trains `digits_cnn` on its own shard of scikit-learn's digits inside fastai's `learn.distrib_ctx()`
(accelerate's DistributedDataParallel; here over gloo on CPU processes, with the one shim `tests/gloo_shim.py` that
fastai's CPU path needs), with `SparsifyCallback` (or `DynamicSparseCallback` with --dst). Rank 0's training history
is printed, then per rank: the training samples it saw in the first epoch (and how many of them no other rank saw),
the digests of its masks and of its weights, the sparsity of the selected layers, and the number of masked weights
against the exact count asked for (round(s*n) per layer, or round(s*N) over the layers in global context). Exits 1
if two ranks disagree, a count is off, or a masked weight is not zero. Run by hand it starts itself under `torchrun`:

    python bench/distributed.py                                   # 2 processes, global magnitude, 2 epochs
    python bench/distributed.py --nprocs 4 --criteria taylor --context local
    python bench/distributed.py --dst rigl --sparsity 0.9
    torchrun --nproc_per_node 2 bench/distributed.py              # the same, started by torchrun
"""
import argparse, hashlib, json, os, subprocess, sys, time, warnings
from pathlib import Path
import torch, torch.nn as nn, torch.distributed as dist
from fastai.basics import Learner, CrossEntropyLossFlat, accuracy
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
import fastai.distributed as fd  # noqa: F401 (patches Learner.distrib_ctx)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'tests'))
import gloo_shim
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.callback import SparsifyCallback
from fastsparse.distributed import mask_digest, masks_agree

def weights_digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()): h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def train(o):
    "This rank: build the Learner (same seed everywhere), fit inside fastai's `distrib_ctx`, return what it ended with"
    warnings.simplefilter('ignore')
    gloo_shim.patch()
    torch.set_num_threads(o.threads)
    rank, seen = int(os.environ['RANK']), []
    get_idxs = fd.DistributedDL.get_idxs
    def record(self):  # which training samples this rank draws in each epoch
        idxs = get_idxs(self)
        if self.dl.shuffle: seen.append(list(idxs))
        return idxs
    fd.DistributedDL.get_idxs = record
    torch.manual_seed(o.seed)
    lt = (nn.Conv2d, nn.Linear) if o.linear else nn.Conv2d
    if o.dst:
        from fastsparse.dst import DynamicSparseCallback
        cb = DynamicSparseCallback(o.sparsity, o.dst, update_every=5, layer_type=lt, seed=o.seed)
    else: cb = SparsifyCallback(o.sparsity, o.granularity, o.context, o.criteria, o.schedule, layer_type=lt, seed=o.seed)
    learn = Learner(digits_dls(bs=o.bs), digits_cnn(o.width), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb)
    t0 = time.perf_counter()
    with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(o.epochs, o.lr)
        history = (list(learn.recorder.metric_names[1:-1]), [list(map(float, v)) for v in learn.recorder.values])
        acc = float(learn.validate()[1])   # gathered over the ranks: the whole validation set
    secs = time.perf_counter() - t0
    sp = cb.sparsifier
    agree = masks_agree(sp.masks)
    masks = {n: sp.masks[f'{n}.weight'] for n in sp.layers}
    masked = {n: int((~m).sum()) for n, m in masks.items()}
    numel = {n: m.numel() for n, m in masks.items()}
    held = all(bool((m.weight[~masks[n]] == 0).all()) for n, m in sp.layers.items())
    res = dict(rank=rank, seen=seen, masks=mask_digest(sp.masks), weights=weights_digest(learn.model), held=held,
               masked=masked, numel=numel, targets=dict(sp.targets), agree=agree, acc=acc, secs=secs, history=history)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    return gathered

def expected_masked(r, o):
    "The exact count asked for: per layer round(s*n), or round(s*N) over the layers in global context"
    if o.context == 'global' and not o.dst: return round(o.sparsity * sum(r['numel'].values()))
    return sum(round(r['targets'][n] * r['numel'][n]) for n in r['numel'])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nprocs', type=int, default=2)
    ap.add_argument('--threads', type=int, default=1, help='torch threads per process')
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--sparsity', type=float, default=0.8)
    ap.add_argument('--criteria', default='large_final')
    ap.add_argument('--context', default='global', choices=['local', 'global'])
    ap.add_argument('--granularity', default='weight')
    ap.add_argument('--schedule', default='agp')
    ap.add_argument('--dst', default=None, choices=['set', 'rigl'], help='dynamic sparse training instead of pruning')
    ap.add_argument('--linear', action='store_true', help='sparsify the Linear head too')
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--width', type=int, default=16)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--port', type=int, default=29533, help='rendezvous port on 127.0.0.1 (when started by hand)')
    o = ap.parse_args()
    if 'RANK' not in os.environ:   # started by hand: start the processes with torchrun
        t0 = time.perf_counter()
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(o.nprocs), '--master_addr', '127.0.0.1',
               '--master_port', str(o.port), __file__, *sys.argv[1:]]
        rc = subprocess.run(cmd, env={**os.environ, 'OMP_NUM_THREADS': str(o.threads)}).returncode
        print(f"(torchrun, start-up included: {time.perf_counter()-t0:.1f}s)")
        sys.exit(rc)
    t0 = time.perf_counter()
    res = train(o)
    o.nprocs = len(res)
    if res[0]['rank'] != int(os.environ['RANK']) or int(os.environ['RANK']): return   # rank 0 reports
    what = f"DynamicSparseCallback({o.dst})" if o.dst else f"SparsifyCallback({o.criteria}, {o.context}, {o.granularity}, {o.schedule})"
    print(f"{o.nprocs} CPU processes (fastai's distrib_ctx, gloo), {what}, sparsity {o.sparsity}, {o.epochs} epochs, {time.perf_counter()-t0:.1f}s")
    names, values = res[0]['history']
    print('epoch ' + ' '.join(f'{n:>10}' for n in names))
    for i, v in enumerate(values): print(f'{i:>5} ' + ' '.join(f'{x:>10.4f}' for x in v))
    print(f"{'rank':>4} {'samples':>7} {'own':>5} {'masks sha256':>14} {'weights sha256':>14} {'sparsity':>8} {'masked':>13} {'valid acc':>9} {'fit s':>6}")
    sets = [set(r['seen'][0]) for r in res]   # first epoch
    ok = True
    for r, s in zip(res, sets):
        own = len(s - set().union(*(t for t in sets if t is not s)))
        z, exp, N = sum(r['masked'].values()), expected_masked(r, o), sum(r['numel'].values())
        ok &= z == exp and r['held']
        print(f"{r['rank']:>4} {len(r['seen'][0]):>7} {own:>5} {r['masks'][:12]:>14} {r['weights'][:12]:>14} {z/N:>8.4f} "
              f"{f'{z}/{exp}':>13} {r['acc']:>9.4f} {r['secs']:>6.1f}")
    same = len({r['masks'] for r in res}) == 1 and len({r['weights'] for r in res}) == 1 and all(r['agree'] for r in res)
    print(f"masks identical on all {o.nprocs} ranks: {'yes' if same else 'NO'}; weights identical: "
          f"{'yes' if len({r['weights'] for r in res}) == 1 else 'NO'}; exact sparsity, masked weights zero: {'yes' if ok else 'NO'}")
    if not (same and ok): sys.exit(1)

if __name__ == '__main__':
    if 'RANK' not in os.environ: main()
    else:  # a rank ends without the interpreter's teardown, which aborts now and then in gloo's threads ("terminate called")
        rc = 0
        try: main()
        except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
        except BaseException: import traceback; traceback.print_exc(); rc = 1
        sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)
