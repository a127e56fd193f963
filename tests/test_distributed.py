"""Two CPU processes (gloo) train on digits with sparsity callbacks inside `learn.cpu_distrib_ctx()`.

Every rank must end with the same masks (and weights), at exactly the sparsity asked for, after training on different
data. So that rank 0's broadcast (`Sparsifier.broadcast_masks`) cannot hide a bug, each rank also records the digest of
its own masks *before* every broadcast: they must already agree. For `wanda`, switching off the reduction of the
activation norms (`Sparsifier.sync_state`) makes them disagree -- the reduction is what makes them agree.

All cases run in one launch of two processes (the start-up dominates); each case is one epoch of `fit`."""
import os, warnings
import pytest, torch, torch.nn as nn

SPARSITY = 0.6
CASES = {   # name: SparsifyCallback arguments (criteria 'dst': DynamicSparseCallback with RigL)
    'global_magnitude': dict(context='global', criteria='large_final', layer_type=(nn.Conv2d, nn.Linear)),
    'random': dict(context='local', criteria='random'),
    'taylor': dict(context='local', criteria='taylor'),
    'wanda': dict(context='local', criteria='wanda'),
    'wanda_unsynced': dict(context='local', criteria='wanda'),   # with `sync_state` switched off
    'dst_rigl': dict(context='local', criteria='dst'),
}

def _have_dst():
    try: from fastsparse.dst import DynamicSparseCallback  # noqa: F401
    except ImportError: return False
    return True

def worker(rank, names):
    "One rank: train every case, return per case what the rank ended with and what it saw on the way"
    import hashlib
    from fastai.basics import Learner, CrossEntropyLossFlat, defaults
    from fastai.callback.progress import ProgressCallback
    from fastsparse.sparsifier import Sparsifier
    from fastsparse.callback import SparsifyCallback
    from fastsparse.schedule import lin
    from fastsparse.demo import digits_dls, digits_cnn
    from fastsparse.distributed import CPUDistributedDL, mask_digest, masks_agree
    warnings.simplefilter('ignore')
    defaults.callbacks = [c for c in defaults.callbacks if c is not ProgressCallback]

    log, seen = [], []
    bcast, sync, get_idxs = Sparsifier.broadcast_masks, Sparsifier.sync_state, CPUDistributedDL.get_idxs
    def broadcast_masks(self, src=0):   # record this rank's own masks, then rank 0's
        pre = mask_digest(self.masks)
        res = bcast(self, src)
        log.append((pre, mask_digest(self.masks)))
        return res
    def record_idxs(self):
        idxs = get_idxs(self)
        if self.dl.shuffle: seen.append(list(idxs))
        return idxs
    Sparsifier.broadcast_masks, CPUDistributedDL.get_idxs = broadcast_masks, record_idxs
    if 'dst_rigl' in names:
        from fastsparse.dst import DynamicSparseCallback
        upd = DynamicSparseCallback.update_masks
        def update_masks(self, clock):   # DST never broadcasts: its masks must agree by construction
            upd(self, clock); log.append((mask_digest(self.masks), None))
        DynamicSparseCallback.update_masks = update_masks

    out = {}
    for name in names:
        kw = dict(CASES[name])
        log.clear(); seen.clear()
        torch.manual_seed(100 + rank)   # a different initialisation on each rank: DDP must start them from rank 0's
        crit = kw.pop('criteria')
        if crit == 'dst': cb = DynamicSparseCallback(SPARSITY, 'rigl', update_every=2)
        else: cb = SparsifyCallback(SPARSITY, criteria=crit, schedule=lin, **kw)
        learn = Learner(digits_dls(bs=64), digits_cnn(8), loss_func=CrossEntropyLossFlat(), cbs=cb)
        Sparsifier.sync_state = (lambda self: self) if name == 'wanda_unsynced' else sync
        try:
            with learn.cpu_distrib_ctx(): learn.fit(1, 1e-2)
        finally: Sparsifier.sync_state = sync
        h = hashlib.sha256()
        for k, v in sorted(learn.model.state_dict().items()): h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
        layers = cb.sparsifier.layers
        out[name] = dict(log=list(log), seen=[list(s) for s in seen], final=mask_digest(cb.sparsifier.masks), weights=h.hexdigest(),
                         agree=masks_agree(cb.sparsifier.masks), targets=dict(cb.sparsifier.targets),
                         zeros={n: int((m.weight == 0).sum()) for n, m in layers.items()},
                         masked={n: int((~cb.sparsifier.masks[f'{n}.weight']).sum()) for n in layers},
                         held=all(bool((m.weight[~cb.sparsifier.masks[f'{n}.weight']] == 0).all()) for n, m in layers.items()),
                         numel={n: m.weight.numel() for n, m in layers.items()}, wrapped=type(learn.model).__name__)
    return out

@pytest.fixture(scope='module')
def runs():
    "Both ranks' results, from one launch of two processes"
    from fastsparse.distributed import launch_cpu
    names = [n for n in CASES if n != 'dst_rigl' or _have_dst()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('PYTHONHASHSEED', 'random')   # as under torchrun: each process hashes strings its own way
        r0, r1 = launch_cpu(worker, 2, args=(names,), threads=1, timeout=120)
    return r0, r1

ALL = [pytest.param(n, marks=pytest.mark.skipif(n == 'dst_rigl' and not _have_dst(), reason='no fastsparse.dst'))
       for n in CASES if n != 'wanda_unsynced']

@pytest.mark.parametrize('case', ALL)
def test_same_masks_and_weights_on_both_ranks(runs, case):
    r0, r1 = runs[0][case], runs[1][case]
    assert r0['final'] == r1['final'], f"{case}: masks differ between ranks"
    assert r0['weights'] == r1['weights'], f"{case}: weights differ between ranks"
    assert r0['agree'] and r1['agree']
    assert r0['wrapped'] == 'Sequential'   # the plain model is back after fit

def _exact(res, case, counts):
    "`counts` ({layer: zeros}) is exactly round(s*N) over the layers (global) or round(s*n) per layer (local)"
    if CASES[case]['context'] == 'global':
        assert sum(counts.values()) == round(SPARSITY * sum(res['numel'].values())), case
    else:
        for n, z in counts.items():
            assert res['targets'][n] == pytest.approx(SPARSITY)
            assert z == round(SPARSITY * res['numel'][n]), f"{case}: layer {n}"

@pytest.mark.parametrize('case', ALL)
def test_exact_sparsity(runs, case):
    for r in runs:
        _exact(r[case], case, r[case]['masked'])                 # the masks
        if case != 'dst_rigl': _exact(r[case], case, r[case]['zeros'])   # the weights (see below)
        assert r[case]['held'], f"{case}: a masked weight is not zero"
    # RigL grows connections at zero on purpose, so a DST layer may hold more zeros than masked weights

def test_exact_weight_zeros_random(runs):
    for r in runs: _exact(r['random'], 'random', r['random']['zeros'])

def test_ranks_trained_on_different_data(runs):
    s0, s1 = runs[0]['global_magnitude']['seen'], runs[1]['global_magnitude']['seen']
    assert len(s0) == len(s1) == 1 and len(s0[0]) == len(s1[0]) == 719   # 1438 training items, one epoch
    assert not set(s0[0]) & set(s1[0])
    assert len(set(s0[0]) | set(s1[0])) == 1438

def _check_agree_before_broadcast(runs, case):
    l0, l1 = runs[0][case]['log'], runs[1][case]['log']
    assert len(l0) == len(l1) >= 5, f"{case}: {len(l0)} mask updates"
    assert [pre for pre, _ in l0] == [pre for pre, _ in l1], f"{case}: the ranks computed different masks before the broadcast"
    assert all(pre == post for pre, post in l0 + l1), f"{case}: the broadcast changed a rank's masks"

@pytest.mark.parametrize('case', ['global_magnitude', 'taylor', 'wanda'])
def test_masks_agree_before_broadcast(runs, case): _check_agree_before_broadcast(runs, case)

def test_random_masks_agree_before_broadcast(runs): _check_agree_before_broadcast(runs, 'random')

def test_wanda_agrees_only_with_sync(runs):
    l0, l1 = runs[0]['wanda_unsynced']['log'], runs[1]['wanda_unsynced']['log']
    assert len(l0) == len(l1) >= 5
    assert any(a[0] != b[0] for a, b in zip(l0, l1)), "wanda without sync_state: the ranks' activations should disagree"
    assert [post for _, post in l0] == [post for _, post in l1]   # the broadcast still makes them equal
    assert runs[0]['wanda_unsynced']['final'] == runs[1]['wanda_unsynced']['final']

@pytest.mark.skipif(not _have_dst(), reason='no fastsparse.dst')
def test_dst_masks_agree_at_every_update(runs):
    l0, l1 = runs[0]['dst_rigl']['log'], runs[1]['dst_rigl']['log']
    assert len(l0) == len(l1) >= 3
    assert l0 == l1, "DynamicSparseCallback: the ranks moved different connections"
