"End-to-end checks of fastsparse.export: shrinking, sparse inference, sizes and compressed saving (CPU; GPU paths marked `cuda`)."
import copy, math, warnings
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastsparse.sparsifier import Sparsifier
from fastsparse.export import (shrink, shrink_plan, shrinkable_layers, to_sparse_inference, SparseLinear, Int8Linear,
                               quantize_int8, count_params, time_inference, size_report, save_compressed, load_compressed)
from fastsparse.export.timing import max_rel_error

warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')

@pytest.fixture(autouse=True)
def one_thread():
    "Small models on a shared machine: one thread is faster and steadier"
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

def _trained_bn(m):
    "Give every BatchNorm statistics and shifts as after training, so that a dropped constant would show"
    g = torch.Generator().manual_seed(1)
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=g)*2 - 1); bn.running_var.copy_(torch.rand(n, generator=g)*1.5 + .5)
            with torch.no_grad(): bn.weight.copy_(torch.rand(n, generator=g) + .5); bn.bias.copy_(torch.rand(n, generator=g) - .5)
    return m.eval()

def plain_cnn(bias=False, seed=0):
    torch.manual_seed(seed)
    return _trained_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=bias), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=bias), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32*4, 10)))

from fastsparse.demo import ResBlock as Block

class TinyResNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = nn.Sequential(Block(c, c), Block(c, c))
        self.layer2 = nn.Sequential(Block(c, 2*c, 2), Block(2*c, 2*c))
        self.fc = nn.Linear(2*c, 10)
    def forward(self, x): return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))

def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return _trained_bn(TinyResNet())

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

def _close(a, b): return torch.allclose(a, b, rtol=1e-4, atol=1e-5)

def _params(m): return sum(p.numel() for p in m.parameters())

# ---- shrink ----

def test_shrink_plain_cnn():
    m = plain_cnn()
    Sparsifier(m, 'filter').sparsify_model(0.5)
    before = copy.deepcopy(m.state_dict())
    small = shrink(m, X)
    for k,v in m.state_dict().items(): assert torch.equal(v, before[k]), k  # input model untouched
    assert [small[0].out_channels, small[3].out_channels, small[7].out_channels] == [8, 16, 16]
    assert [small[1].num_features, small[4].num_features, small[8].num_features] == [8, 16, 16]
    assert [small[3].in_channels, small[7].in_channels, small[12].in_features] == [8, 16, 16*4]
    x = torch.randn(5, 3, 16, 16)  # not the example input: the removal holds for any input
    assert _close(small(x), m(x))
    removed = (8*3*9 + 8*2) + (16*16*9 + 16*8*9 + 16*2) + (16*32*9 + 16*16*9 + 16*2) + 16*4*10
    assert _params(m) - _params(small) == removed

def test_shrink_tiny_resnet():
    m = tiny_resnet()
    layers = shrinkable_layers(m, X)
    assert layers == ['layer1.0.conv1', 'layer1.1.conv1', 'layer2.0.conv1', 'layer2.1.conv1']
    Sparsifier(m, 'filter', include=layers).sparsify_model(0.5)
    small = shrink(m, X)
    x = torch.randn(4, 3, 16, 16)
    assert _close(small(x), m(x))
    for name,(ni,nf) in {'layer1.0': (8, 8), 'layer1.1': (8, 8), 'layer2.0': (8, 16), 'layer2.1': (16, 16)}.items():
        b = small.get_submodule(name)
        assert (b.conv1.out_channels, b.bn1.num_features, b.conv2.in_channels) == (nf//2, nf//2, nf//2)
    # per block: half of conv1's filters with their BN entries, and the matching inputs of conv2
    expected = sum(nf//2*ni*9 + nf//2*2 + nf*(nf//2)*9 for ni,nf in [(8, 8), (8, 8), (8, 16), (16, 16)])
    assert _params(m) - _params(small) == expected
    assert count_params(m).params.iloc[-1] - count_params(small).params.iloc[-1] == expected

def test_shrink_resnet_all_convs_keeps_coupled():
    m = tiny_resnet()
    Sparsifier(m, 'filter').sparsify_model(0.5)
    plan = shrink_plan(m, X)
    assert set(plan.columns) == {'layers', 'consumers', 'channels', 'zero', 'removable', 'note'}
    stream = plan[plan.layers.str.contains('stem.0')].iloc[0]
    assert stream.removable < stream.zero and 'coupled' in stream.note
    with pytest.warns(UserWarning, match='could not be removed'): small = shrink(m, X)
    assert _close(small(X), m(X))
    assert _params(small) < _params(m)

@pytest.mark.parametrize('seed', range(4))
def test_shrink_random_sparsities(seed):
    "Random per-layer filter sparsities, global and local, on the ResNet: always exact"
    m = tiny_resnet(seed)
    g = torch.Generator().manual_seed(seed)
    sp = Sparsifier(m, 'filter', context='local')
    sp.sparsify_model({n: float(torch.rand(1, generator=g))*.9 for n in sp.layers})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        small = shrink(m, X)
    x = torch.randn(3, 3, 16, 16)
    assert _close(small(x), m(x))

def test_shrink_channel_granularity_and_bias():
    m = plain_cnn(bias=True)
    Sparsifier(m, 'channel', include='3').sparsify_model(0.5)  # conv 3 reads only half of conv 0's channels
    small = shrink(m, X)
    assert (small[0].out_channels, small[1].num_features, small[3].in_channels) == (8, 8, 8)
    assert _close(small(X), m(X))

def test_shrink_keeps_channels_whose_bias_reaches_next_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    Sparsifier(m, 'filter', include='0').sparsify_model(0.5)
    zero = (m[0].weight.flatten(1) == 0).all(1)
    with torch.no_grad(): m[0].bias[zero] = torch.tensor([.3, -.2, .1, 0.])  # two reach conv 2, two are cut by the ReLU
    with pytest.warns(UserWarning, match='could not be removed'): small = shrink(m, X)
    assert small[0].out_channels == 6
    assert _close(small(X), m(X))
    assert 'bias' in shrink_plan(m, X).note.iloc[0]

def test_shrink_conv1d_and_linear():
    torch.manual_seed(0)
    m = _trained_bn(nn.Sequential(nn.Conv1d(4, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16*10, 32),
                                  nn.ReLU(), nn.Linear(32, 3)))
    Sparsifier(m, 'filter', layer_type=(nn.Conv1d, nn.Linear), exclude='8').sparsify_model(0.5)
    with torch.no_grad(): m[3].bias[(m[3].weight.flatten(1) == 0).all(1)] = 0; m[6].bias[(m[6].weight == 0).all(1)] = 0
    x = torch.randn(2, 4, 10)
    small = shrink(m, x)
    assert (small[0].out_channels, small[3].out_channels, small[6].in_features, small[6].out_features, small[8].in_features) == (8, 8, 80, 16, 16)
    assert _close(small(x), m(x))

def test_shrink_keeps_mode_flags_and_inputs_kinds():
    m = plain_cnn().train()
    Sparsifier(m, 'filter').sparsify_model(0.25)
    m[0].weight.requires_grad_(False)
    small = shrink(m, (X,))
    assert small.training and m.training
    assert not small[0].weight.requires_grad and small[3].weight.requires_grad and not m[0].weight.requires_grad
    small.eval(); m.eval()
    assert _close(small(X), m(X))

def test_shrink_refusals():
    torch.manual_seed(0)
    gc = _trained_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.Flatten(), nn.Linear(8*256, 2)))
    Sparsifier(gc, 'filter', include='0').sparsify_model(0.5)
    with pytest.raises(ValueError, match=r"layer '3' is a grouped convolution.*ignore=\['3'\]"): shrink(gc, X)
    assert shrink(gc, X, ignore='3')[0].out_channels == 8
    lnm = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)).eval()
    sp = Sparsifier(lnm, 'filter', layer_type=nn.Linear, include='0').sparsify_model(0.5)
    gone = ~sp.masks['0.weight'][:, 0]
    with torch.no_grad(): lnm[0].bias[gone] = 0; lnm[1].weight[gone] = 0; lnm[1].bias[gone] = 0
    with pytest.raises(ValueError, match=r"changes the model's output.*ignore=\['0'\]"): shrink(lnm, torch.randn(2, 16))
    m = plain_cnn()
    with pytest.raises(TypeError, match='example_input must be a tensor'): shrink(m, 'x')
    with pytest.raises(ValueError, match="ignore: 'conv9' matches no layer"): shrink(m, X, ignore='conv9')
    with pytest.raises(ValueError, match='could not trace'): shrink(m, torch.randn(2, 5, 16, 16))

def test_shrink_dense_model_is_a_copy():
    m = plain_cnn()
    small = shrink(m, X)
    assert small is not m and _params(small) == _params(m) and _close(small(X), m(X))

# ---- sparse inference ----

def _sparse_mlp(s=0.95, bias=True):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512, bias=bias), nn.ReLU(), nn.Linear(512, 512, bias=bias), nn.ReLU(), nn.Linear(512, 10))
    Sparsifier(m, 'weight', layer_type=nn.Linear, exclude='4').sparsify_model(s)
    return m.eval()

REPORT_COLS = ['layer', 'shape', 'sparsity', 'form', 'dense_ms', 'form_ms', 'speedup', 'error', 'note']

def test_to_sparse_inference_measures_and_agrees():
    m = _sparse_mlp()
    x = torch.randn(1, 256)
    fast,rep = to_sparse_inference(m, x, n=5)
    assert list(rep.columns) == REPORT_COLS and rep.layer.tolist() == ['0', '2', '4']
    assert rep.form.iloc[2] == 'dense' and math.isnan(rep.speedup.iloc[2])
    for _,r in rep.iloc[:2].iterrows():
        assert r.dense_ms > 0 and r.form_ms > 0 and math.isclose(r.speedup, r.dense_ms/r.form_ms)
        assert (r.form == 'csr') == (r.speedup >= 1.1) == isinstance(fast.get_submodule(r.layer), SparseLinear)
    assert _close(fast(x), m(x)) and not fast.training
    assert all(isinstance(l, nn.Linear) for l in (m[0], m[2]))  # input model untouched

@pytest.mark.parametrize('shape', [(256,), (1, 256), (7, 256), (2, 3, 256)])
@pytest.mark.parametrize('bias', [True, False])
def test_forced_csr_any_input_shape(shape, bias):
    m = _sparse_mlp(0.9, bias)
    fast,rep = to_sparse_inference(m, torch.randn(2, 256), min_speedup=1e-9, n=1, warmup=0)
    assert rep.form.tolist() == ['csr', 'csr', 'dense']
    x = torch.randn(*shape)
    assert _close(fast(x), m(x))
    cp,cf = count_params(m),count_params(fast)
    assert cp.params.tolist() == cf.params.tolist() and cp.nonzero.tolist() == cf.nonzero.tolist()
    assert cf.stored.iloc[:2].tolist() == ['dense+sparse_csr' if bias else 'sparse_csr']*2

def test_to_sparse_inference_thresholds_and_errors():
    m = _sparse_mlp(0.6)
    _,rep = to_sparse_inference(m, torch.randn(1, 256), min_sparsity=0.7, n=1)
    assert rep.form.tolist() == ['dense']*3 and rep.note.str.contains('min_sparsity').all()
    _,rep = to_sparse_inference(m, torch.randn(1, 256), min_speedup=1e9, n=1)
    assert rep.form.tolist() == ['dense']*3 and rep.note.iloc[0].startswith('best csr')
    with pytest.raises(ValueError, match=r"forms='bsr' is not valid; choose one of \['csr', 'semi_structured', 'int8'\]"):
        to_sparse_inference(m, torch.randn(1, 256), forms=['bsr'])
    with pytest.raises(ValueError, match='min_sparsity=150.0 is out of range'): to_sparse_inference(m, torch.randn(1, 256), min_sparsity=150)
    with pytest.raises(ValueError, match='n must be an integer >= 1, got 0'): to_sparse_inference(m, torch.randn(1, 256), n=0)

def test_int8_mix_measured_per_layer():
    m = _sparse_mlp(0.7)
    x = torch.randn(8, 256)
    fast,rep = to_sparse_inference(m, x, forms=['csr', 'int8'], n=5)
    assert list(rep.columns) == REPORT_COLS
    kinds = {'dense': nn.Linear, 'csr': SparseLinear, 'int8': Int8Linear}
    for _,r in rep.iterrows():
        assert type(fast.get_submodule(r.layer)) is kinds[r.form], r.layer
        if r.form != 'dense': assert r.speedup >= 1.1 and 0 <= r.error <= 0.05
        else: assert r.error == 0
    assert max_rel_error(fast(x), m(x)) <= 0.1
    # every layer forced to int8: the pattern of non-zeros is kept and the outputs stay close, for any input shape
    all8,rep8 = to_sparse_inference(m, x, forms='int8', min_speedup=1e-9, n=1, warmup=0)
    assert rep8.form.tolist() == ['int8']*3 and (rep8.error > 0).all()
    assert count_params(all8).nonzero.tolist() == count_params(m).nonzero.tolist()
    for shape in [(256,), (1, 256), (2, 3, 256)]:
        xi = torch.randn(*shape)
        assert all8(xi).shape == m(xi).shape and max_rel_error(all8(xi), m(xi)) <= 0.1

def test_whole_model_timed_when_layers_end_in_different_forms():
    "Layer timings need not add up: a mix is timed whole against each of its forms alone, and the fastest comes back"
    torch.manual_seed(0)
    two = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 256))
    Sparsifier(two, 'weight', layer_type=nn.Linear, exclude='2').sparsify_model(0.999)  # CSR far ahead there; layer 2 dense: int8 only
    x = torch.randn(1, 2048)
    fast,rep = to_sparse_inference(two, x, forms=['csr', 'int8'], min_speedup=1e-9, n=5)
    wm = rep.attrs['whole_model']
    assert set(wm) == {'mix', 'csr', 'int8'} and all(v > 0 for v in wm.values())
    best = min(wm, key=wm.get)
    want = {'mix': ['csr', 'int8'], 'csr': ['csr', 'dense'], 'int8': ['int8', 'int8']}[best]
    assert rep.form.tolist() == want
    kinds = {'dense': nn.Linear, 'csr': SparseLinear, 'int8': Int8Linear}
    for (_,r),was in zip(rep.iterrows(), ['csr', 'int8']):
        assert type(fast.get_submodule(r.layer)) is kinds[r.form]
        assert r.note.startswith('whole model') == (r.form != was)
    assert max_rel_error(fast(x), two(x)) <= 0.1
    _,off = to_sparse_inference(two, x, forms=['csr', 'int8'], min_speedup=1e-9, n=2, whole_model=False)
    assert off.attrs['whole_model'] == {} and off.form.tolist() == ['csr', 'int8']
    assert to_sparse_inference(two, x, n=2)[1].attrs['whole_model'] == {}  # one form: nothing to compare

def test_int8_tolerance_and_kernels():
    m = _sparse_mlp(0.7)
    _,rep = to_sparse_inference(m, torch.randn(4, 256), forms='int8', min_speedup=1e-9, n=1, int8_tol=1e-6)
    assert rep.form.tolist() == ['dense']*3 and rep.note.str.contains('> int8_tol').all()
    with pytest.raises(ValueError, match='int8_tol must be a finite number > 0, got 0'):
        to_sparse_inference(m, torch.randn(1, 256), forms='int8', int8_tol=0)
    x = torch.randn(5, 256)
    ref = m[0](x)
    for k in ('fbgemm', 'int_mm'):
        il = Int8Linear(m[0], k)
        assert il.kernel == k and max_rel_error(il(x), ref) < 0.03
    with pytest.raises(ValueError, match=r"kernel='x' is not valid; choose one of \['fbgemm', 'int_mm'\]"): Int8Linear(m[0], 'x')

def test_int8_whole_model_error_warns():
    "Each layer within int8_tol, the model not: a difference of two nearly equal int8 outputs amplifies their errors"
    torch.manual_seed(0)
    w = torch.randn(64)
    m = nn.Sequential(nn.Linear(64, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.stack([w, w + 0.01*torch.randn(64)])); m[1].weight.copy_(torch.tensor([[1., -1.]]))
    with pytest.warns(UserWarning, match=r"output error is .*% of its largest output, beyond 2\*int8_tol=0.4"):
        _,rep = to_sparse_inference(m, torch.randn(16, 64), forms='int8', min_speedup=1e-9, n=1, int8_tol=0.2)
    assert rep.form.iloc[0] == 'int8' and rep.error.iloc[0] < 0.2

def test_int8_model_saves_and_loads(tmp_path):
    m = _sparse_mlp(0.9)
    all8,_ = to_sparse_inference(m, torch.randn(4, 256), forms='int8', min_speedup=1e-9, n=1, warmup=0)
    x = torch.randn(3, 256)
    torch.save(all8.state_dict(), tmp_path/'sd.pt')
    again,_ = to_sparse_inference(_sparse_mlp(0.5), torch.randn(4, 256), forms='int8', min_speedup=1e-9, n=1, warmup=0)
    again.load_state_dict(torch.load(tmp_path/'sd.pt'))  # int8 weights and scales; the kernels repack
    assert torch.equal(again(x), all8(x))
    torch.save(all8, tmp_path/'m.pt')
    assert torch.equal(torch.load(tmp_path/'m.pt', weights_only=False)(x), all8(x))
    sr = size_report(all8).set_index('tensor')
    assert sr.loc['0.weight', 'dtype'] == 'int8' and sr.loc['0.weight', 'stored_bytes'] == 256*512

def test_unused_linear_is_left():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a,self.unused = nn.Linear(64, 64),nn.Linear(64, 64)
        def forward(self, x): return self.a(x)
    m = WithUnused()
    Sparsifier(m, 'weight', layer_type=nn.Linear).sparsify_model(0.9)
    fast,rep = to_sparse_inference(m, torch.randn(1, 64), min_speedup=1e-9, n=1)
    assert rep.set_index('layer').loc['unused', 'note'].startswith('not called') and isinstance(fast.unused, nn.Linear)

def test_time_inference_is_honest():
    m = _sparse_mlp(0.9)
    dense = _sparse_mlp(0.)
    df = time_inference({'dense': dense, 'masked': m}, torch.randn(4, 256), n=3)
    assert df.note.iloc[1].endswith('zeros stored densely: dense speed') and df.speedup.iloc[0] == 1
    fast,_ = to_sparse_inference(m, torch.randn(4, 256), min_speedup=1e-9, n=1)
    assert time_inference(fast, torch.randn(4, 256), n=2).note.iloc[0] == 'sparse kernels'

@pytest.mark.cuda
def test_semi_structured_on_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0): pytest.skip('needs an Ampere+ GPU')
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).half().cuda().eval()
    Sparsifier(m, 'weight', nm=True, layer_type=nn.Linear).sparsify_model(0.5)
    x = torch.randn(128, 1024, device='cuda', dtype=torch.half)
    fast,rep = to_sparse_inference(m, x, min_speedup=1e-9, forms=['semi_structured'], n=3)
    assert rep.form.tolist() == ['semi_structured']*2
    assert torch.allclose(fast(x).float(), m(x).float(), rtol=1e-2, atol=1e-2)
    assert size_report(fast).set_index('tensor').loc['0.weight', 'stored'] == 'semi_structured'

@pytest.mark.cuda
def test_csr_on_gpu():
    if not torch.cuda.is_available(): pytest.skip('needs a CUDA GPU')
    m = _sparse_mlp(0.95).cuda()
    x = torch.randn(4, 256, device='cuda')
    fast,rep = to_sparse_inference(m, x, min_speedup=1e-9, forms=['csr'], n=3)
    assert rep.form.tolist() == ['csr', 'csr', 'dense']
    assert torch.allclose(fast(x), m(x), rtol=1e-4, atol=1e-4)

# ---- sizes and compressed saving ----

def test_size_report_exact():
    lin = nn.Linear(10, 20)  # weight (20, 10)
    with torch.no_grad():
        lin.weight.zero_(); lin.weight[::2, :3] = 1.  # 10 rows x 3 = 30 non-zeros of 200
        lin.bias.fill_(1.)
    sr = size_report(lin).set_index('tensor')
    w,b,t = sr.loc['weight'],sr.loc['bias'],sr.loc['total']
    assert (w.numel, w.nonzero, w.dense_bytes, w.stored_bytes, w.stored) == (200, 30, 800, 800, 'dense')
    assert w.bitmask_bytes == math.ceil(200/8) + 30*4 and w.csr_bytes == 30*(4+4) + 4*21
    assert w.simulated and not b.simulated and t.simulated
    assert (t.numel, t.nonzero, t.dense_bytes) == (220, 50, 880)
    conv = size_report(SparseLinear(lin)).set_index('tensor').loc['weight']
    assert (conv.stored, conv.stored_bytes, conv.simulated) == ('sparse_csr', 30*4 + 30*4 + 21*4, False)
    assert (w.int8_bytes, w.int8_bitmask_bytes) == (200 + 4*20, 25 + 30 + 4*20)
    assert (b.int8_bytes, b.int8_bitmask_bytes) == (80, 3 + 80)  # 1-D: kept in float32
    assert t.int8_bitmask_bytes == w.int8_bitmask_bytes + b.int8_bitmask_bytes
    half = size_report(lin.half()).set_index('tensor').loc['weight']
    assert (half.dense_bytes, half.bitmask_bytes, half.csr_bytes) == (400, 25 + 60, 30*6 + 84)

def test_size_report_dense_model_not_simulated():
    m = plain_cnn()  # BatchNorm's num_batches_tracked is 0: an integer counter, not a simulated zero
    assert not size_report(m).simulated.iloc[-1]

def _bits(t): return t.view(torch.uint8) if t.is_floating_point() and t.dim() else t

@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_save_compressed_round_trip_bit_exact(tmp_path, dtype):
    m = plain_cnn()
    Sparsifier(m, 'weight', layer_type=(nn.Conv2d, nn.Linear)).sparsify_model(0.8)
    m = m.to(dtype)
    with torch.no_grad():
        w = m[3].weight
        w.view(-1)[0] = -0.0; w.view(-1)[1] = float('nan'); w.view(-1)[2] = float('-inf')
    info = save_compressed(m, tmp_path/'m.fsz')
    assert set(info) == {'path', 'bits', 'file_bytes', 'state_dict_bytes', 'ratio'}
    assert info['file_bytes'] == (tmp_path/'m.fsz').stat().st_size and info['ratio'] > 2
    sd,ref = load_compressed(tmp_path/'m.fsz'),m.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and sd[k].shape == ref[k].shape, k
        assert torch.equal(_bits(sd[k].contiguous()), _bits(ref[k].contiguous())), k  # bit-exact: -0.0, NaN, inf
    m2 = load_compressed(tmp_path/'m.fsz', plain_cnn().to(dtype))
    for k,v in m2.state_dict().items(): assert torch.equal(_bits(v), _bits(ref[k])), k

@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_save_compressed_int8(tmp_path, dtype):
    m = plain_cnn(bias=True)
    Sparsifier(m, 'weight', layer_type=(nn.Conv2d, nn.Linear)).sparsify_model(0.9)
    m = m.to(dtype)
    info = save_compressed(m, tmp_path/'m8.fsz', bits=8)
    full = save_compressed(m, tmp_path/'m.fsz')
    assert info['bits'] == 8 and info['file_bytes'] < full['file_bytes']
    sd,ref = load_compressed(tmp_path/'m8.fsz'),m.state_dict()
    assert list(sd) == list(ref)
    for k,v in ref.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        if v.is_floating_point() and v.dim() >= 2 and v.numel() >= 64:
            assert torch.equal(sd[k] == 0, v == 0), k  # zeros exact, non-zeros kept
            step = v.float().reshape(v.shape[0], -1).abs().amax(1)/127
            err = (sd[k].float() - v.float()).reshape(v.shape[0], -1).abs()
            assert (err <= step[:, None]*1.01 + 1e-3*v.float().abs().reshape(v.shape[0], -1)).all(), k  # one step (+ dtype rounding)
        else: assert torch.equal(sd[k], v), k  # biases, BatchNorm statistics, counters: as they were
    m2 = load_compressed(tmp_path/'m8.fsz', plain_cnn(bias=True).to(dtype))
    assert max_rel_error(m2(X.to(dtype)), m(X.to(dtype))) < 0.05

def test_save_compressed_int8_size_of_90pct_linear(tmp_path):
    lin = nn.Linear(2048, 2048)
    Sparsifier(lin, 'weight', layer_type=nn.Linear).sparsify_model(0.9)
    info = save_compressed(lin, tmp_path/'l.fsz', bits=8)
    w = size_report(lin).set_index('tensor').loc['weight']
    assert 1/info['ratio'] < 0.07  # about 5.7%: bitmask + int8 non-zeros + scales, the bias in float32
    assert abs(info['file_bytes'] - (w.int8_bitmask_bytes + 2048*4)) < 4096  # the file is what size_report says, plus pickling
    with pytest.raises(ValueError, match=r"bits=16 is not valid; choose one of \[None, 8\]"): save_compressed(lin, tmp_path/'x', bits=16)

def test_save_compressed_state_dict_and_errors(tmp_path):
    sd = {'a': torch.zeros(1000), 'b': torch.arange(100), 'c': torch.tensor(3.)}
    save_compressed(sd, tmp_path/'s.pt')
    back = load_compressed(tmp_path/'s.pt')
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    torch.save(sd, tmp_path/'plain.pt')
    with pytest.raises(ValueError, match='not a file written by save_compressed'): load_compressed(tmp_path/'plain.pt')
    with pytest.raises(TypeError, match='model must be an nn.Module or a state dict'): save_compressed([1], tmp_path/'x.pt')
    with pytest.raises(RuntimeError): load_compressed(tmp_path/'s.pt', nn.Linear(2, 2))  # strict by default

def test_shrink_keyword_input():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = plain_cnn()
        def forward(self, pixels): return self.net(pixels)
    m = KW().eval()
    Sparsifier(m, 'filter').sparsify_model(0.5)
    small = shrink(m, {'pixels': X})
    assert small.net[0].out_channels == 8 and _close(small(pixels=X), m(pixels=X))
