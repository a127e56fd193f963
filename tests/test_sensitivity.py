"Sensitivity analysis: the model is left bit-identical, targets hit the weighted mean, training reaches them exactly."
import copy, json, math
import numpy as np
import pytest, torch, torch.nn as nn
from torch.utils.data import TensorDataset
from fastai.basics import Learner, DataLoaders, TfmdDL, CrossEntropyLossFlat, accuracy, error_rate
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastsparse.demo import digits_dls, digits_cnn, digits_mlp
from fastsparse.callback import SparsifyCallback
from fastsparse.sparsifier import Sparsifier
from fastsparse.sensitivity import analyze_sensitivity, SensitivityResult, sparsity_levels

def learner(model=None, seed=0, metrics=accuracy, **kw):
    torch.manual_seed(seed)
    model = model if model is not None else digits_cnn(8)
    return Learner(digits_dls(), model, loss_func=CrossEntropyLossFlat(), metrics=metrics, **kw)

@pytest.fixture(scope='module')
def trained():
    "A briefly trained CNN and its analysis (loss decides), computed once"
    learn = learner()
    learn.fit_one_cycle(2, 1e-2)
    sens = analyze_sensitivity(learn, (0.5, 0.8, 0.95), metric='loss', show_progress=False)
    return learn, sens

def snapshot(learn):
    "Everything about the model that the analysis must not change"
    m = learn.model
    return dict(sd={k: v.detach().clone() for k, v in m.state_dict().items()},
                grads={n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()},
                req={n: p.requires_grad for n, p in m.named_parameters()},
                modes={n: mod.training for n, mod in m.named_modules()},
                hooks={n: (len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks))
                       for n, mod in m.named_modules()},
                params=[id(p) for p in m.parameters()],
                cbs=[id(c) for c in learn.cbs],
                rec={k: copy.deepcopy(v) for k, v in vars(learn.recorder).items() if k in ('lrs', 'iters', 'losses', 'values', 'metric_names')})

def assert_same(a, b):
    assert list(a['sd']) == list(b['sd'])
    for k in a['sd']:
        assert a['sd'][k].dtype == b['sd'][k].dtype and torch.equal(a['sd'][k], b['sd'][k]), k
    for k in a['grads']:
        assert (a['grads'][k] is None) == (b['grads'][k] is None), k
        if a['grads'][k] is not None: assert torch.equal(a['grads'][k], b['grads'][k]), k
    for key in ('req', 'modes', 'hooks', 'params', 'cbs', 'rec'): assert a[key] == b[key], key

@pytest.mark.parametrize('granularity,criteria,train_mode', [('weight', 'large_final', True), ('filter', 'large_final', False),
                                                             ('weight', 'taylor', True), ('kernel', 'random', True)])
def test_analysis_leaves_model_bit_identical(granularity, criteria, train_mode):
    learn = learner()
    xb, yb = learn.dls.one_batch()
    learn.loss_func(learn.model(xb), yb).backward()  # gradients that must survive (taylor computes its own)
    learn.model.train(train_mode)
    with torch.no_grad(): learn.model[1].running_mean.add_(0.1)  # BN statistics that eval mode must not touch
    before = snapshot(learn)
    assert before['grads']['0.weight'] is not None
    lt = nn.Conv2d if granularity == 'kernel' else (nn.Conv2d, nn.Linear)
    sens = analyze_sensitivity(learn, (0.5, 0.9), granularity=granularity, criteria=criteria, layer_type=lt,
                               metric='loss', show_progress=False)
    assert_same(before, snapshot(learn))
    assert sens.layers == ['0', '3', '7'] + (['12'] if granularity != 'kernel' else [])
    assert all(len(v) == 2 for v in sens.values.values())
    # the measurements did see a changed model while they ran
    assert any(v != sens.baseline for vs in sens.values.values() for v in vs)

def test_analysis_with_sparsify_callback_attached():
    "A SparsifyCallback left on the Learner is set aside during the analysis: its masks, report and the model stay"
    cb = SparsifyCallback(0.8, layer_type=nn.Conv2d)
    learn = learner(cbs=cb)
    learn.fit(1, 1e-2)
    rep = cb.sparsity_report().copy()
    before = snapshot(learn)
    analyze_sensitivity(learn, (0.5,), show_progress=False)
    assert_same(before, snapshot(learn))
    assert cb.sparsity_report().equals(rep) and cb in learn.cbs and cb.learn is learn

def test_metric_choice_and_direction(trained):
    learn, sens = trained
    assert sens.metric == 'loss' and not sens.higher_is_better
    r = analyze_sensitivity(learn, (0.9,), include='3', show_progress=False)
    assert r.metric == 'accuracy' and r.higher_is_better and r.layers == ['3']
    assert r.deltas('3')[0] == pytest.approx(r.baseline - r.values['3'][0])
    learn2 = learner(metrics=[error_rate, accuracy])
    r = analyze_sensitivity(learn2, (0.9,), include='12', show_progress=False)
    assert r.metric == 'error_rate' and not r.higher_is_better
    r = analyze_sensitivity(learn2, (0.9,), include='12', metric='valid_loss', show_progress=False)
    assert r.metric == 'loss'
    r = analyze_sensitivity(learner(metrics=None), (0.9,), include='12', show_progress=False)
    assert r.metric == 'loss'
    r = analyze_sensitivity(learn2, (0.9,), include='12', metric='error_rate', higher_is_better=True, show_progress=False)
    assert r.higher_is_better

def test_custom_dl_and_flops(trained):
    learn, sens = trained
    assert sens.flops == {'0': 8*64*9, '3': 16*64*8*9, '7': 16*16*16*9, '12': 160}
    assert sens.params == {'0': 72, '3': 1152, '7': 2304, '12': 160}
    dl = learn.dls.valid.new(bs=32)
    r = analyze_sensitivity(learn, (0.8,), include='7', metric='loss', dl=dl, show_progress=False)
    assert r.values['7'][0] == pytest.approx(sens.values['7'][1], abs=1e-5)  # same data, other batches

def weighted_mean(res, t, weight='params'):
    w = res.params if weight == 'params' else res.flops
    return sum(w[n]*s for n, s in t.items()) / sum(w[n] for n in t)

@pytest.mark.parametrize('weight', ['params', 'flops'])
@pytest.mark.parametrize('T', [0.3, 0.5, 0.8, 0.9, 0.95, 97])
def test_targets_hit_weighted_mean(trained, weight, T):
    _, sens = trained
    t = sens.to_layer_targets(T, weight=weight)
    Tf = T/100 if T > 1 else T
    assert list(t) == sens.layers
    assert weighted_mean(sens, t, weight) == pytest.approx(Tf, abs=1e-9)
    assert all(0 <= s <= 0.98 for s in t.values())
    assert sens.to_layer_targets(T, weight=weight) == t  # deterministic
    if Tf <= 0.98: assert sens.predicted_delta(t) <= sens.predicted_delta(dict.fromkeys(t, Tf)) + 1e-12

def random_result(rng, n_layers, convex=False):
    levels = (0.3, 0.5, 0.7, 0.9, 0.95)
    values, params = {}, {}
    for i in range(n_layers):
        if convex:
            slopes = np.sort(rng.uniform(0, 2, len(levels)))
            dx = np.diff([0., *levels])
            d = np.cumsum(slopes*dx)
        else: d = rng.normal(0, 0.3, len(levels)).cumsum()  # noisy, non-monotonic, sometimes negative
        values[f"l{i}"] = list(1.0 + d)  # a loss: delta = value - baseline
        params[f"l{i}"] = int(rng.integers(10, 5000))
    flops = {n: float(rng.integers(100, 10**6)) for n in params}
    return SensitivityResult(levels, values, 1.0, params, metric='loss', higher_is_better=False, flops=flops)

@pytest.mark.parametrize('seed', range(20))
def test_targets_random_curves_and_caps(seed):
    rng = np.random.default_rng(seed)
    res = random_result(rng, int(rng.integers(1, 7)))
    names = res.layers
    lo = {n: float(rng.choice([0., 0.1, 0.3])) for n in names}
    hi = {n: float(rng.choice([0.6, 0.9, 0.98, 1.0])) for n in names}
    for weight in ('params', 'flops'):
        w = res.params if weight == 'params' else res.flops
        W = sum(w.values())
        lo_m, hi_m = sum(w[n]*lo[n] for n in names)/W, sum(w[n]*hi[n] for n in names)/W
        for T in np.linspace(lo_m, hi_m, 7):
            t = res.to_layer_targets(float(T), max_sparsity=hi, min_sparsity=lo, weight=weight)
            assert weighted_mean(res, t, weight) == pytest.approx(T, abs=1e-9)
            assert all(lo[n] - 1e-12 <= t[n] <= hi[n] + 1e-12 for n in names)
        bad = hi_m + 0.01 if hi_m <= 0.99 else lo_m - 0.01 if lo_m >= 0.01 else None
        if bad is not None:
            with pytest.raises(ValueError, match='is unreachable'):
                res.to_layer_targets(bad, max_sparsity=hi, min_sparsity=lo, weight=weight)

@pytest.mark.parametrize('seed', range(10))
def test_targets_optimal_for_convex_curves(seed):
    "On convex curves the greedy choice is optimal: no random feasible allocation predicts less"
    rng = np.random.default_rng(100 + seed)
    res = random_result(rng, 4, convex=True)
    names, P = res.layers, res.params
    W = sum(P.values())
    for T in (0.4, 0.7, 0.9):
        best = res.predicted_delta(res.to_layer_targets(T))
        for _ in range(300):  # random feasible points: a random direction projected onto the budget plane
            s = rng.uniform(0, 0.98, len(names))
            for _ in range(50):
                s += (T*W - sum(P[n]*x for n, x in zip(names, s))) / W
                s = np.clip(s, 0, 0.98)
            if abs(sum(P[n]*x for n, x in zip(names, s))/W - T) > 1e-9: continue
            assert best <= res.predicted_delta(dict(zip(names, s))) + 1e-9

def test_training_with_dict_reaches_targets(trained):
    _, sens = trained
    targets = sens.to_layer_targets(0.85)
    cb = SparsifyCallback(targets, 'weight', schedule='agp')
    learn = learner(cbs=cb)
    learn.fit(2, 1e-3)
    rep = cb.sparsity_report().set_index('layer')
    assert set(rep.index) == set(targets) | {'total'}
    for n, t in targets.items():
        assert rep.loc[n, 'zeros'] == round(t*sens.params[n]), n
        w = learn.model.get_submodule(n).weight
        assert int((w == 0).sum()) == round(t*w.numel()), n
    assert rep.loc['total', 'achieved'] == pytest.approx(0.85, abs=0.005)
    # and the engine alone
    model = digits_cnn(8)
    sp = Sparsifier(model, 'weight', layer_type=(nn.Conv2d, nn.Linear)).sparsify_model(targets)
    for n, t in targets.items(): assert int((model.get_submodule(n).weight == 0).sum()) == round(t*sens.params[n]), n

def test_json_round_trip(trained, tmp_path):
    _, sens = trained
    p = sens.save(tmp_path/'sens.json')
    d = json.loads(p.read_text())
    assert d['metric'] == 'loss' and d['sparsities'] == [0.5, 0.8, 0.95] and set(d['values']) == set(sens.layers)
    r = SensitivityResult.load(p)
    assert r.to_dict() == sens.to_dict()
    assert r.to_df().equals(sens.to_df())
    for w in ('params', 'flops'): assert r.to_layer_targets(0.9, weight=w) == sens.to_layer_targets(0.9, weight=w)
    (tmp_path/'bad.json').write_text('[1, 2]')
    with pytest.raises(ValueError, match='does not hold a SensitivityResult'): SensitivityResult.load(tmp_path/'bad.json')

def test_plot(trained):
    import matplotlib.figure
    _, sens = trained
    fig = sens.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes[0].lines) == len(sens.layers) + 1  # + dense line
    fig = sens.plot('delta', targets=sens.to_layer_targets(0.9))
    assert len(fig.axes[0].lines) == 2*len(sens.layers)
    with pytest.raises(ValueError, match="y='loss' is not valid"): sens.plot('loss')

@pytest.mark.parametrize('kw,exc,msg', [
    (dict(sparsities=()), ValueError, 'sparsities is empty'),
    (dict(sparsities=(0.5, 1.5, 101)), ValueError, r'sparsities\[2\]=101.0 is out of range'),
    (dict(sparsities=(0.5, 0.9, 50)), ValueError, r'repeats the level\(s\) \[0.5\]'),
    (dict(sparsities=(0., 0.5)), ValueError, 'level 0 is the dense baseline'),
    (dict(sparsities='0.5'), TypeError, 'must be a sequence'),
    (dict(metric='acc'), ValueError, r"metric='acc' is not a metric of this Learner; choose one of \['loss', 'accuracy'\]"),
    (dict(metric=accuracy), TypeError, 'metric must be a metric name'),
    (dict(higher_is_better=1), TypeError, 'higher_is_better must be True, False or None'),
    (dict(granularity='filters'), ValueError, "Did you mean 'filter'"),
    (dict(criteria='larg_final'), ValueError, 'criteria'),
    (dict(layer_type=nn.LSTM), ValueError, 'select no layer'),
    (dict(exclude='conv9'), ValueError, "exclude: 'conv9' matches no layer"),
    (dict(n_calib=0), ValueError, 'n_calib=0 must be a positive integer'),
])
def test_errors_before_touching(kw, exc, msg):
    learn = learner()
    before = snapshot(learn)
    with pytest.raises(exc, match=msg): analyze_sensitivity(learn, **kw, show_progress=False)
    assert_same(before, snapshot(learn))

def test_learner_without_validation_data():
    learn = learner()
    no_valid = Learner(DataLoaders(learn.dls.train), digits_cnn(8), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match='learn has no validation data'): analyze_sensitivity(no_valid, show_progress=False)
    empty_dl = TfmdDL(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), bs=8)
    empty = Learner(DataLoaders(learn.dls.train, empty_dl), digits_cnn(8), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match='learn has no validation data'): analyze_sensitivity(empty, show_progress=False)
    with pytest.raises(TypeError, match='learn must be a fastai Learner, got Sequential'): analyze_sensitivity(digits_cnn(8))

def test_target_errors(trained):
    _, sens = trained
    with pytest.raises(ValueError, match=r'target_sparsity=0.99 is unreachable .* reachable targets are \[0, 0.9\]'):
        sens.to_layer_targets(0.99, max_sparsity=0.9)
    with pytest.raises(ValueError, match='target_sparsity=0.2 is unreachable'):
        sens.to_layer_targets(0.2, min_sparsity=0.5)
    with pytest.raises(ValueError, match='target_sparsity=150.0 is out of range'): sens.to_layer_targets(150)
    with pytest.raises(ValueError, match=r"weight='macs' is not valid; choose one of \['params', 'flops'\]"):
        sens.to_layer_targets(0.9, weight='macs')
    with pytest.raises(ValueError, match=r"max_sparsity: \['conv1'\] are not analysed layers"):
        sens.to_layer_targets(0.9, max_sparsity={'conv1': 0.5})
    with pytest.raises(ValueError, match=r"is above max_sparsity"):
        sens.to_layer_targets(0.9, min_sparsity={'3': 0.9}, max_sparsity={'3': 0.8})
    with pytest.raises(ValueError, match=r"targets: \['x'\] are not analysed layers"): sens.predicted_delta({'x': 0.5})
    nan = SensitivityResult((0.5,), {'a': [float('nan')]}, 0., {'a': 10})
    with pytest.raises(ValueError, match='not finite'): nan.to_layer_targets(0.5)
    # per-layer caps are honoured: keep the first conv dense
    t = sens.to_layer_targets(0.9, max_sparsity={'0': 0.})
    assert t['0'] == 0. and weighted_mean(sens, t) == pytest.approx(0.9, abs=1e-9)

def test_sparsity_levels():
    assert sparsity_levels([95, 0.5, 0.8]) == (0.5, 0.8, 0.95)
    assert sparsity_levels(1) == (1.0,)
