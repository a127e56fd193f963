"""Sparsity on every weight tensor: recurrent layers (LSTM with layers, directions and proj_size, GRU, RNN), attention
(packed in_proj and separate q/k/v), embeddings, fastai's AWD-LSTM (raw weights under WeightDropout) and tied weights --
exact counts per tensor and granularity, groups inside one gate, the warning for tensors left dense, and an LSTM trained
on digits rows through SparsifyCallback with Adam."""
import warnings
import pytest, torch, torch.nn as nn
from fastai.basics import Learner, Adam, CrossEntropyLossFlat, accuracy, set_seed, Callback, load_learner
from fastsparse.sparsifier import Sparsifier
from fastsparse.tensors import select_tensors
from fastsparse.granularity import n_groups
from fastsparse.criteria import large_final, random_scores, large_init, movement, taylor, wanda
from fastsparse.callback import SparsifyCallback, FixedSparsityCallback
from fastsparse.dst import random_masks
from fastsparse.callback import DynamicSparseCallback
from masks_held import CheckMasks
from fastsparse.schedule import agp
from fastsparse.demo import digits_dls

KINDS = (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)

class Zoo(nn.Module):
    "One of every module kind with weight tensors other than a plain matrix"
    def __init__(self):
        super().__init__()
        self.emb,self.bag = nn.Embedding(30, 8),nn.EmbeddingBag(20, 6)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, proj_size=4)
        self.gru,self.rnn = nn.GRU(8, 5, num_layers=2),nn.RNN(8, 7)
        self.att = nn.MultiheadAttention(8, 2)
        self.qkv = nn.MultiheadAttention(8, 2, kdim=4, vdim=12)

def zoo():
    torch.manual_seed(0); return Zoo()

EXPECTED = ['emb', 'bag'] + [f'lstm.weight_{k}_l{l}{d}' for l in (0, 1) for d in ('', '_reverse') for k in ('ih', 'hh', 'hr')] + \
           [f'gru.weight_{k}_l{l}' for l in (0, 1) for k in ('ih', 'hh')] + ['rnn.weight_ih_l0', 'rnn.weight_hh_l0'] + \
           ['att.in_proj_weight', 'att.out_proj', 'qkv.q_proj_weight', 'qkv.k_proj_weight', 'qkv.v_proj_weight', 'qkv.out_proj']

def test_every_tensor_selected():
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # attention is selected whole, its out_proj included: nothing left dense
        sp = Sparsifier(zoo(), layer_type=KINDS)
    assert list(sp.tensors) == EXPECTED
    rep = sp.sparsity_report()
    assert rep.layer.tolist()[:-1] == EXPECTED and rep.tensor.tolist()[:-1] == [('emb.weight' if n == 'emb' else 'bag.weight' if n == 'bag' else f'{n}.weight' if n.endswith('out_proj') else n) for n in EXPECTED]
    assert rep.set_index('layer').loc['lstm.weight_hr_l1_reverse', 'params'] == 4 * 6

def group_view(sp, n):
    "The tensor's mask in its group view and the reduced dims"
    return sp.view(n, sp.masks[sp.weight_name(n)]), sp.dims[n]

@pytest.mark.parametrize('gran', ['weight', 'row', 'column', 'unit'])
@pytest.mark.parametrize('context', ['local', 'global'])
def test_exact_counts_per_tensor(gran, context):
    s = 0.3
    m = zoo()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # 'unit' is for packed tensors: others raise, checked below
        if gran == 'unit':
            with pytest.raises(ValueError, match=r"layer 'emb' \(Embedding\): granularity='unit' is not available for Embedding"):
                Sparsifier(m, gran, layer_type=KINDS)
            kinds = (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention)
            sp = Sparsifier(m, gran, context, params=['lstm.weight_ih_*', 'lstm.weight_hh_*', 'gru.*', 'rnn.*', 'att.in_proj_weight'])
        else: sp = Sparsifier(m, gran, context, layer_type=KINDS)
    sp.sparsify_model(s)
    total = pruned = 0
    for n, t in sp.tensors.items():
        mask, dims = group_view(sp, n)
        keep = mask.all(dim=dims, keepdim=True) if dims else mask
        assert torch.equal(keep.expand(mask.shape), mask), f"{n}: a {gran} group is partly masked"  # whole groups, inside one block
        g = n_groups(mask.shape, dims)
        k = int((~keep).sum())
        if context == 'local': assert k == round(s * g), (n, k, g)
        total += g; pruned += k
        assert (t.weight[~sp.masks[t.name]] == 0).all()
    if context == 'global': assert pruned == round(s * total)

def test_gates_and_units():
    "A 'row' is one unit of one gate; 'column' one input of one gate; 'unit' one hidden unit in all four gates"
    lstm = nn.LSTM(5, 3)
    for gran, per_gate in (('row', True), ('column', True), ('unit', False)):
        sp = Sparsifier(lstm, gran, layer_type=nn.LSTM).sparsify_layer('weight_hh_l0', 1/3)
        mask = sp.masks['weight_hh_l0'].view(4, 3, 3)  # (gate, hidden unit, input)
        if gran == 'unit':
            assert int((~mask).all(2).all(0).sum()) == 1 and int((~mask).sum()) == 12  # one unit: its row in each gate
        elif gran == 'row': assert int((~mask).all(2).sum()) == 4 and int((~mask).sum()) == 12
        else: assert int((~mask).all(1).sum()) == 4 and int((~mask).sum()) == 12

def test_in_proj_blocks_apart():
    "attention's in_proj packs q, k, v: a column group is one input of one of them"
    att = nn.MultiheadAttention(6, 2)
    sp = Sparsifier(att, 'column', layer_type=nn.MultiheadAttention).sparsify_model(0.5)
    mask = sp.masks['in_proj_weight'].view(3, 6, 6)
    assert int((~mask).all(1).sum()) == 9 and torch.equal(mask.all(1, keepdim=True).expand_as(mask), mask)

def test_nm_along_inputs():
    m = zoo()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        sp = Sparsifier(m, nm=True, layer_type=(nn.LSTM, nn.MultiheadAttention)).sparsify_model(0.5)
    for n in ['lstm.weight_ih_l0', 'lstm.weight_hh_l1', 'att.in_proj_weight', 'qkv.k_proj_weight', 'qkv.v_proj_weight']:
        mask = sp.masks[sp.weight_name(n)]
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), n  # 2 of every 4 consecutive inputs
    # lstm.weight_hr_l* has 6 inputs (not divisible by 4): dense, named in a warning
    assert 'lstm.weight_hr_l0' not in sp.masks and any("'lstm.weight_hr_l0'" in str(x.message) for x in w)

@pytest.mark.parametrize('crit', [large_final, random_scores, large_init, movement, taylor])
def test_criteria_on_every_tensor(crit):
    torch.manual_seed(0)
    net = SeqNet()
    batches = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    sp = Sparsifier(net, criteria=crit, layer_type=(nn.LSTM, nn.Linear), data=batches if crit is taylor else None)
    sp.sparsify_model(0.5)
    for n, t in sp.tensors.items(): assert int((~sp.masks[t.name]).sum()) == round(0.5 * t.weight.numel()), n

def test_wanda_where_input_is_seen():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), 1)
    net = nn.Sequential(enc)
    x = torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match=r"cannot be observed for '0.layers.0.self_attn.out_proj.weight' \(NonDynamicallyQuantizableLinear\)"):
        Sparsifier(net, criteria=wanda, layer_type=(nn.Linear, nn.MultiheadAttention))
    sp = Sparsifier(net, criteria=wanda, layer_type=(nn.Linear, nn.MultiheadAttention), exclude='*out_proj', data=[x, x])
    assert sp.state['0.layers.0.self_attn.in_proj_weight']['act'].shape == (3, 1, 8)  # query, key and value apart
    sp.sparsify_model(0.5)
    assert int((~sp.masks['0.layers.0.self_attn.in_proj_weight']).sum()) == 96
    # an LSTM's first weight_ih sees the input; weight_hh meets the hidden state
    lstm = SeqNet()
    xb = [torch.rand(8, 1, 8, 8)]
    sp = Sparsifier(lstm, criteria=wanda, params='rnn.weight_ih_l0', data=xb).sparsify_model(0.5)
    assert sp.state['rnn.weight_ih_l0']['act'].shape == (1, 1, 8)
    rows = xb[0].view(8, 8, 8)
    assert torch.allclose(sp.state['rnn.weight_ih_l0']['act'].flatten(), rows.pow(2).sum((0, 1)).sqrt())
    with pytest.raises(ValueError, match=r"cannot be observed for 'rnn.weight_hh_l0' \(LSTM\); for these tensors choose one of \[.*'taylor'"):
        Sparsifier(lstm, criteria=wanda, layer_type=nn.LSTM)

def test_warning_names_what_stays_dense():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), 2)
    with pytest.warns(UserWarning, match=r"leaves dense the weight tensors \['layers.0.self_attn.in_proj_weight', 'layers.1.self_attn.in_proj_weight'\].*add MultiheadAttention to layer_type"):
        Sparsifier(enc, layer_type=nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        sp = Sparsifier(enc, layer_type=(nn.Linear, nn.MultiheadAttention)).sparsify_model(0.5)
    assert int((~sp.masks['layers.1.self_attn.in_proj_weight']).sum()) == 96

def test_tied_weights_one_mask():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 12))
    m[1].weight = m[0].weight
    sp = Sparsifier(m, layer_type=(nn.Embedding, nn.Linear)).sparsify_model(0.5)
    assert list(sp.masks) == ['0.weight'] and list(sp.tensors) == ['0']
    assert int((m[1].weight == 0).sum()) == 36 and m[1].weight is m[0].weight
    rep = sp.sparsity_report()
    assert len(rep) == 2 and rep.note[0] == 'tied: also 1.weight'

def test_awd_lstm_raw_and_used():
    from fastai.text.models.awdlstm import AWD_LSTM
    torch.manual_seed(0)
    m = AWD_LSTM(40, 8, 12, 2, weight_p=0.5)
    sp = Sparsifier(m, layer_type=nn.LSTM).sparsify_model(0.6)
    assert list(sp.tensors) == ['rnns.0.weight_hh_l0_raw', 'rnns.0.module.weight_ih_l0', 'rnns.1.weight_hh_l0_raw', 'rnns.1.module.weight_ih_l0']
    for n, t in sp.tensors.items(): assert int((t.weight == 0).sum()) == round(0.6 * t.weight.numel()), n
    seen = []
    def check(mod, inp):  # the weight the LSTM really uses, at every forward
        mask = sp.masks['rnns.0.weight_hh_l0_raw']
        seen.append(bool((mod.weight_hh_l0[~mask] == 0).all()) and bool((mod.weight_hh_l0[mask] != 0).any()))
    h = m.rnns[0].module.register_forward_pre_hook(check)
    mask = sp.masks['rnns.0.weight_hh_l0_raw']
    assert (m.rnns[0].module.weight_hh_l0[~mask] == 0).all()  # held by the LSTM before any forward too
    x = torch.randint(0, 40, (2, 5))
    m.train(); m.reset(); m(x); m.eval(); m.reset(); m(x)
    h.remove()
    assert seen == [True, True]

class SeqNet(nn.Module):
    "An LSTM that reads a digit row by row (8 steps of 8 pixels) and classifies it from its last hidden state"
    def __init__(self, hidden=64):
        super().__init__()
        self.rnn,self.head = nn.LSTM(8, hidden, batch_first=True),nn.Linear(hidden, 10)
    def forward(self, x):
        out, _ = self.rnn(x.view(x.shape[0], 8, 8))
        return self.head(out[:, -1])

def lstm_learner(cbs=None):
    set_seed(0, reproducible=True)
    return Learner(digits_dls(), SeqNet(), loss_func=CrossEntropyLossFlat(), opt_func=Adam, metrics=accuracy, cbs=cbs)

def test_lstm_digits_rows_80pct(tmp_path):
    dense = lstm_learner()
    with dense.no_bar(), dense.no_logging(): dense.fit_one_cycle(12, 3e-2)
    acc_dense = float(dense.validate()[1])
    cb, chk = SparsifyCallback(0.8, schedule=agp.with_pcts(0., 0.5), layer_type=nn.LSTM), CheckMasks()
    learn = lstm_learner([cb, chk])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(12, 3e-2)
    assert chk.n == 12 * len(learn.dls.train)  # checked after every one of the steps
    acc = float(learn.validate()[1])
    for n, t in cb.sparsifier.tensors.items(): assert int((t.weight == 0).sum()) == round(0.8 * t.weight.numel()), n
    assert list(cb.sparsifier.tensors) == ['rnn.weight_ih_l0', 'rnn.weight_hh_l0']
    assert acc_dense > 0.95 and acc > acc_dense - 0.03, (acc_dense, acc)  # 80% sparse within 3 points of dense
    assert learn.model.state_dict().keys() == SeqNet().state_dict().keys()
    SeqNet().load_state_dict(learn.model.state_dict(), strict=True)
    learn.path = tmp_path; learn.export('lstm.pkl')
    loaded = load_learner(tmp_path / 'lstm.pkl')
    for n, t in cb.sparsifier.tensors.items():   # the exported weights keep exactly the zeros of the trained ones
        w = loaded.model.get_parameter(t.name)
        assert int((w == 0).sum()) == round(0.8 * w.numel()) and torch.equal(w, t.weight), n
    xb = learn.dls.valid.one_batch()[0]
    learn.model.eval(); loaded.model.eval()
    with torch.no_grad(): assert torch.equal(loaded.model(xb), learn.model(xb))   # the same outputs, bit for bit

@pytest.mark.parametrize('kind', ['dst', 'fixed'])
def test_other_callbacks_on_lstm(kind):
    net = SeqNet(32)
    if kind == 'dst': cb = DynamicSparseCallback(0.7, 'rigl', update_every=5, layer_type=nn.LSTM)
    else:
        masks = random_masks(net, 0.7, layer_type=nn.LSTM, seed=1)
        assert {k: int((~v).sum()) for k, v in masks.items()} == {'rnn.weight_ih_l0': round(0.7 * 128 * 8), 'rnn.weight_hh_l0': round(0.7 * 128 * 32)}
        cb = FixedSparsityCallback(masks)
    chk = CheckMasks()
    set_seed(0, reproducible=True)
    learn = Learner(digits_dls(), net, loss_func=CrossEntropyLossFlat(), opt_func=Adam, metrics=accuracy, cbs=[cb, chk])
    learn.fit(1, 1e-2)
    assert chk.n == len(learn.dls.train)
    sp = cb.sparsifier
    assert set(sp.tensors) == {'rnn.weight_ih_l0', 'rnn.weight_hh_l0'}
    for n, t in sp.tensors.items(): assert int((~sp.masks[t.name]).sum()) == round(0.7 * t.weight.numel()), n
    SeqNet(32).load_state_dict(learn.model.state_dict(), strict=True)

def test_dst_dict_naming_a_module():
    "A DST target dict may name a module: each of its weight tensors gets that target (a tensor's own entry wins)"
    net = SeqNet(32)
    cb, chk = DynamicSparseCallback({'rnn': 0.6, 'rnn.weight_hh_l0': 0.8, 'head': 0.5}, 'set', update_every=5), CheckMasks()
    set_seed(0, reproducible=True)
    learn = Learner(digits_dls(), net, loss_func=CrossEntropyLossFlat(), opt_func=Adam, metrics=accuracy, cbs=[cb, chk])
    learn.fit(1, 1e-2)
    assert chk.n == len(learn.dls.train) and cb.history
    sp = cb.sparsifier
    want = {'rnn.weight_ih_l0': 0.6, 'rnn.weight_hh_l0': 0.8, 'head': 0.5}
    assert set(sp.tensors) == set(want)
    for n, t in sp.tensors.items(): assert int((~sp.masks[t.name]).sum()) == round(want[n] * t.weight.numel()), n

def test_lstm_resume_mid_schedule(tmp_path):
    "A checkpoint saved mid-schedule resumes the same trajectory: same masks and weights at the end"
    from fastai.callback.tracker import SaveModelCallback
    def run(seed=0):
        set_seed(seed, reproducible=True)
        cb = SparsifyCallback(0.8, schedule=agp.with_pcts(0., 0.75), layer_type=nn.LSTM)
        return Learner(digits_dls(shuffle=False), SeqNet(32), loss_func=CrossEntropyLossFlat(), opt_func=Adam, cbs=[cb], path=tmp_path), cb
    a, ca = run()
    with a.no_bar(), a.no_logging(): a.fit_one_cycle(4, 1e-2, cbs=[SaveModelCallback(every_epoch=True, with_opt=True, fname='ck')])
    b, cb = run(seed=123)  # another init: the checkpoint must override it
    b.load('ck_1', with_opt=True)
    with b.no_bar(), b.no_logging(): b.fit_one_cycle(4, 1e-2, start_epoch=2)
    for k in ca.masks: assert torch.equal(ca.masks[k], cb.masks[k]), k
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, atol=1e-6), ka
    assert list(b.model.state_dict()) == list(SeqNet(32).state_dict())

class AWDClassifier(nn.Module):
    "fastai's AWD-LSTM over a digit read as 32 tokens (each a pair of pixels at 16 grey levels), and a linear head"
    def __init__(self):
        super().__init__()
        from fastai.text.models.awdlstm import AWD_LSTM
        self.enc,self.head = AWD_LSTM(16**2, 16, 32, 2, pad_token=0, hidden_p=0., input_p=0., embed_p=0., weight_p=0.3),nn.Linear(16, 10)
    def forward(self, x):
        px = (x.view(x.shape[0], 32, 2) * 15).round().long().clamp(0, 15)
        self.enc.reset()
        return self.head(self.enc(px[..., 0] * 16 + px[..., 1])[:, -1])

def test_awd_lstm_trains_masked():
    "Through SparsifyCallback: the raw weights hold their exact counts and the weight the LSTM uses is masked at every forward"
    set_seed(0, reproducible=True)
    cb, chk = SparsifyCallback(0.7, schedule=agp.with_pcts(0., 0.5), layer_type=nn.LSTM), CheckMasks()
    learn = Learner(digits_dls(), AWDClassifier(), loss_func=CrossEntropyLossFlat(), opt_func=Adam, metrics=accuracy, cbs=[cb, chk])
    used = []
    def check(mod, inp):
        mask = cb.masks.get('enc.rnns.0.weight_hh_l0_raw')
        if mask is not None and not mask.all(): used.append(bool((mod.weight_hh_l0[~mask] == 0).all()))
    h = learn.model.enc.rnns[0].module.register_forward_pre_hook(check)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    h.remove()
    assert chk.n == 3 * len(learn.dls.train)
    assert len(used) > 3 * len(learn.dls.train) and all(used)   # in training (dropout) and in validation
    for n, t in cb.sparsifier.tensors.items(): assert int((t.weight == 0).sum()) == round(0.7 * t.weight.numel()), n
    assert 'enc.rnns.0.weight_hh_l0_raw' in cb.sparsifier.tensors
    AWDClassifier().load_state_dict(learn.model.state_dict(), strict=True)

def test_dict_target_by_module_name():
    "{'rnn': 0.5} reaches each of the LSTM's weight tensors (a module's name stands for its tensors)"
    set_seed(0, reproducible=True)
    cb = SparsifyCallback({'rnn': 0.5, 'head': 0.25}, schedule=agp.with_pcts(0., 0.5))
    learn = Learner(digits_dls(), SeqNet(16), loss_func=CrossEntropyLossFlat(), opt_func=Adam, cbs=[cb])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    sp = cb.sparsifier
    assert list(sp.tensors) == ['rnn.weight_ih_l0', 'rnn.weight_hh_l0', 'head']
    for n, t in sp.tensors.items(): assert int((t.weight == 0).sum()) == round((0.25 if n == 'head' else 0.5) * t.weight.numel()), n

def test_counting_covers_every_tensor():
    from fastsparse.export import count_params, size_report
    m = nn.Sequential(nn.LSTM(8, 16), nn.Linear(16, 4))
    Sparsifier(m, layer_type=(nn.LSTM, nn.Linear)).sparsify_model(0.5)
    cp = count_params(m).set_index('layer')
    assert cp.loc['0', 'params'] == 64 * 8 + 64 * 16 + 2 * 64 and cp.loc['0', 'nonzero'] == 768 + 128  # biases dense
    sr = size_report(m).set_index('tensor')
    assert {'0.weight_ih_l0', '0.weight_hh_l0'} <= set(sr.index)

def test_sensitivity_per_tensor():
    "analyze_sensitivity ranks an LSTM's matrices one by one (MACs per step counted for each)"
    from fastsparse.sensitivity import analyze_sensitivity, layer_flops
    set_seed(0, reproducible=True)
    learn = Learner(digits_dls(), SeqNet(16), loss_func=CrossEntropyLossFlat(), opt_func=Adam, metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    r = analyze_sensitivity(learn, sparsities=(0.5, 0.9), layer_type=nn.LSTM)
    assert r.layers == ['rnn.weight_ih_l0', 'rnn.weight_hh_l0'] and r.types == {n: 'LSTM' for n in r.layers}
    sp = Sparsifier(learn.model, layer_type=nn.LSTM)
    fl = layer_flops(learn.model, sp.layers, torch.zeros(3, 1, 8, 8))
    assert fl == {'rnn.weight_ih_l0': 8 * 64 * 8, 'rnn.weight_hh_l0': 8 * 64 * 16}  # 8 steps per digit

@pytest.mark.parametrize('gran,context', [('unit', 'local'), ('row', 'global')])
def test_structured_through_the_callback(gran, context):
    "Hidden units (every gate) or gate rows pruned while training: exact group counts, whole groups, Adam state zero"
    set_seed(0, reproducible=True)
    cb, chk = SparsifyCallback(0.5, gran, context, schedule=agp.with_pcts(0., 0.5), layer_type=nn.LSTM), CheckMasks()
    learn = Learner(digits_dls(), SeqNet(16), loss_func=CrossEntropyLossFlat(), opt_func=Adam, cbs=[cb, chk])
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    sp, pruned, total = cb.sparsifier, 0, 0
    for n, t in sp.tensors.items():
        mask = sp.view(n, sp.masks[t.name])
        keep = mask.all(dim=sp.dims[n], keepdim=True)
        assert torch.equal(keep.expand(mask.shape), mask), n
        pruned += int((~keep).sum()); total += sp.n_groups(n)
        if context == 'local': assert int((~keep).sum()) == 8, n  # 8 of 16 hidden units
    assert pruned == round(0.5 * total) and chk.n == 2 * len(learn.dls.train)
