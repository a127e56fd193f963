"Sparse initialisation: exact zeros per column for every layer type, and zeros that survive training as a fixed mask."
import math
import pytest, torch, torch.nn as nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fastsparse.init import sparse_, sparse_init_model, n_zeros_per_column

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

@given(rows=st.integers(1, 64), cols=st.integers(1, 64), pct=st.integers(2, 100), seed=st.integers(0, 2**16))
@settings(**SETTINGS)
def test_percent_and_fraction_agree(rows, cols, pct, seed):
    "A percentage (a number in (1, 100]) and the same fraction zero the same, exact number per column: floor, never more than asked"
    torch.manual_seed(seed); a = sparse_(torch.empty(rows, cols), pct)
    torch.manual_seed(seed); b = sparse_(torch.empty(rows, cols), pct/100)
    assert torch.equal(a, b)
    k = n_zeros_per_column(rows, pct/100)
    assert k <= rows*pct/100 + 1e-9 and k == (rows*pct)//100
    assert ((a == 0).sum(0) == k).all()

@st.composite
def layer(draw):
    kind = draw(st.sampled_from(['linear', 'conv1d', 'conv2d', 'conv3d', 'convt2d']))
    o, i, k = draw(st.integers(1, 10)), draw(st.integers(1, 10)), draw(st.integers(1, 3))
    return {'linear': lambda: nn.Linear(i, o), 'conv1d': lambda: nn.Conv1d(i, o, k), 'conv2d': lambda: nn.Conv2d(i, o, k),
            'conv3d': lambda: nn.Conv3d(i, o, k), 'convt2d': lambda: nn.ConvTranspose2d(i, o, k)}[kind]()

@given(m=layer(), s=st.floats(0, 1), per=st.sampled_from(['column', 'row']), seed=st.integers(0, 2**16))
@settings(**SETTINGS)
def test_model_exact_per_column_or_row(m, s, per, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(m)
    masks = sparse_init_model(model, s, std=.1, layer_type=type(m), per=per)
    keep = masks['0.weight']
    assert keep.dtype == torch.bool and keep.shape == m.weight.shape
    assert torch.equal(m.weight == 0, ~keep)
    od = 1 if isinstance(m, nn.ConvTranspose2d) else 0
    zeros = (~keep).movedim(od, 0).reshape(m.weight.shape[od], -1)  # (out, in*k...)
    if per == 'column': assert (zeros.sum(0) == math.floor(zeros.shape[0]*s + 1e-9)).all()
    else: assert (zeros.sum(1) == math.floor(zeros.shape[1]*s + 1e-9)).all()

def test_same_seed_same_init():
    def run():
        torch.manual_seed(7)
        model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
        return model, sparse_init_model(model, .5)
    (m1, k1), (m2, k2) = run(), run()
    for a, b in zip(m1.parameters(), m2.parameters()): assert torch.equal(a, b)
    assert all(torch.equal(k1[n], k2[n]) for n in k1)

def test_zeros_kept_through_training():
    "The masks of a sparse init feed FixedSparsityCallback: after AdamW with weight decay, every zero is still exactly zero"
    from fastai.basics import Learner, CrossEntropyLossFlat, set_seed, Adam, Callback
    import fastai.callback.schedule  # fit_one_cycle
    from fastsparse.callback import FixedSparsityCallback
    from fastsparse.demo import digits_dls
    set_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    masks = sparse_init_model(model, .8, std=.05)
    assert list(masks) == ['1.weight', '3.weight']
    class Check(Callback):
        "After every step (the fixed mask callback runs before it), the masked weights are zero"
        order = 90
        def before_fit(self): self.steps = 0
        def after_step(self):
            self.steps += 1
            for n, k in masks.items(): assert (self.learn.model.get_parameter(n)[~k] == 0).all(), n
    check = Check()
    learn = Learner(digits_dls(bs=128), model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, wd=1e-2,
                    cbs=[FixedSparsityCallback(masks=masks), check])
    w0 = {n: model.get_parameter(n).detach().clone() for n in masks}
    with learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    assert check.steps > 0
    for n, k in masks.items():
        w = model.get_parameter(n)
        assert (w[~k] == 0).all()
        assert not torch.equal(w[k], w0[n][k])  # the kept weights did train
