"End-to-end checks of dynamic sparse training (SET, RigL) and ERK allocation with real fastai training on digits."
import math, warnings
from functools import partial
import pytest, torch, torch.nn as nn
from fastai.basics import Learner, Callback, Adam, SGD, RAdam, Lamb, OptimWrapper, CrossEntropyLossFlat, accuracy
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai.callback.training import GradientAccumulation
from fastsparse.callback import SparsifyCallback, FixedSparsityCallback
from fastsparse.training import opt_states
from fastsparse.sparsifier import Sparsifier
from fastsparse.tensors import select_layers
from fastsparse.schedule import linear
from fastsparse.demo import digits_dls, digits_cnn, digits_mlp
from fastsparse.dst import erk_sparsities, random_masks, drop_and_grow
from fastsparse.callback import DynamicSparseCallback
from fastsparse.report import plot_history
from cpu_amp import CPUMixedPrecision, CountSteps
from masks_held import SkipSteps

CONV_LIN = (nn.Conv2d, nn.Linear)

def learner(model=None, cbs=None, shuffle=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = model if model is not None else digits_mlp(32)
    return Learner(digits_dls(shuffle=shuffle), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs, **kw)

def dst_cb(learn): return [c for c in learn.cbs if isinstance(c, DynamicSparseCallback)][0]

class CheckDST(Callback):
    """After every training batch (after ours, which updates there): every layer has exactly its target count of masked
    weights, masked weights and their optimizer state are zero, and connections that just appeared have weight zero and
    zero optimizer state."""
    order = DynamicSparseCallback.order + 1
    def before_fit(self): self.n,self.grown,self.updates,self.prev = 0,0,0,None
    def before_train(self):
        if self.n == 0: self.first = {k: v.clone() for k, v in dst_cb(self.learn).masks.items()}
    def after_batch(self):
        if not self.training: return
        cb = dst_cb(self.learn)
        changed = False
        for name, mask in cb.masks.items():
            p = self.learn.model.get_parameter(name)
            target = round(cb.sparsifier.targets[name[:-len('.weight')]] * mask.numel())
            assert int((~mask).sum()) == target, name             # exact at every step
            assert int((p == 0).sum()) >= target, name            # counting zeros: the masked ones are zero ...
            assert (p[~mask] == 0).all(), name                    # ... all of them
            states = opt_states(self.learn.opt, p)
            for v in states: assert (v[~mask] == 0).all(), name
            if self.prev is not None:
                new = mask & ~self.prev[name]
                if new.any():
                    changed = True
                    assert (p[new] == 0).all(), f"{name}: regrown weight not zero"
                    for v in states: assert (v[new] == 0).all(), f"{name}: regrown optimizer state not zero"
                    self.grown += int(new.sum())
        self.updates += changed
        self.prev = {k: v.clone() for k, v in cb.masks.items()}
        self.n += 1

adamw = partial(OptimWrapper, opt=partial(torch.optim.AdamW, weight_decay=0.1))
sgd_torch = partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9, weight_decay=1e-3))
OPTS = {'Adam': Adam, 'SGD_mom': partial(SGD, mom=0.9), 'RAdam': RAdam, 'Lamb': Lamb, 'AdamW_torch': adamw, 'SGD_torch': sgd_torch}

@pytest.mark.parametrize('opt, regrow', [(o, 'rigl') for o in OPTS] + [('Adam', 'set'), ('SGD_mom', 'set')])
def test_exact_sparsity_and_clean_regrowth_every_step(opt, regrow):
    chk = CheckDST()
    cb = DynamicSparseCallback(0.85, regrow, update_every=4, distribution='erk', layer_type=CONV_LIN)
    learn = learner(digits_cnn(8), cbs=[cb, chk], opt_func=OPTS[opt])
    learn.fit(1, 1e-2, wd=0.01)
    assert chk.n == len(learn.dls.train)
    assert cb.rezero_after_step() is False  # every optimizer here is safe: masked gradients and state alone held the zeros
    n_updates = len([t for t in range(1, chk.n + 1) if t % 4 == 0 and t < 0.75 * chk.n])
    assert len(cb.history) == n_updates and chk.grown > 0
    assert chk.updates == sum(h['moved'] > 0 for h in cb.history) > 0  # late updates may round to 0 moves
    N = sum(m.weight.numel() for m in cb.sparsifier.layers.values())
    assert sum(int((~m).sum()) for m in cb.masks.values()) == round(0.85 * N)  # ERK: exact overall count

def test_masks_change_and_follow_the_cosine():
    cb = DynamicSparseCallback(0.9, 'set', update_every=5, fraction=0.5, stop_pct=0.5)
    learn = learner(cbs=[cb])
    initial = random_masks(learn.model, 0.9, seed=0)  # the masks the callback starts from
    learn.fit(2, 1e-2)
    total = 2 * len(learn.dls.train)
    assert any((cb.masks[k] != v).any() for k, v in initial.items())
    assert [h['step'] for h in cb.history] == [t for t in range(5, total, 5) if t < 0.5 * total]
    for h in cb.history:
        f = 0.5 * (1 + math.cos(math.pi * h['step'] / (0.5 * total))) / 2
        assert h['fraction'] == pytest.approx(f)
        n_active = {n: int(cb.masks[f'{n}.weight'].sum()) for n in cb.sparsifier.layers}
        assert h['per_layer'] == {n: min(round(f * a), cb.masks[f'{n}.weight'].numel() - a) for n, a in n_active.items()}
    df = cb.history_df()
    assert list(df.columns[:7]) == ['step', 'epoch', 'pct', 'fraction', 'moved', 'regrown_dropped', 'moved[1]']
    assert 0 <= df.regrown_dropped.dropna().min() and df.regrown_dropped.dropna().max() <= 1
    assert plot_history(cb).axes

class GrabGrads(Callback):
    """Runs before our callback: at every training batch, the dense gradients (before our `after_backward` masks them),
    and the masks and weight magnitudes right before our `after_batch` (which drops and regrows there)"""
    order = DynamicSparseCallback.order - 1
    def after_backward(self):
        self.grads = {n: t.weight.grad.abs().clone() for n, t in dst_cb(self.learn).sparsifier.tensors.items()}
    def after_batch(self):
        if not self.training: return
        cb = dst_cb(self.learn)
        self.before = {k: v.clone() for k, v in cb.masks.items()}
        self.mags = {n: t.weight.detach().abs().clone() for n, t in cb.sparsifier.tensors.items()}

class CheckRegrowth(Callback):
    """Runs after our callback: wherever the masks changed, every layer moved the count its history entry says, kept
    exactly its active count, dropped its smallest-magnitude active weights and regrew its largest dense gradients"""
    order = DynamicSparseCallback.order + 1
    def __init__(self, grab): self.grab,self.steps,self.n,self.moved = grab,[],0,0
    def after_batch(self):
        if not self.training: return
        self.n += 1
        cb, grab = dst_cb(self.learn), self.grab
        if all(torch.equal(cb.masks[k], grab.before[k]) for k in cb.masks): return
        self.steps.append(self.n)
        h = cb.history[-1]
        assert h['step'] == self.n   # the update recorded is this batch's
        for n, t in cb.sparsifier.tensors.items():
            m, old, g, w = cb.masks[t.name], grab.before[t.name], grab.grads[n], grab.mags[n]
            grown, dropped = m & ~old, old & ~m
            assert int(m.sum()) == int(old.sum()) == m.numel() - round(0.9 * m.numel()), n   # exactly 10% active, before and after
            assert int(grown.sum()) == int(dropped.sum()) == h['per_layer'][n], n   # as many regrown as dropped
            if not grown.any(): continue                               # (a small layer late in the cosine decay)
            assert w[dropped].max() <= w[old & ~dropped].min(), n      # the smallest magnitudes were dropped
            assert g[grown].min() >= g[~old & ~grown].max(), n         # the largest dense gradients among the inactive regrew
            assert (g[grown] > 0).all(), n                             # real gradients of masked weights
            self.moved += int(grown.sum())

def test_rigl_regrows_largest_dense_gradient():
    grab = GrabGrads()
    check = CheckRegrowth(grab)
    cb = DynamicSparseCallback(0.9, 'rigl', update_every=3)
    learn = learner(cbs=[cb, grab, check])
    learn.fit(1, 1e-2)
    n = len(learn.dls.train)
    # an update every 3 batches until stop_pct=0.75 of the fit, each one seen moving weights
    assert check.steps == [h['step'] for h in cb.history] == [t for t in range(3, n + 1, 3) if t < 0.75 * n]
    assert check.moved == sum(h['moved'] for h in cb.history) > 0


def test_seeded_and_reproducible():
    def run(seed):
        cb = DynamicSparseCallback(0.9, 'set', update_every=5, seed=seed)
        learner(cbs=[cb], shuffle=False).fit(1, 1e-2)
        return {k: v.clone() for k, v in cb.masks.items()}
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

def test_static_baseline_uses_the_same_initial_masks():
    masks = random_masks(digits_mlp(32), 0.9, seed=3)
    cb = DynamicSparseCallback(0.9, 'set', update_every=1000, seed=3)   # no update within one epoch
    learn = learner(cbs=[cb]); learn.fit(1, 1e-3)
    assert all(torch.equal(masks[k], cb.masks[k]) for k in masks)
    fixed = learner(cbs=[FixedSparsityCallback(masks)]); fixed.fit(1, 1e-3)
    for k, m in masks.items(): assert (fixed.model.get_parameter(k)[~m] == 0).all()

def test_second_fit_keeps_connectivity_and_state_dict_is_plain():
    cb = DynamicSparseCallback(0.8, 'rigl', update_every=5, stop_pct=0.5)
    learn = learner(cbs=[cb])
    learn.fit(1, 1e-2)
    after1 = {k: v.clone() for k, v in cb.masks.items()}
    assert set(learn.model.state_dict()) == set(digits_mlp(32).state_dict())
    digits_mlp(32).load_state_dict(learn.model.state_dict(), strict=True)
    chk = CheckDST()
    learn.fit(1, 1e-3, cbs=[chk])
    assert len(cb.history) > 0 and chk.updates == sum(h['moved'] > 0 for h in cb.history) > 0   # a new cycle of updates ...
    assert all(torch.equal(chk.first[k], after1[k]) for k in after1)  # ... from the masks the first fit ended with
    assert learn.recorder.metric_names[-2] == 'sparsity' and learn.recorder.values[-1][-1] == pytest.approx(0.8, abs=1e-3)

def test_resume_without_checkpoint_data_starts_at_the_epoch():
    "fit_one_cycle(start_epoch=2) on weights without our checkpoint data, after a `validate()` left the valid loader's length in `n_iter`"
    cb = DynamicSparseCallback(0.8, 'set', update_every=5, stop_pct=0.75)
    learn = learner(cbs=[cb, CheckDST()])
    learn.validate()
    learn.fit_one_cycle(4, 1e-2, start_epoch=2)
    n = len(learn.dls.train)
    assert cb.clock == 4 * n
    steps = [s for s in range(2 * n + 1, 4 * n + 1) if s % 5 == 0 and s < 0.75 * 4 * n]  # the steps of epochs 2 and 3 before stop_pct
    assert steps and [h['step'] for h in cb.history] == steps
    for h in cb.history: assert h['pct'] == h['step'] / (4 * n) and h['fraction'] == pytest.approx(cb.policy.fraction_at(h['step'], 4 * n))

def test_sparse_model_keeps_its_zeros_as_masks():
    "A fresh Learner and callback on the plain state dict saved after a DST fit start from its zeros, not new random masks"
    kw = dict(sparsity=0.9, regrow='rigl', update_every=5, stop_pct=0.5, layer_type=CONV_LIN)
    a = learner(digits_cnn(8), cbs=[DynamicSparseCallback(**kw)], shuffle=False)
    a.fit_one_cycle(2, 1e-2)
    sd = {k: v.clone() for k, v in a.model.state_dict().items()}
    b = learner(digits_cnn(8), cbs=[DynamicSparseCallback(**{**kw, 'update_every': 10**6})], shuffle=False, seed=1)
    b.model.load_state_dict(sd, strict=True)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*exact zeros')  # every layer has its zeros: no warning that some draw at random
        b.fit(1, 0.)                     # lr 0 and no update: only the masks could change a weight
    for k, m in dst_cb(a).masks.items():
        w = sd[k].reshape(-1); k0 = round(0.9 * w.numel()); zeros = (w == 0).nonzero().squeeze(1)
        assert len(zeros) >= k0 and m.reshape(-1)[w != 0].all(), k  # the fit's masks hold: its zeros are at least the masked ones
        expected = torch.ones_like(w, dtype=torch.bool); expected[zeros[:k0]] = False  # (a regrown weight still at zero: lowest index first)
        assert torch.equal(dst_cb(b).masks[k].reshape(-1), expected), k
        assert torch.equal(b.model.get_parameter(k), sd[k]), k  # no trained weight was zeroed

def test_skipped_steps_do_not_count():
    cb = DynamicSparseCallback(0.9, 'rigl', update_every=4, stop_pct=1.)
    learn = learner(cbs=[cb, SkipSteps(), CheckDST()])
    learn.fit(1, 1e-2)
    good = len(learn.dls.train) - 5
    assert [h['step'] for h in cb.history] == list(range(4, good, 4))

def test_real_grad_scaler_skips_do_not_count():
    "fastai's fp16 AMP on the CPU with a real `GradScaler` whose scale starts too high: it skips the first steps itself"
    cb, cnt = DynamicSparseCallback(0.9, 'rigl', update_every=4, stop_pct=1.), CountSteps()
    learn = learner(cbs=[cb, CheckDST(), cnt, CPUMixedPrecision(init_scale=2.**30)])
    learn.fit(1, 1e-2)
    n = len(learn.dls.train)
    assert cnt.pred_dtypes == {torch.float16} and cnt.skipped >= 5 and cnt.done + cnt.skipped == n
    assert [h['step'] for h in cb.history] == list(range(4, cnt.done, 4))  # only real steps count (the last is not before stop_pct)
    assert [h['pct'] for h in cb.history] == [s / n for s in range(4, cnt.done, 4)]  # nor do skipped batches move the clock

def test_gradient_accumulation_stops_at_stop_pct():
    "fastai's `GradientAccumulation`, one step per two batches: updates every `update_every` batches of the clock, stopping at `stop_pct` of them"
    cb, chk = DynamicSparseCallback(0.9, 'rigl', update_every=4, stop_pct=0.75), CheckDST()
    learn = learner(cbs=[cb, chk])
    learn.add_cb(GradientAccumulation(2 * learn.dls.bs))
    learn.fit(2, 1e-2)
    n = 2 * len(learn.dls.train)
    assert chk.n == n and chk.grown > 0
    assert [h["step"] for h in cb.history] == [s for s in range(4, n + 1, 4) if s < 0.75 * n]
    for h in cb.history: assert h['pct'] == h['step'] / n and h['fraction'] == pytest.approx(cb.policy.fraction_at(h['step'], n))

def test_erk_weighted_mean_and_engine_use():
    for model, s in [(digits_cnn(32), 0.9), (digits_cnn(32), 0.95), (digits_mlp(256), 0.9), (digits_mlp(256), 0.95)]:
        sps = erk_sparsities(model, s)
        layers = select_layers(model, CONV_LIN)
        n = {k: m.weight.numel() for k, m in layers.items()}
        N = sum(n.values())
        assert sum(round(sps[k] * n[k]) for k in sps) == round(s * N)              # exact integer count
        assert abs(sum(sps[k] * n[k] for k in sps) - s * N) <= 0.5 + 1e-9          # mean within 0.5/N of the target
        # density of every non-dense layer proportional to sum(shape)/prod(shape), up to one weight of rounding
        raw = {k: sum(m.weight.shape) / n[k] for k, m in layers.items()}
        eps = {k: (1 - sps[k]) / raw[k] for k in sps if sps[k] > 0}
        e0 = (N * (1 - s) - sum(n[k] for k in sps if sps[k] == 0)) / sum(raw[k] * n[k] for k in eps)
        for k in eps: assert abs((1 - sps[k]) * n[k] - e0 * raw[k] * n[k]) <= 1 + 1e-9
    # used as the initial distribution of gradual pruning: exact per-layer counts
    model = digits_cnn(8)
    sps = erk_sparsities(model, 0.8)
    cb = SparsifyCallback(sps, schedule=linear)
    learner(model, cbs=[cb]).fit(1, 1e-3)
    rep = cb.sparsity_report().set_index('layer')
    for k, t in sps.items(): assert rep.loc[k, 'zeros'] == round(t * rep.loc[k, 'params'])

def test_erk_dense_layers_when_over_one():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1000), nn.Linear(1000, 1000))
    sps = erk_sparsities(model, 0.5, nn.Linear)
    assert sps['0'] == 0 and sps['1'] < 0.5 < sps['2']
    assert sum(round(sps[k] * m.weight.numel()) for k, m in zip('012', model)) == round(0.5 * (9 + 3000 + 10**6))

@pytest.mark.parametrize('kwargs, match', [
    (dict(sparsity=0.9, regrow='random'), "regrow='random' is not valid; choose one of \\['rigl', 'set'\\]"),
    (dict(sparsity=0.9, distribution='ER'), "distribution='ER' is not valid.*Did you mean 'erk'"),
    (dict(sparsity=0.9, fraction=0), 'fraction must be a finite number > 0 and <= 1, got 0.0'),
    (dict(sparsity=0.9, fraction=1.2), 'fraction must be a finite number > 0 and <= 1, got 1.2'),
    (dict(sparsity=0.9, fraction='0.3'), 'fraction must be a finite number'),
    (dict(sparsity=0.9, update_every=0), 'update_every=0 must be a positive integer'),
    (dict(sparsity=0.9, update_every=-3), 'update_every=-3'),
    (dict(sparsity=0.9, update_every=10.), 'update_every=10.0'),
    (dict(sparsity=0.9, stop_pct=0), 'stop_pct must be a finite number > 0 and <= 1, got 0.0'),
    (dict(sparsity=0.9, stop_pct=1.5), 'stop_pct must be a finite number > 0 and <= 1, got 1.5'),
    (dict(sparsity=150), 'sparsity=150.0 is out of range'),
    (dict(sparsity={}), 'empty dict'),
    (dict(sparsity={'1': 0.5}, distribution='erk'), 'per-layer dict'),
    (dict(sparsity=0.9, layer_type='Linear'), 'layer_type must be'),
    (dict(sparsity=0.9, seed=1.5), 'seed must be an integer'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match): DynamicSparseCallback(**kwargs)

@pytest.mark.parametrize('kwargs, match', [
    (dict(sparsity=0.9, layer_type=nn.Conv1d), 'select no layer'),
    (dict(sparsity={'conv1': 0.3}), 'matches no layer'),
    (dict(sparsity=0.9, exclude='9'), 'matches no layer'),
])
def test_layer_errors_before_any_weight_is_touched(kwargs, match):
    learn = learner(cbs=[DynamicSparseCallback(**kwargs)])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=match): learn.fit(1, 1e-3)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k])

def test_drop_and_grow_on_gpu_tensors_if_available():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 64, device=dev) < 0.1
    w = torch.randn(64, 64, device=dev) * mask
    new, drop, grow = drop_and_grow(mask, w, 50, torch.rand(64, 64, device=dev), g)
    assert new.device == mask.device and int(new.sum()) == int(mask.sum()) and int(grow.sum()) == 50
