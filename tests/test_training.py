"""The guarantees every callback that trains with masks shares (`MaskedTraining`), run over each of them with real fastai
training on scikit-learn's digits: masks and optimizer state held after every step, the clock (resume, `start_epoch`,
skipped steps, gradient accumulation), `learn.export`, and a clean Learner however a fit ends. Model, data and masks live on
the test device (`FASTSPARSE_TEST_DEVICE`: the CPU by default, a CUDA GPU with `cuda`)."""
import hashlib, pickle, time, warnings
from functools import partial
import pytest, torch, torch.nn as nn
from fastai.basics import (Learner, Callback, Adam, SGD, RAdam, OptimWrapper, Optimizer, CrossEntropyLossFlat,
                           accuracy, load_learner, set_seed, ranger)
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastsparse.training import MaskedTraining, SparsityColumn, step_can_move_zeros
from fastsparse.callback import SparsifyCallback, FixedSparsityCallback
from fastsparse.dst import random_masks
from fastsparse.callback import DynamicSparseCallback
from fastsparse.regularize import RegularizeCallback
from fastsparse.schedule import linear
from fastsparse.demo import digits_dls, digits_cnn, digits_mlp
from cpu_amp import fp16_scaler, CountSteps
from masks_held import masked, check_masks, CheckMasks, SkipSteps
from devices import DEVICE, ON_CUDA

CONV_LIN = (nn.Conv2d, nn.Linear)
KINDS = {
    'sparsify': lambda: SparsifyCallback(0.8, schedule=linear.with_pcts(0., 0.75), layer_type=CONV_LIN),
    'dst': lambda: DynamicSparseCallback(0.8, 'rigl', update_every=5, layer_type=CONV_LIN),
    'fixed': lambda: FixedSparsityCallback(random_masks(digits_cnn(8), 0.8, layer_type=CONV_LIN, seed=1)),
}
kinds = pytest.mark.parametrize('kind', list(KINDS))

def learner(model=None, cbs=None, shuffle=True, seed=0, **kw):
    set_seed(seed, reproducible=True)
    model = model if model is not None else digits_cnn(8)
    return Learner(digits_dls(shuffle=shuffle, device=DEVICE), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs, **kw)

def plain_keys(): return list(digits_cnn(8).state_dict())

def mask_hash(masks):
    h = hashlib.sha256()
    for k in sorted(masks): h.update(k.encode()); h.update(masks[k].cpu().numpy().tobytes())
    return h.hexdigest()

def exact(cb):
    "Every selected layer has exactly its target count of masked weights"
    sp = cb.sparsifier
    for n, m in sp.layers.items():
        assert int((~cb.masks[f'{n}.weight']).sum()) == round(sp.targets[n] * m.weight.numel()), n

class Trace(Callback):
    "Record, after every epoch, the mask hash and the clock"
    order = MaskedTraining.order + 1
    def __init__(self): self.rows = []
    def after_epoch(self): self.rows.append((self.epoch, mask_hash(masked(self.learn).masks), masked(self.learn).clock))

# ---- masks hold
adamw = partial(OptimWrapper, opt=partial(torch.optim.AdamW, weight_decay=0.1))
@kinds
@pytest.mark.parametrize('opt', ['Adam', 'SGD_mom', 'AdamW_torch'])
def test_masks_and_state_hold_after_every_step(kind, opt):
    opt_func = {'Adam': Adam, 'SGD_mom': partial(SGD, mom=0.9), 'AdamW_torch': adamw}[opt]
    cb, chk = KINDS[kind](), CheckMasks()
    learn = learner(cbs=[cb, chk], opt_func=opt_func)
    learn.fit(2, 1e-2, wd=0.01)
    assert chk.n == 2 * len(learn.dls.train)
    exact(cb)

# ---- the clock: resume, start_epoch, skipped steps, gradient accumulation
@kinds
def test_resume_reproduces_trajectory(kind, tmp_path):
    a_trace, b_trace = Trace(), Trace()
    a = learner(cbs=[KINDS[kind]()], shuffle=False, path=tmp_path)
    a.fit_one_cycle(4, 1e-2, cbs=[a_trace, SaveModelCallback(every_epoch=True, with_opt=True, fname='ck')])
    b = learner(cbs=[KINDS[kind]()], shuffle=False, path=tmp_path, seed=123)  # other init: the load must override it
    b.load('ck_1', with_opt=True)
    b.fit_one_cycle(4, 1e-2, start_epoch=2, cbs=[b_trace])
    assert [r for r in a_trace.rows if r[0] >= 2] == [r for r in b_trace.rows if r[0] >= 2]  # (epochs 0, 1 are skipped: fastai still calls after_epoch)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, atol=1e-6), ka
    ck = torch.load(tmp_path/'models'/'ck_1.pth', weights_only=False)['model']
    assert ck['_fastsparse']['callback'] == type(masked(a)).__name__ and ck['_fastsparse']['clock'] == 2 * len(a.dls.train)
    assert list(a.model.state_dict()) == plain_keys() and list(b.model.state_dict()) == plain_keys()

@kinds
def test_start_epoch_without_checkpoint_data_starts_the_clock_there(kind):
    "`fit_one_cycle(start_epoch=2)` on weights without our checkpoint data, after a `validate()` left another loader's length in `n_iter`"
    cb, trace = KINDS[kind](), Trace()
    learn = learner(cbs=[cb])
    learn.validate()
    learn.fit_one_cycle(4, 1e-2, start_epoch=2, cbs=[trace])
    n = len(learn.dls.train)
    assert [r[2] for r in trace.rows if r[0] >= 2] == [3 * n, 4 * n] and cb.clock == cb.total == 4 * n

@kinds
def test_skipped_steps_do_not_move_the_clock(kind):
    cb, chk = KINDS[kind](), CheckMasks()
    learn = learner(cbs=[cb, SkipSteps(), chk])
    learn.fit(2, 1e-2)
    assert cb.clock == 2 * len(learn.dls.train) - 5 and chk.n == 2 * len(learn.dls.train)
    exact(cb)

@kinds
def test_real_grad_scaler_skips_do_not_move_the_clock(kind):
    "fastai's fp16 AMP (on the CPU through `cpu_amp`) with a real `GradScaler` whose scale starts too high: it skips the first steps itself"
    cb, chk, cnt = KINDS[kind](), CheckMasks(), CountSteps()
    learn = learner(cbs=[cb, chk, cnt, fp16_scaler(init_scale=2.**30)])
    learn.fit(2, 1e-2)
    n = 2 * len(learn.dls.train)
    assert cnt.pred_dtypes == {torch.float16} and cnt.skipped >= 10 and cnt.done + cnt.skipped == n
    assert cb.clock == cnt.done and chk.n == n
    exact(cb)

@kinds
def test_gradient_accumulation_counts_every_batch(kind):
    "fastai's `GradientAccumulation` takes one step per two batches on purpose: every batch moves the clock"
    cb, chk = KINDS[kind](), CheckMasks()
    learn = learner(cbs=[cb, chk])
    learn.add_cb(GradientAccumulation(2 * learn.dls.bs))
    learn.fit(2, 1e-2)
    n = 2 * len(learn.dls.train)
    assert n % 2 == 0 and chk.n == n // 2 and cb.clock == cb.total == n
    exact(cb)

# ---- export, validate, a clean state dict
@kinds
def test_export_and_load_learner(kind, tmp_path):
    learn = learner(cbs=[KINDS[kind]()], path=tmp_path)
    learn.fit(1, 1e-2)
    learn.export('export.pkl')
    learn2 = load_learner(tmp_path/'export.pkl', cpu=not ON_CUDA)
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); learn2.model.eval()
    assert all(torch.equal(v, learn2.model.state_dict()[k]) for k, v in learn.model.state_dict().items())
    assert torch.equal(learn.model(x), learn2.model(x))
    digits_cnn(8).load_state_dict(learn.model.state_dict(), strict=True)

@kinds
def test_validate_and_get_preds_after_fit_change_nothing(kind):
    cb = KINDS[kind]()
    learn = learner(cbs=[cb])
    learn.fit(1, 1e-2)
    masks, rep = {k: v.clone() for k, v in cb.masks.items()}, cb.sparsity_report()
    assert learn.sparsity_report() is rep
    res = learn.validate(); learn.get_preds()
    assert len(res) == 2   # loss and accuracy: no sparsity column outside a fit
    assert cb.sparsity_report() is rep and all(torch.equal(masks[k], cb.masks[k]) for k in masks)

# ---- however a fit ends
class Boom(Callback):
    "Raise in the second epoch, while training (or while validating)"
    order = 90
    def __init__(self, exc, phase='train'): self.exc, self.phase = exc, phase
    def after_batch(self):
        if self.epoch == 1 and self.iter == 1 and self.training == (self.phase == 'train'): raise self.exc('stop here')

def check_clean(learn, cb):
    assert list(learn.model.state_dict()) == plain_keys()
    digits_cnn(8).load_state_dict(learn.model.state_dict(), strict=True)
    assert not any(isinstance(m, SparsityColumn) for m in learn.metrics)
    for name, mask in cb.masks.items(): assert (learn.model.get_parameter(name)[~mask] == 0).all(), name

@kinds
@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize('held', [False, True], ids=['given_to_fit', 'held_by_learner'])
def test_a_fit_that_dies_leaves_the_learner_clean(kind, exc, held):
    cb = KINDS[kind]()
    learn = learner(cbs=[cb] if held else None)
    with pytest.raises(exc, match='stop here'): learn.fit_one_cycle(3, 1e-2, cbs=[Boom(exc)] + ([] if held else [cb]))
    check_clean(learn, cb)
    learn.fit(1, 1e-2, cbs=None if held else [cb])  # the next fit works and shows one column
    assert learn.recorder.metric_names.items.count('sparsity') == 1
    assert learn.recorder.values[-1][-1] == pytest.approx(cb.current_sparsity())
    check_clean(learn, cb)

@kinds
def test_a_fit_that_dies_while_validating(kind):
    "Held by the Learner, a fit that dies in validation leaves the column until the next fastai call, which cleans it"
    cb = KINDS[kind]()
    learn = learner(cbs=[cb])
    with pytest.raises(RuntimeError, match='stop here'): learn.fit(2, 1e-2, cbs=[Boom(RuntimeError, 'valid')])
    assert list(learn.model.state_dict()) == plain_keys()
    assert len(learn.validate()) == 2   # validate() cleans up first: loss and accuracy only
    check_clean(learn, cb)

# ---- bad arguments, for the callbacks that take them
@pytest.mark.parametrize('make', [lambda u: SparsifyCallback(0.5, update_every=u), lambda u: DynamicSparseCallback(0.5, update_every=u)],
                         ids=['sparsify', 'dst'])
@pytest.mark.parametrize('u', [0, -3, 2.5, True, 'batch'])
def test_bad_update_every(make, u):
    with pytest.raises(ValueError, match=f"update_every={u!r} must be a positive integer"): make(u)

def test_fixed_masks_bad_arguments():
    with pytest.raises(TypeError, match='non-empty dict'): FixedSparsityCallback({})
    learn = learner(cbs=[FixedSparsityCallback({'0': torch.ones(3, 3, dtype=torch.bool)})])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"masks\['0'\] has shape \(3, 3\) but 0.weight has shape \(8, 1, 3, 3\)"): learn.fit(1)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v.cpu(), before[k].cpu())  # (the fit moved the model to the device)

# ---- the per-step re-zero: skipped only when a step provably cannot move a zero
class CheckAfterBatch(Callback):
    "The same check after every training batch: `after_batch` does not count as writing weights, so the re-zero may be skipped"
    def before_fit(self): self.n = 0
    def after_batch(self):
        if self.training: check_masks(self.learn); self.n += 1

class Push(Callback):
    "Writes every conv weight after the step, before our callback looks: only the re-zero can undo it"
    order = MaskedTraining.order - 1
    @torch.no_grad()
    def after_step(self):
        for m in self.learn.model.modules():
            if isinstance(m, nn.Conv2d): m.weight.add_(0.5)

def _fit(opt_func=Adam, extra=(), **kw):
    "Two epochs, the schedule over the first: in the second the masks are settled and only their upkeep holds the zeros"
    cb, chk = SparsifyCallback(0.8, schedule=linear.with_pcts(0., 0.5)), CheckAfterBatch()
    learn = learner(cbs=[cb, chk, *extra], opt_func=opt_func)
    learn.fit(2, 1e-3, **kw)
    assert chk.n == 2 * len(learn.dls.train)  # masks held after every batch
    rep = cb.sparsity_report().set_index('layer').drop('total')
    assert (rep.zeros == (0.8 * rep.params).round()).all()
    return cb

@pytest.mark.parametrize('name,opt_func,kw', [
    ('Adam', Adam, {}), ('Adam L2', partial(Adam, decouple_wd=False), dict(wd=0.1)), ('RAdam', RAdam, {}),
    ('torch AdamW', partial(OptimWrapper, opt=partial(torch.optim.AdamW, weight_decay=0.1)), {})])
def test_rezero_skipped_for_known_optimizers(name, opt_func, kw):
    assert _fit(opt_func, **kw).rezero_after_step() is False

@pytest.mark.parametrize('case', ['ranger', 'clamp', 'push', 'user_step'])
def test_rezero_kept_when_a_step_could_move_zeros(case):
    opt_func, extra = Adam, []
    if case == 'ranger': opt_func = ranger  # Lookahead: slow weights live outside the optimizer state
    if case == 'clamp': extra = [RegularizeCallback(target=0.01, strength=1e-4, clamp=(0.01, 1.))]  # clamps zeros up to 0.01 after the step
    if case == 'push': extra = [Push()]
    if case == 'user_step': extra = [type('UserCb', (Callback,), {'after_step': lambda self: None})()]
    assert _fit(opt_func, extra).rezero_after_step() is True

class Timer(Callback):
    "Reads the clock after backward and after the step, as a benchmark would: it writes nothing"
    def before_fit(self): self.n = 0
    def after_backward(self): self.t = time.perf_counter()
    def after_step(self): self.n += 1

def test_rezero_skipped_for_a_callback_that_says_it_only_reads():
    assert _fit(extra=[Timer()]).rezero_after_step() is True  # it runs after backward and after the step: not trusted by default
    ro = type('ReadOnlyTimer', (Timer,), {'can_move_zeros': False})()
    cb = _fit(extra=[ro])
    assert cb.rezero_after_step() is False and ro.n == 2 * len(cb.learn.dls.train)
    t = Timer(); t.can_move_zeros = False  # an instance attribute is read too
    assert _fit(extra=[t]).rezero_after_step() is False

def test_fit_state_not_pickled():
    "`learn.export()` pickles the callback: its core (masks, views, the optimizer) and the policy's hooks stay out"
    cb = _fit()
    st = cb.__getstate__()
    assert 'core' not in st and not {'_hooks', '_rewind'} & set(st['policy'].__getstate__())
    cb2 = pickle.loads(pickle.dumps(cb))
    assert cb2.sparsifier is None and cb2.clock == 0 and cb2.policy.sparsity == cb.policy.sparsity and cb2.policy._hooks == []

def test_step_can_move_zeros_without_optimizer():
    learn = learner()
    assert step_can_move_zeros(learn, []) is True  # no optimizer yet: nothing is known
    learn.create_opt()
    assert step_can_move_zeros(learn, list(learn.model.parameters())) is False
    assert step_can_move_zeros(learn, [nn.Parameter(torch.zeros(3))]) is True  # not the optimizer's own parameter
    learn = learner(opt_func=partial(Adam, eps=0.)); learn.create_opt()
    assert step_can_move_zeros(learn, list(learn.model.parameters())) is True  # 0/(sqrt(0)+0) is NaN, not 0

class AddPushMidEpoch(Callback):
    "Adds a callback that writes weights after the step, in the middle of the settled epoch"
    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 3: self.learn.add_cb(Push())

def test_callback_added_mid_epoch_turns_the_rezero_on():
    cb = _fit(extra=[AddPushMidEpoch()])  # `_fit` checks the masks after every batch, before and after the addition
    assert cb.rezero_after_step() is True and any(isinstance(c, Push) for c in cb.learn.cbs)

class Idle(Callback): "Does nothing; stands in the middle of the callback list"

class SwapInPushMidEpoch(Callback):
    "Replaces, in place, a callback in the middle of the list by one that writes weights after the step"
    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 3:
            cbs = self.learn.cbs
            i = [j for j, c in enumerate(cbs) if isinstance(c, Idle)][0]
            assert 0 < i < len(cbs) - 1  # neither end: the list keeps its length and its last entry
            push = Push(); push.learn = self.learn
            cbs[i] = push

def test_callback_swapped_in_place_turns_the_rezero_on():
    cb = _fit(extra=[Idle(), SwapInPushMidEpoch()])  # masks checked after every batch, before and after the swap
    assert cb.rezero_after_step() is True and not any(isinstance(c, Idle) for c in cb.learn.cbs)

def _nudge(p, lr, **kwargs):
    "A stepper not on the safe list: it moves every weight, zeros included"
    p.data.add_(1e-3)

class NewOptMidEpoch(Callback):
    "Replaces the optimizer in the middle of the settled epoch with one whose step moves zeros"
    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 3:
            self.learn.opt_func = partial(Optimizer, cbs=[_nudge]); self.learn.create_opt()

def test_optimizer_replaced_mid_epoch_turns_the_rezero_on():
    cb = _fit(extra=[NewOptMidEpoch()])  # masks checked after every batch, before and after the replacement
    assert cb.rezero_after_step() is True

def test_new_model_between_fits_gets_the_masks():
    "The parameter cache follows `learn.model` itself: a model swapped in between fits is masked"
    torch.manual_seed(0)
    mask = (torch.rand(256, 64) > 0.5).to(DEVICE)
    cb, chk = FixedSparsityCallback({'1': mask}), CheckMasks()
    learn = learner(model=digits_mlp(), cbs=[cb, chk])
    with learn.no_logging(): learn.fit(1, 1e-3)
    assert int((learn.model[1].weight[~mask] != 0).sum()) == 0
    learn.model = digits_mlp()
    with learn.no_logging(): learn.fit(1, 1e-3)
    new = learn.model[1].weight
    assert int((new[~mask] != 0).sum()) == 0 and int((new[mask] != 0).sum()) == int(mask.sum())
    assert chk.n == len(learn.dls.train)
