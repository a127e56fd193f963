"End-to-end checks of SparsifyCallback with real fastai training on scikit-learn's digits."
import hashlib, pickle, time, warnings
from functools import partial
import pytest, torch, torch.nn as nn
from fastai.basics import Learner, Callback, Adam, SGD, OptimWrapper, CrossEntropyLossFlat, accuracy, load_learner, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai.callback.fp16 import MixedPrecision  # noqa: F401 (patches Learner.to_fp16 / to_bf16)
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastsparse.callback import SparsifyCallback
from fastsparse.schedule import linear, iterative, one_shot, agp, Schedule, sched_linear
from fastsparse.demo import digits_dls, digits_cnn, digits_mlp
from fastsparse.nm import is_nm
from cpu_amp import CPUMixedPrecision, CountSteps
from masks_held import check_masks, CheckMasks

def learner(model=None, cbs=None, shuffle=True, seed=0, **kw):
    set_seed(seed, reproducible=True)
    model = model if model is not None else digits_cnn(8)
    return Learner(digits_dls(shuffle=shuffle), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs, **kw)

def mask_hash(sp):
    h = hashlib.sha256()
    for k in sorted(sp.masks): h.update(k.encode()); h.update(sp.masks[k].cpu().numpy().tobytes())
    return h.hexdigest()

class Trace(Callback):
    "Record, after every epoch, the mask hash and sparsity of the SparsifyCallback"
    order = SparsifyCallback.order + 1
    def __init__(self): self.rows = []
    def after_epoch(self):
        cb = [c for c in self.learn.cbs if isinstance(c, SparsifyCallback)][0]
        self.rows.append((self.epoch, mask_hash(cb.sparsifier), cb.current_sparsity()))

def test_resume_from_plain_sparse_weights_follows_the_schedule(tmp_path):
    "start_epoch=2 on the plain weights saved after epoch 1 (no checkpoint data): the counts follow the uninterrupted run's"
    a = learner(cbs=[SparsifyCallback(0.8, schedule=linear)], shuffle=False, path=tmp_path)
    a.fit_one_cycle(4, 1e-2, cbs=[SaveModelCallback(every_epoch=True, fname='ck')])
    sd = {k: v for k, v in torch.load(tmp_path/'models'/'ck_1.pth', weights_only=False).items() if k != '_fastsparse'}  # the file holds one more entry: the callback's checkpoint
    cb = SparsifyCallback(0.8, schedule=linear)
    b = learner(cbs=[cb], shuffle=False, seed=1)
    b.model.load_state_dict(sd, strict=True)
    b.fit_one_cycle(4, 1e-2, start_epoch=2)
    ca = [c for c in a.cbs if isinstance(c, SparsifyCallback)][0]
    assert cb.history and [(h['pct'], h['sparsity']) for h in cb.history] == [(h['pct'], h['sparsity']) for h in ca.history if h['epoch'] >= 2]

class ZerosHeld(Callback):
    "After every optimizer step: every weight that was zero when the fit began is still zero; the selected layers' exact zero counts"
    order = SparsifyCallback.order + 1
    def before_fit(self):
        self.n, self.counts = 0, []
        self.zero = {n: m.weight == 0 for n, m in self.learn.model.named_modules() if isinstance(m, nn.Conv2d)}
    def after_step(self):
        check_masks(self.learn); self.n += 1
        mods = dict(self.learn.model.named_modules())
        for n, z in self.zero.items(): assert (mods[n].weight[z] == 0).all(), n
        self.counts.append({n: int((mods[n].weight == 0).sum()) for n in self.zero})

@pytest.mark.parametrize('context', ['local', 'global'])
def test_second_fit_keeps_the_masks(context):
    "A second fit with the same callback starts at the sparsity the first ended with: its masks hold, they are not redrawn from 0%"
    cb, held = SparsifyCallback(0.8, 'weight', context, schedule=agp.with_pcts(0., 0.5)), ZerosHeld()
    learn = learner(cbs=[cb])
    learn.fit_one_cycle(2, 1e-2)
    masks, n_hist = {k: v.clone() for k, v in cb.sparsifier.masks.items()}, len(cb.history)
    learn.fit_one_cycle(2, 1e-2, cbs=[held])
    assert held.n == 2 * len(learn.dls.train) and all(c == held.counts[0] for c in held.counts)  # the same zeros at every step
    assert masks.keys() == cb.sparsifier.masks.keys() and all(torch.equal(masks[k], cb.sparsifier.masks[k]) for k in masks)
    assert n_hist > 0 and cb.history == []  # no update: the counts were reached before the fit (the history is per fit)
    if context == 'local':
        for n, row in learn.sparsity_report().set_index('layer').drop('total').iterrows():
            assert row.zeros == round(0.8 * row.params) and row.target == 0.8, n
    else: assert sum(held.counts[0].values()) == round(0.8 * sum(m.weight.numel() for m in cb.sparsifier.layers.values()))

def test_sparse_model_schedule_starts_at_its_sparsity(tmp_path):
    "A fresh callback on a 50%-sparse state dict: its zeros stay zero and the schedule runs from 50% to the 80% asked; resume too"
    a = learner(cbs=[SparsifyCallback(0.5, schedule=one_shot)])
    a.fit(1, 1e-2)
    sd = {k: v.clone() for k, v in a.model.state_dict().items()}
    cb, held, trace = SparsifyCallback(0.8, schedule=linear), ZerosHeld(), Trace()
    b = learner(cbs=[cb], shuffle=False, seed=1, path=tmp_path)
    b.model.load_state_dict(sd)
    b.fit_one_cycle(4, 1e-2, cbs=[held, trace, SaveModelCallback(every_epoch=True, with_opt=True, fname='ck')])
    sizes = {n: m.weight.numel() for n, m in cb.sparsifier.layers.items()}
    assert held.counts[0] == {n: round(0.5 * sizes[n]) for n in sizes}  # not fewer zeros after the first step (lin starts at 0)
    n, total = len(b.dls.train), 4 * len(b.dls.train)
    for h in cb.history:   # the schedule's fraction of the way from 50% to 80%, layer by layer
        assert h['sparsity'] == pytest.approx(sum(round((0.5 + h['schedule'] * 0.3) * sizes[k]) for k in sizes) / sum(sizes.values()))
    assert {k: int((m.weight == 0).sum()) for k, m in cb.sparsifier.layers.items()} == {k: round(0.8 * sizes[k]) for k in sizes}  # exact at the end
    # resumed from a checkpoint of this fit, the start (50%) comes from the checkpoint, not from the zeros it has then
    c = learner(cbs=[SparsifyCallback(0.8, schedule=linear)], shuffle=False, seed=2, path=tmp_path)
    c_trace = Trace()
    c.load('ck_1', with_opt=True)
    c.fit_one_cycle(4, 1e-2, start_epoch=2, cbs=[c_trace])
    assert [r for r in trace.rows if r[0] >= 2] == [r for r in c_trace.rows if r[0] >= 2]
    for (ka, va), (kc, vc) in zip(b.model.state_dict().items(), c.model.state_dict().items()):
        assert ka == kc and torch.equal(va, vc), ka

def test_zero_initialized_layer_is_not_taken_for_pruned():
    "A layer of all zeros (zero-init) starts dense like any fresh layer: no start point, masks from the criterion"
    model = digits_cnn(8); nn.init.zeros_(dict(model.named_modules())['12'].weight)  # the classifier (Linear)
    cb = SparsifyCallback(0.5, schedule=linear, layer_type=(nn.Conv2d, nn.Linear))
    learner(model, cbs=[cb]).fit(1, 1e-2)
    assert cb.history[0]['sparsity'] < 0.05  # the first update is the schedule's first step from 0%
    for m in cb.sparsifier.layers.values(): assert int((m.weight == 0).sum()) == round(0.5 * m.weight.numel())

def test_real_grad_scaler_skips_do_not_move_schedule():
    "fastai's fp16 AMP on the CPU with a real `GradScaler` whose scale starts too high: it skips the first steps itself"
    cb, chk, cnt = SparsifyCallback(0.9, schedule=linear, layer_type=(nn.Conv2d, nn.Linear)), CheckMasks(), CountSteps()
    learn = learner(cbs=[cb, chk, cnt, CPUMixedPrecision(init_scale=2.**30)])
    with pytest.warns(UserWarning, match='the sparsity jumped from') as w: learn.fit(2, 1e-3)
    n = 2 * len(learn.dls.train)
    assert f'skipped the optimizer step of {cnt.skipped} of {n} training batches' in str(w[-1].message)
    assert cnt.pred_dtypes == {torch.float16}                     # the forward really ran in float16
    assert cnt.skipped >= 10 and cnt.done + cnt.skipped == n      # the scaler halved 2**40 down to a finite gradient
    assert chk.n == n and cb.clock == cnt.done                    # masks held after every step; only real steps counted
    # the last update during training sits at the position of the last real step; the final target is forced after fit
    assert cb.history[-2]['pct'] == cnt.done / n and cb.history[-1]['pct'] == 1.
    for m in cb.sparsifier.layers.values(): assert int((m.weight == 0).sum()) == round(0.9 * m.weight.numel())

def test_gradient_accumulation_spans_the_fit():
    "fastai's `GradientAccumulation` cancels every other step on purpose: the schedule is still counted over the fit's batches"
    cb, chk = SparsifyCallback(0.9, schedule=agp.with_pcts(0., 0.5), layer_type=(nn.Conv2d, nn.Linear)), CheckMasks()
    learn = learner(cbs=[cb, chk])
    learn.add_cb(GradientAccumulation(2 * learn.dls.bs))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(4, 1e-2)
    n = 4 * len(learn.dls.train)
    assert n % 2 == 0 and chk.n == n // 2 and cb.clock == n       # one step per two batches; every batch moved the clock
    assert not [x for x in w if 'grad scaler' in str(x.message)]   # nothing was left for after the fit
    # the final counts reached by half-way, as the schedule says, then two epochs of fine-tuning with the masks fixed
    assert 0.45 < cb.history[-1]['pct'] <= 0.5 and cb.history[-1]['sparsity'] == cb.current_sparsity()
    for m in cb.sparsifier.layers.values(): assert int((m.weight == 0).sum()) == round(0.9 * m.weight.numel())

def test_lottery_ticket_rewind(tmp_path):
    torch.manual_seed(0)
    model = digits_cnn(8)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cb = SparsifyCallback(0.8, schedule=iterative, lth=True, rewind_epoch=0, reset_end=True, save_tickets=True)
    learn = learner(model=model, cbs=[cb], path=tmp_path)
    learn.fit(3, 1e-2)
    sd = learn.model.state_dict()
    for n in cb.sparsifier.layers:
        mask = cb.sparsifier.masks[f'{n}.weight']
        assert torch.equal(sd[f'{n}.weight'][mask], init[f'{n}.weight'][mask])  # survivors rewound to init
        assert (sd[f'{n}.weight'][~mask] == 0).all()
    assert torch.equal(sd['1.running_mean'], init['1.running_mean'])  # BatchNorm statistics rewound too
    assert len(list((tmp_path/'models').glob('ticket_*.pth'))) >= 3

def test_rewind_after_schedule_start_is_an_error():
    learn = learner(cbs=[SparsifyCallback(0.5, schedule=linear.with_pcts(0.2, 1.), lth=True, rewind_epoch=2)])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='rewind_epoch=2 comes after the schedule starts'):
        learn.fit(5, 1e-3)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k])

def test_gradual_nm():
    cb = SparsifyCallback(0.5, nm=True, schedule=linear, layer_type=nn.Linear, exclude='5')
    learn = learner(model=digits_mlp(64), cbs=[cb])
    learn.fit(2, 1e-3)
    s = [h['sparsity'] for h in cb.history]
    assert s == sorted(s) and len(s) > 3  # reached gradually
    for n, m in cb.sparsifier.layers.items(): assert is_nm(m.weight, 2, 4, dim=1)

@pytest.mark.parametrize('crit', ['taylor', 'wanda', 'random', 'movement', 'updating_magnitude_increase'])
def test_criteria_through_callback(crit):
    cb = SparsifyCallback(0.75, 'weight', 'global', crit, schedule=linear, layer_type=(nn.Conv2d, nn.Linear))
    learn = learner(cbs=[cb, CheckMasks()])
    learn.fit(1, 1e-3)
    N = sum(m.weight.numel() for m in cb.sparsifier.layers.values())
    assert sum(int((~cb.sparsifier.masks[f'{n}.weight']).sum()) for n in cb.sparsifier.layers) == round(0.75 * N)

def test_dict_targets_exact():
    targets = {'0': 0.5, '3': 80, '12': 0.25}  # a Linear head, a percentage, a fraction
    cb = SparsifyCallback(targets, schedule=agp)
    learn = learner(cbs=[cb])
    learn.fit(1, 1e-3)
    rep = cb.sparsity_report().set_index('layer')
    for n, t in {'0': 0.5, '3': 0.8, '12': 0.25}.items():
        assert rep.loc[n, 'zeros'] == round(t * rep.loc[n, 'params'])

def test_updates_only_when_counts_change():
    cb = SparsifyCallback(0.5, 'filter', schedule=linear, layer_type=nn.Linear)
    learn = learner(model=digits_mlp(16), cbs=[cb])
    learn.fit(2, 1e-3)
    # one history entry per step at which a layer's count of pruned rows changes: the linear schedule asks
    # round(0.5 * t/n * rows) of the 16, 16 and 10 rows after step t of the fit's n = 2 epochs * 22 batches
    n, rows = 2 * len(learn.dls.train), [16, 16, 10]
    counts = [tuple(round(0.5 * t / n * r) for r in rows) for t in range(n + 1)]
    changes = [t for t in range(1, n + 1) if counts[t] != counts[t - 1]]
    assert n == 44 and changes == [3, 5, 9, 14, 20, 23, 25, 31, 36, 40, 42]
    assert [h['step'] for h in cb.history] == changes   # the 16-row layers change 8 times, the 10-row one 5 times, twice at the same step
    cb2 = SparsifyCallback(0.5, schedule=linear, layer_type=nn.Linear, update_every='epoch')
    learn = learner(model=digits_mlp(16), cbs=[cb2])
    learn.fit(3, 1e-3)
    assert len(cb2.history) == 3

class MaskedShare(Callback):
    "After every training batch: the share of the selected weights that the masks mask, counted from the masks"
    order = SparsifyCallback.order + 1
    def __init__(self): self.seen = []
    def after_batch(self):
        if not self.training: return
        cb = [c for c in self.learn.cbs if isinstance(c, SparsifyCallback)][0]
        sp = cb.sparsifier
        ms = [sp.masks[sp.weight_name(n)] for n in sp.layers]
        self.seen.append(sum(int((~m).sum()) for m in ms) / sum(m.numel() for m in ms))

@pytest.mark.parametrize('context', ['local', 'global'])
def test_history_sparsity_is_the_masks(context):
    # the sparsity an update records (read from its exact counts) is the share the masks hold, at every update
    share = MaskedShare()
    cb = SparsifyCallback(0.9, 'weight', context, schedule=agp, layer_type=(nn.Conv2d, nn.Linear))
    learn = learner(cbs=[cb, share])
    learn.fit(2, 1e-3)
    steps = {h['step']: h['sparsity'] for h in cb.history}
    assert len(steps) > 20 and cb.history[-1]['sparsity'] == pytest.approx(0.9, abs=1e-3)
    for step, sparsity in steps.items(): assert sparsity == share.seen[step - 1], step
    assert cb.current_sparsity() == share.seen[-1]

@pytest.mark.parametrize('kwargs, match', [
    (dict(sparsity=1.5e2), 'out of range'),
    (dict(sparsity=float('nan')), 'NaN'),
    (dict(sparsity=0.5, granularity='filters'), "Did you mean 'filter'"),
    (dict(sparsity=0.5, context='globall'), "context='globall'"),
    (dict(sparsity=0.5, criteria='magnitude'), "criteria='magnitude'"),
    (dict(sparsity=0.5, schedule='agpp'), 'agp'),
    (dict(sparsity=0.5, update_every=0), 'update_every=0'),
    (dict(sparsity=0.5, rewind_epoch=-1), 'rewind_epoch must be an integer >= 0, got -1'),
    (dict(sparsity=0.5, reset_end=True), 'need lth=True'),
    (dict(sparsity={'0': 0.5}, context='global'), "needs context='local'"),
    (dict(sparsity=0.5, nm=(4, 2)), 'nm'),
    (dict(sparsity=0.5, round_to=0), 'round_to=0'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match): SparsifyCallback(**kwargs)

@pytest.mark.parametrize('kwargs, match', [
    (dict(sparsity=0.5, granularity='kernel', layer_type=nn.Linear), "not available for Linear"),
    (dict(sparsity=0.5, layer_type=nn.Conv1d), 'select no layer'),
    (dict(sparsity={'conv1': 0.3}), 'matches no layer'),
])
def test_layer_errors_before_any_weight_is_touched(kwargs, match):
    learn = learner(cbs=[SparsifyCallback(**kwargs)])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=match): learn.fit(1, 1e-3)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k])

def test_invalid_schedule_window():
    with pytest.raises(ValueError, match='start_pct'): Schedule(sched_linear, 0.8, 0.2)
    with pytest.raises(ValueError, match='end_pct'): Schedule(sched_linear, 0., 1.5)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_fp16_gpu_masks_hold():
    chk = CheckMasks()
    torch.manual_seed(0)
    learn = Learner(digits_dls(device=torch.device('cuda')), digits_cnn(8), loss_func=CrossEntropyLossFlat(),
                    cbs=[SparsifyCallback(0.9, schedule=linear), chk]).to_fp16()
    learn.fit(2, 1e-2)
    assert chk.n > 0
