"""No silent no-op: every option that could do nothing in the fit it was given says so (a warning) or cannot be given
(an error before any weight is touched). Real fastai fits on scikit-learn's digits."""
import warnings
import pytest, torch, torch.nn as nn
from fastai.basics import Learner, CrossEntropyLossFlat, accuracy, set_seed
from fastsparse.callback import SparsifyCallback
from fastsparse.callback import DynamicSparseCallback
from fastsparse.schedule import Schedule, linear
from fastsparse.sensitivity import analyze_sensitivity
from fastsparse.demo import digits_dls, digits_cnn, digits_mlp

def learner(model=None, cbs=None, **kw):
    set_seed(0, reproducible=True)
    return Learner(digits_dls(), model if model is not None else digits_mlp(32), loss_func=CrossEntropyLossFlat(),
                   metrics=accuracy, cbs=cbs, **kw)

def fit_warnings(learn, *args):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(*args)
    return [str(x.message) for x in w]

def test_dst_defaults_move_connections_in_a_short_fit():
    "2 epochs of 22 batches: the default interval gives about 20 updates over the first 75%, each moving connections"
    cb = DynamicSparseCallback(0.9)
    msgs = fit_warnings(learner(cbs=[cb]), 2, 1e-2)
    assert not [m for m in msgs if 'update_every' in m]
    assert len(cb.history) == 16 and all(h['moved'] > 0 for h in cb.history[:8])

def test_dst_interval_longer_than_its_window_warns():
    cb = DynamicSparseCallback(0.9, update_every=100)
    msgs = fit_warnings(learner(cbs=[cb]), 2, 1e-2)
    assert any('update_every=100 is not shorter than the window of updates (33 of the fit\'s 44 training batches' in m for m in msgs)
    assert cb.history == []

def test_schedule_that_never_reaches_its_target_warns():
    half = Schedule(lambda start, end, pos: start + (end - start) * pos / 2)
    cb = SparsifyCallback(0.8, schedule=half, layer_type=nn.Linear)
    msgs = fit_warnings(learner(cbs=[cb]), 1, 1e-2)
    assert any('reaches at most 50.0% of the way to the target within the fit' in m for m in msgs)
    assert not any('reaches at most' in m for m in fit_warnings(learner(cbs=[SparsifyCallback(0.8, schedule=linear, layer_type=nn.Linear)]), 1, 1e-2))

@pytest.mark.parametrize('kw, match', [(dict(include='conv*'), "include: 'conv\\*' matches no layer"),
                                        (dict(exclude='9'), "exclude: '9' matches no layer")])
@pytest.mark.parametrize('make', [lambda **kw: SparsifyCallback(0.5, layer_type=nn.Linear, **kw),
                                  lambda **kw: DynamicSparseCallback(0.5, layer_type=nn.Linear, **kw)], ids=['sparsify', 'dst'])
def test_patterns_that_match_nothing_are_errors(make, kw, match):
    learn = learner(cbs=[make(**kw)])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=match): learn.fit(1, 1e-2)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k])

@pytest.mark.parametrize('crit, what', [('taylor', 'gradients'), ('wanda', 'inputs')])
def test_data_criteria_on_a_layer_that_gets_no_data_are_errors(crit, what):
    "A frozen layer gets no gradient; a layer the forward never calls gets no input: named before any pruning"
    model = nn.Sequential(digits_mlp(32), nn.Linear(3, 3))
    model[0][1].weight.requires_grad_(False)   # frozen: no gradient (it still gets an input)
    class Head(nn.Module):   # calls only the MLP: `spare` gets neither input nor gradient
        def __init__(self, m): super().__init__(); self.m, self.spare = m[0], m[1]
        def forward(self, x): return self.m(x)
    net = Head(model)
    cb = SparsifyCallback(0.5, criteria=crit, schedule=linear, layer_type=nn.Linear)
    learn = learner(net, cbs=[cb])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=f"criteria '{crit}' scores with {what}, but layers .*spare.* got none in the first training batch"):
        learn.fit(1, 1e-2)
    for k, v in learn.model.state_dict().items():
        if 'spare' in k or k == 'm.1.weight': assert torch.equal(v, before[k]), k

def test_sensitivity_whose_metric_never_changes_warns():
    def constant(preds, targs): return torch.tensor(0.5)
    learn = learner(digits_cnn(8))
    learn.metrics = [constant]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        analyze_sensitivity(learn, (0.5, 0.9), metric='constant', show_progress=False)
    assert any('constant stayed at 0.5 for every layer at every level' in str(x.message) for x in w)
