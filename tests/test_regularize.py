"RegularizeCallback on a real task (scikit-learn's digits): the fraction of weights near the target goes up."
import pickle
import pytest, torch, torch.nn as nn
from torch.utils.data import TensorDataset
from sklearn.datasets import load_digits
from fastai.basics import Learner, DataLoaders, CrossEntropyLossFlat, accuracy, set_seed, SGD, Callback, load_learner
from fastai.callback.core import CancelFitException
import fastai.callback.schedule  # fit_one_cycle
from fastsparse.regularize import RegularizeCallback
from fastsparse.schedule import linear

class TDS(TensorDataset):
    "A TensorDataset that `learn.export` can empty"
    def new_empty(self): return TDS(*(t[:0] for t in self.tensors))

def make_dls():
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32)/16, torch.tensor(y)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, va = idx[:1400], idx[1400:]
    return DataLoaders.from_dsets(TDS(X[tr], y[tr]), TDS(X[va], y[va]), bs=128, num_workers=0, device='cpu')

def learner(*cbs, **kw):
    "A fresh MLP on fresh DataLoaders, both made after seeding: every fit sees the same batches in the same order"
    set_seed(0)
    dls = make_dls()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=list(cbs), **kw)

def frac_near(model, t, eps=1e-3):
    w = torch.cat([m.weight.detach().flatten() for m in model if isinstance(m, nn.Linear)])
    return ((w - t).abs() <= eps).float().mean().item()

def fit(learn, n=4, lr=2e-2):
    with learn.no_logging(): learn.fit_one_cycle(n, lr)
    return learn

@pytest.fixture(scope='module')
def plain(): return fit(learner())

@pytest.mark.parametrize('t', [0., 0.05])
def test_near_target_goes_up(plain, t):
    reg = RegularizeCallback(target=t, strength=1e-3, schedule=linear)
    learn = fit(learner(reg))
    near, base = frac_near(learn.model, t), frac_near(plain.model, t)
    assert near > 5*base, (near, base)
    names = list(learn.recorder.metric_names)
    col = names.index('near_target') - 1  # values have no 'epoch' column
    per_epoch = [v[col] for v in learn.recorder.values]
    assert per_epoch[-1] > 2*per_epoch[0], per_epoch  # it rises over training, with the strength
    assert per_epoch[-1] == pytest.approx(near, abs=1e-6)
    assert reg.report().near_target.iloc[-1] == pytest.approx(near, abs=1e-6)
    acc, acc_plain = learn.recorder.values[-1][names.index('accuracy') - 1], plain.recorder.values[-1][-1]
    assert acc > acc_plain - .05, (acc, acc_plain)

class MinAfterStep(Callback):
    "Record the smallest selected weight after every optimizer step (after the clamp)"
    order = 50
    def before_fit(self): self.mins = []
    def after_step(self): self.mins.append(min(m.weight.min().item() for m in self.learn.model if isinstance(m, nn.Linear)))

def test_clamp_keeps_weights_above_target():
    probe = MinAfterStep()
    learn = fit(learner(RegularizeCallback(target=.05, strength=1e-3, clamp=(.05, None)), probe), n=2)
    assert len(probe.mins) == 2*len(learn.dls.train)
    assert min(probe.mins) >= .05

class GradProbe(Callback):
    "Keep the gradients of the first batch and stop"
    order = 60
    def after_backward(self):
        self.grads = [m.weight.grad.clone() for m in self.learn.model if isinstance(m, nn.Linear)]
        raise CancelFitException()

@pytest.mark.parametrize('penalty', ['l1', 'l2', 'group_l1', 'group_l2'])
def test_penalty_is_in_the_backward(penalty):
    "The gradient differs from the task gradient by exactly strength * d penalty / dw"
    k, t = 1e-2, .02
    grads = {}
    for s in (0., k):
        probe = GradProbe()
        learn = learner(RegularizeCallback(target=t, penalty=penalty, strength=s, layer_type=nn.Linear), probe, opt_func=SGD)
        w0 = [m.weight.detach().clone() for m in learn.model if isinstance(m, nn.Linear)]
        with learn.no_logging(): learn.fit(1, 1e-3)
        grads[s] = probe.grads
    for w, g0, g1 in zip(w0, grads[0.], grads[k]):
        x = (w - t).requires_grad_()
        d = {'l1': lambda: x.abs().sum(), 'l2': lambda: x.pow(2).sum(),
             'group_l1': lambda: x.norm(dim=1).sum(), 'group_l2': lambda: x.abs().sum(1).pow(2).sum()}[penalty]()
        d.backward()
        torch.testing.assert_close(g1 - g0, k*x.grad, rtol=1e-4, atol=1e-6)

def test_zero_strength_changes_nothing():
    "With strength 0 the weights train exactly as without the callback"
    a = fit(learner(), n=1)
    c = fit(learner(RegularizeCallback(strength=0.)), n=1)
    for p, q in zip(a.model.parameters(), c.model.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=0)

def test_columns_once_and_export(tmp_path):
    reg = RegularizeCallback(strength=1e-4)
    learn = learner(reg)
    class Boom(Callback):
        def after_batch(self): raise RuntimeError('boom')
    boom = Boom()
    learn.add_cb(boom)
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)  # after_fit never runs
    learn.remove_cb(boom)
    fit(learn, n=1)
    names = list(learn.recorder.metric_names)
    assert names.count('near_target') == 1 and names.count('reg_strength') == 1, names
    assert list(learn.metrics.attrgot('name')) == ['accuracy']
    learn.path = tmp_path
    learn.export('reg.pkl')
    learn2 = load_learner(tmp_path/'reg.pkl')
    assert isinstance(learn2.regularize, RegularizeCallback) and learn2.regularize.strength == 1e-4
    assert learn2.regularize.report().near_target.iloc[-1] == pytest.approx(reg.near_target())

def test_masks_win_over_clamp():
    "With FixedSparsityCallback, a masked weight stays exactly 0 even though clamp=(t, None) with t > 0"
    from fastsparse.callback import FixedSparsityCallback
    learn = learner()
    masks = {'0.weight': torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) > .5}
    learn.add_cbs([RegularizeCallback(target=.05, strength=1e-3, clamp=(.05, None)), FixedSparsityCallback(masks=masks)])
    fit(learn, n=1)
    w = learn.model[0].weight
    assert (w[~masks['0.weight']] == 0).all() and (w[masks['0.weight']] >= .05).all()
