"Every invalid argument of the engine raises a ValueError/TypeError naming it, before any weight is touched."
import pytest, torch, torch.nn as nn
from fastsparse.sparsifier import Sparsifier
from fastsparse.criteria import taylor, wanda

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4))

@pytest.mark.parametrize('kwargs, match', [
    (dict(granularity='kernels'), "granularity='kernels' is not available for Conv2d.*Did you mean 'kernel'"),
    (dict(granularity='kernel', layer_type=nn.Linear), "not available for Linear"),
    (dict(context='globl'), "context='globl' is not valid"),
    (dict(criteria='magnitude'), "criteria='magnitude'.*choose one of"),
    (dict(nm=(4, 2)), "nm"),
    (dict(nm=(2, 4), granularity='filter'), "granularity='filter' must be 'weight' with nm"),
    (dict(nm=True, context='global'), "use context='local'"),
    (dict(layer_type=nn.Conv1d), "select no layer"),
    (dict(layer_type='Conv2d'), "layer_type must be"),
    (dict(include=['conv1']), "include: 'conv1' matches no layer"),
    (dict(exclude=['9']), "exclude: '9' matches no layer"),
    (dict(include=['0', '6']), r"include: '6' matches only layers that layer_type=.*Conv2d.* leaves out: 6 \(Linear\)"),
    (dict(loss_func=3), "loss_func must be callable"),
])
def test_constructor_errors(kwargs, match):
    m = model(); before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match): Sparsifier(m, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())

@pytest.mark.parametrize('call, match', [
    (lambda sp: sp.sparsify_model(1.5e2), "sparsity=150.0 is out of range"),
    (lambda sp: sp.sparsify_model(-0.2), "out of range"),
    (lambda sp: sp.sparsify_model(float('nan')), "NaN"),
    (lambda sp: sp.sparsify_model('90%'), "must be a number"),
    (lambda sp: sp.sparsify_model(None), "must be a number"),
    (lambda sp: sp.sparsify_model(0.5, round_to=0), "round_to=0 must be a positive integer"),
    (lambda sp: sp.sparsify_model(0.5, round_to=2.5), "round_to=2.5"),
    (lambda sp: sp.sparsify_model({'3': 0.5, 'conv': 0.2}), "layer 'conv' is not a selected layer"),
    (lambda sp: sp.sparsify_model({'0': 0.5, '3': 1.7e2}), r"sparsity\['3'\]"),
    (lambda sp: sp.sparsify_layer('33', 0.5), "layer '33' is not a selected layer.*Did you mean '3'"),
])
def test_call_errors(call, match):
    m = model(); before = {k: v.clone() for k, v in m.state_dict().items()}
    sp = Sparsifier(m)
    with pytest.raises((ValueError, TypeError), match=match): call(sp)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())

def test_dict_with_global_context():
    sp = Sparsifier(model(), context='global')
    with pytest.raises(ValueError, match="needs context='local'"): sp.sparsify_model({'0': 0.5})

@pytest.mark.parametrize('crit, what', [(taylor, 'gradients'), (wanda, 'activations')])
def test_missing_data(crit, what):
    m = model(); before = {k: v.clone() for k, v in m.state_dict().items()}
    sp = Sparsifier(m, criteria=crit)
    with pytest.raises(ValueError, match=f"needs {what}: pass Sparsifier\\(..., data=batches\\)"): sp.sparsify_model(0.5)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())

def test_data_criteria_with_data():
    x = torch.randn(16, 3, 8, 8); y = torch.randint(0, 4, (16,))
    for crit in (taylor, wanda):
        sp = Sparsifier(model(), criteria=crit, data=[(x, y), (x, y)])
        sp.sparsify_model(0.5)
        for n, l in sp.layers.items(): assert int((l.weight == 0).sum()) == round(0.5 * l.weight.numel())

def test_wanda_on_transformer_inputs():
    "Activations of rank 3 (B, T, C): one norm per input feature of the Linear"
    m = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12))
    sp = Sparsifier(m, criteria=wanda, layer_type=nn.Linear, data=[torch.randn(4, 7, 12) for _ in range(3)])
    assert sp.state['0']['act'].shape == (1, 12) and sp.state['2']['act'].shape == (1, 16)
    sp.sparsify_model(0.75)
    assert int((m[0].weight == 0).sum()) == round(0.75 * 12 * 16)

def test_filter_granularity_zeroes_following_batchnorm():
    m = model()
    sp = Sparsifier(m, 'filter', layer_type=nn.Conv2d)
    sp.sparsify_model(0.5)
    pruned = (m[0].weight.abs().sum((1, 2, 3)) == 0)
    assert int(pruned.sum()) == 4
    assert (m[1].weight[pruned] == 0).all() and (m[1].bias[pruned] == 0).all()
    assert (m[1].weight[~pruned] != 0).all()
