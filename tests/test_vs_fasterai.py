"The README's claim that fastsparse trains as fasterai 0.4.1 does at equal counts, checked bit for bit with the bench's own code."
import argparse, importlib.util, pathlib, sys
import pytest, torch

import fasterai  # noqa: F401 -- the `bench` extra, which `make test` installs: missing, this fails rather than skips
sys.path.insert(0, str(pathlib.Path(__file__).parents[1]/'bench'))  # the scripts import bench/common.py
_spec = importlib.util.spec_from_file_location('overhead', pathlib.Path(__file__).parents[1]/'bench'/'overhead.py')
overhead = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(overhead)

@pytest.mark.parametrize('context', ['local', 'global'])
def test_same_counts_same_weights_as_fasterai(context):
    "Pruning fasterai's count at every step, fastsparse ends bit-identical to fasterai; at the target counts it does not"
    a = argparse.Namespace(size=16, width=32, epochs=4, lr=1e-2, first_dense=False)
    sfx = '' if context == 'local' else '/global'
    fai, matched, fs = (overhead.run(m + sfx, 0.9, 0, a) for m in ('fasterai', 'matched', 'fastsparse'))
    assert matched['weights'].keys() == fai['weights'].keys() and len(fai['weights']) > 0
    assert all(torch.equal(matched['weights'][k], fai['weights'][k]) for k in fai['weights'])
    assert matched['acc'] == fai['acc'] and matched['layer_sparsity'] == fai['layer_sparsity']
    # fasterai prunes one or two weights fewer than round(s*n) (per layer, or over all of them in global context);
    # fastsparse prunes exactly round(s*n)
    n = {k: m.weight.numel() for k,m in overhead.digits_cnn(a.width).named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert fs['layer_sparsity'].keys() == n.keys() and len(n) == 3
    def zeros(r):  # pruned weights per layer, or over all of them in global context
        z = {k: round(v * n[k]) for k,v in r['layer_sparsity'].items()}
        return z if context == 'local' else {'all': sum(z.values())}
    want = {k: round(0.9 * m) for k,m in n.items()} if context == 'local' else {'all': round(0.9 * sum(n.values()))}
    assert zeros(fs) == want
    assert zeros(fai).keys() == want.keys() and all(zeros(fai)[k] in (want[k] - 1, want[k] - 2) for k in want)
    assert not all(torch.equal(fs['weights'][k], fai['weights'][k]) for k in fai['weights'])
    if context == 'global':  # one threshold over all layers: the layers end at different sparsities
        assert max(fs['layer_sparsity'].values()) - min(fs['layer_sparsity'].values()) > 0.3

def test_alternating_fit_gates_each_library(monkeypatch):
    "The bench's cost fit: steady batches split evenly between dense, fastsparse and fasterai, and each library runs only in its own"
    seen = []  # (library, the batch's variant) at every gradient mask (fastsparse) and every mask re-application (fasterai)
    class Counting(overhead.SparsifyCallback):
        def after_backward(self): seen.append(('fastsparse', self.learn.alternate.variant)); super().after_backward()
    make_fai = overhead._fasterai_cb
    def counting_fai(sparsity):
        cb = make_fai(sparsity)
        step = cb.after_step
        def after_step(): seen.append(('fasterai', cb.learn.alternate.variant)); step()
        cb.after_step = after_step
        return cb
    monkeypatch.setattr(overhead, 'SparsifyCallback', Counting)
    monkeypatch.setattr(overhead, '_fasterai_cb', counting_fai)
    a = argparse.Namespace(size=16, width=32, epochs=4, lr=1e-2, first_dense=False)
    recs = overhead.alternate(0.9, 0, a)
    n_train = len(overhead.digits_dls(bs=64, size=16, seed=42).train)
    before, steady = n_train * (a.epochs // 2 + 1), n_train * (a.epochs - (a.epochs // 2 + 1))
    counts = {v: sum(r['variant'] == v for r in recs) for v in overhead.Alternate.variants}
    assert len(recs) == steady and max(counts.values()) - min(counts.values()) <= 1 and min(counts.values()) > 0
    for lib in ('fastsparse', 'fasterai'):  # all batches before the steady epochs (None), then only its own
        ran = [v for l, v in seen if l == lib]
        assert set(ran) == {None, lib} and ran.count(lib) == counts[lib] and ran.count(None) == before
    assert all(r['cb'] > 0 and 0 < r['span'] < r['batch'] for r in recs if r['variant'] != 'dense')

def test_fasterai_schedule_position_is_fastais_pct_train():
    "fastsparse at fasterai's counts reads the schedule at fastai's own `pct_train` (summed per batch), on every batch of a real fit"
    from fastai.basics import Learner, Callback, DataLoaders, TfmdDL, MSELossFlat
    seen = []
    class Record(Callback):
        def before_batch(self):
            if self.training: seen.append(self.pct_train)
    xs = torch.randn(22 * 4, 2)
    ds = list(zip(xs, xs.sum(1, keepdim=True)))
    dls = DataLoaders(TfmdDL(ds, bs=4, shuffle=False), TfmdDL(ds[:4], bs=4))
    learn = Learner(dls, torch.nn.Linear(2, 1), loss_func=MSELossFlat(), cbs=Record())
    with learn.no_logging(), learn.no_bar(): learn.fit(8, 1e-3)
    assert len(seen) == 176
    pol = overhead.AtFasteraiCounts(0.9)
    pol.n_iter, pol.n_epoch = 22, 8
    assert [pol.fastai_pct(i / 176) for i in range(176)] == seen   # bit for bit
    assert round(seen[11], 3) != round(11 / 176, 3)   # where the exact fraction would read the schedule elsewhere
