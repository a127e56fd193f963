"""Sparse training on a CUDA GPU, where users train: fastai's `to_fp16()` (a real `GradScaler` that really skips steps) and
`to_bf16()` with every callback that trains with masks (SparsifyCallback with magnitude, taylor, wanda and movement;
DynamicSparseCallback; FixedSparsityCallback), an LSTM under fp16 autocast, masks on their weights' device, exact selection
against a stable sort and bit for bit against the CPU, and a steady-state step that never waits for the GPU.

Each check is parametrized by device. The `cuda` cases are marked `cuda` (they skip, with the reason, where torch finds no
GPU); the `cpu` cases run the same test bodies on the CPU -- fp16 and bf16 autocast with fastai's own `MixedPrecision`
moved to the CPU (`cpu_amp.py`), an LSTM under bf16 (the CPU's LSTM refuses fp16) -- so the tests themselves are checked
where no GPU is. The last test runs `bench/gpu.py --quick` on the CPU. With `FASTSPARSE_TEST_DEVICE=cuda` (a run on the GPU)
the CPU cases skip."""
import copy, os, re, subprocess, sys, warnings
from contextlib import contextmanager
from pathlib import Path
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, set_seed
from fastai.callback.fp16 import MixedPrecision  # noqa: F401 (patches Learner.to_fp16 / to_bf16)
from fastsparse.callback import SparsifyCallback, DynamicSparseCallback, FixedSparsityCallback
from fastsparse.training import MaskedTraining
from fastsparse.sparse_training import SparseTraining, FixedMasks
from fastsparse.dst import random_masks, DynamicSparse
from fastsparse.sparsifier import Sparsifier
from fastsparse.select import select_keep, ScoreFn
from fastsparse.schedule import linear
from fastsparse.demo import digits_dls, digits_cnn, digits_mlp
from cpu_amp import CPUMixedPrecision, CountSteps
from masks_held import CheckMasks
from devices import ON_CUDA

ROOT = Path(__file__).resolve().parents[1]
CONV_LIN = (nn.Conv2d, nn.Linear)
CPU_CASE = pytest.mark.skipif(ON_CUDA, reason="a CPU case (CI runs it): FASTSPARSE_TEST_DEVICE=cuda runs the GPU's")
DEVICES = [pytest.param('cpu', id='cpu', marks=CPU_CASE), pytest.param('cuda', id='cuda', marks=pytest.mark.cuda)]
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}

def learner(device, model=None, cbs=None, amp=None, seed=0, **kw):
    "A Learner on digits on `device`; `amp` 'fp16' (a grad scaler that starts far too high: it skips the first steps) or 'bf16'"
    set_seed(seed, reproducible=True)
    learn = Learner(digits_dls(device=torch.device(device)), model if model is not None else digits_cnn(8),
                    loss_func=CrossEntropyLossFlat(), cbs=cbs, **kw)
    if amp == 'fp16': learn.to_fp16(init_scale=2.**30) if device == 'cuda' else learn.add_cb(CPUMixedPrecision(init_scale=2.**30))
    elif amp == 'bf16': learn.to_bf16() if device == 'cuda' else learn.add_cb(CPUMixedPrecision(amp_mode='bf16'))
    return learn

def exact(cb):
    "Every selected tensor has exactly its target count of masked weights"
    sp = cb.sparsifier
    for n, t in sp.tensors.items():
        m = cb.masks[t.name]
        assert int((~m).sum()) == round(sp.targets[n] * m.numel()), n

def on_their_weights(learn, cb, device):
    "Every mask lives on its weight's device, which is `device`"
    for name, m in cb.masks.items():
        assert m.device == learn.model.get_parameter(name).device and m.device.type == device, name

def fit_amp(learn, cb, amp):
    "Fit with masks and fp16 (two epochs: the scaler skips the first steps) or bf16 (one); check masks and state after every step, the clock, the dtype"
    chk, cnt, epochs = CheckMasks(), CountSteps(), 2 if amp == 'fp16' else 1
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # skipped steps leave the schedule short of its end: the callback says so
        learn.fit(epochs, 1e-2, cbs=[chk, cnt])
    n = epochs * len(learn.dls.train)
    assert cnt.pred_dtypes == {DTYPES[amp]}
    if amp == 'fp16': assert cnt.skipped >= 10   # the scaler itself skipped them (`CountSteps` checks each is an overflow)
    else: assert cnt.skipped == 0
    assert cb.clock == cnt.done and chk.n == n
    return cnt

# ---- fp16 and bf16 with every callback that trains with masks
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
@pytest.mark.parametrize('crit', ['large_final', 'taylor', 'wanda', 'movement'])
def test_sparsify_under_amp(device, amp, crit):
    cb = SparsifyCallback(0.8, criteria=crit, schedule=linear.with_pcts(0., 0.75), layer_type=CONV_LIN)
    learn = learner(device, cbs=[cb], amp=amp)
    fit_amp(learn, cb, amp)
    exact(cb); on_their_weights(learn, cb, device)

KINDS = {
    'dst': lambda: DynamicSparseCallback(0.8, 'rigl', update_every=5, layer_type=CONV_LIN),
    'fixed': lambda: FixedSparsityCallback(random_masks(digits_cnn(8), 0.8, layer_type=CONV_LIN, seed=1)),
}
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
@pytest.mark.parametrize('kind', list(KINDS))
def test_dst_and_fixed_under_amp(device, amp, kind):
    cb = KINDS[kind]()
    learn = learner(device, cbs=[cb], amp=amp)
    fit_amp(learn, cb, amp)
    exact(cb); on_their_weights(learn, cb, device)
    if kind == 'dst': assert len(cb.policy.history) >= 2   # connections moved at update steps the clock counted

class RowLSTM(nn.Module):
    "Digits read row by row: 8 steps of 8 features, an LSTM, a linear head on the last step"
    def __init__(self, hidden=32): super().__init__(); self.rnn, self.head = nn.LSTM(8, hidden, batch_first=True), nn.Linear(hidden, 10)
    def forward(self, x): return self.head(self.rnn(x.reshape(x.shape[0], 8, 8))[0][:, -1])

@pytest.mark.parametrize('device,amp', [pytest.param('cpu', 'bf16', id='cpu-bf16', marks=CPU_CASE),  # the CPU's LSTM refuses fp16
                                        pytest.param('cuda', 'fp16', id='cuda-fp16', marks=pytest.mark.cuda),
                                        pytest.param('cuda', 'bf16', id='cuda-bf16', marks=pytest.mark.cuda)])
def test_lstm_under_autocast(device, amp):
    cb = SparsifyCallback(0.7, schedule=linear.with_pcts(0., 0.75), layer_type=nn.LSTM)
    learn = learner(device, RowLSTM(), cbs=[cb], amp=amp)
    fit_amp(learn, cb, amp)
    assert sorted(t.name for t in cb.sparsifier.tensors.values()) == ['rnn.weight_hh_l0', 'rnn.weight_ih_l0']
    exact(cb); on_their_weights(learn, cb, device)

# ---- exact selection on the GPU: a stable sort's masks, and the CPU's, bit for bit
def lowest(s, k):
    "Keep-mask pruning the k lowest of `s`, ties by position: one stable sort (the reference)"
    keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
    keep[torch.sort(s, stable=True).indices[:k]] = False
    return keep

def score_sets():
    "Scores with ties in every place a cut can fall: few values, blocks of zeros (both signs), large tensors, many tensors"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600_000, generator=g).abs(); z[torch.rand(600_000, generator=g) < 0.7] = 0   # the zeros of masked weights
    return [[torch.randint(-2, 3, (5000,), generator=g).float()],
            [torch.zeros(300), -torch.zeros(200), torch.randn(700, generator=g)],
            [z, torch.randint(0, 20, (500_000,), generator=g).float(), torch.randn(40_000, generator=g)],
            [torch.randn(5_000_000, generator=g)]]

@pytest.mark.cuda
@pytest.mark.parametrize('kw', [{}, {'small': 0}, {'hold': 0}, {'small': 0, 'hold': 0, 'sample_size': 64}, {'small': 0, 'sample_size': 8, 'cap': 4}])
def test_selection_on_gpu_matches_sort_and_cpu(kw):
    for scores in score_sets():
        cuda = [s.cuda() for s in scores]
        flat = torch.cat(cuda); N = flat.numel()
        n_zero = int((flat == 0).sum())
        for k in sorted({0, 1, n_zero - 1, n_zero, n_zero + 1, N // 3, N // 2, N - 1, N} - {-1}):
            got = select_keep([ScoreFn(lambda s=s: s, s.numel(), device='cuda') for s in cuda], k, **kw)
            assert all(m.device.type == 'cuda' for m in got), k   # selected where the scores are
            assert torch.equal(torch.cat(got), lowest(flat, k)), (k, kw)
            cpu = select_keep([ScoreFn(lambda s=s: s, s.numel()) for s in scores], k, **kw)
            assert all(torch.equal(g.cpu(), c) for g, c in zip(got, cpu)), (k, kw)

@pytest.mark.cuda
@pytest.mark.parametrize('context', ['local', 'global'])
@pytest.mark.parametrize('crit', ['large_final', 'random', 'small_final'])
def test_sparsifier_on_gpu_equals_cpu(context, crit):
    "The same model on the CPU and on the GPU gets the same masks, bit for bit, ties included (elementwise scores are the same numbers)"
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(1100, 1000, bias=False), nn.Linear(300, 200, bias=False), nn.Linear(64, 3, bias=False))
    with torch.no_grad(): cpu[1].weight.copy_(torch.randint(-3, 4, cpu[1].weight.shape).float())   # heavy ties
    gpu = copy.deepcopy(cpu).cuda()
    a = Sparsifier(cpu, 'weight', context, crit, layer_type=nn.Linear)
    b = Sparsifier(gpu, 'weight', context, crit, layer_type=nn.Linear)
    for s in [0.3, 0.3001, 0.6, 0.9, 0.95]:
        a.sparsify_model(s); b.sparsify_model(s)
        for name, m in a.masks.items():
            assert b.masks[name].is_cuda and torch.equal(b.masks[name].cpu(), m), (name, s)

# ---- the steady state: no step waits for the GPU
_READS = {'item', 'tolist', '__bool__', '__int__', '__float__', '__index__', '__complex__', 'nonzero', 'argwhere', 'cpu', 'numpy',
          'masked_select', 'unique', 'unique_consecutive', 'equal', 'allclose', 'repeat_interleave', 'bincount'}

def _to_host(name, args, kwargs):
    "A `.to(...)` or `.copy_(...)` that brings a tensor from another device to the CPU"
    if name == 'copy_': return len(args) > 1 and args[0].device.type == 'cpu' and args[1].device.type != 'cpu'
    dst = kwargs.get('device', next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return dst is not None and torch.device(dst).type == 'cpu' and args[0].device.type != 'cpu'

class HostReads(TorchFunctionMode):
    "Records every torch call that brings tensor values to the host (on a GPU, a wait for it): `.item()`, `bool(t)`, `nonzero`, ..."
    def __init__(self): super().__init__(); self.calls = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', str(func))
        if name in _READS or (name in ('to', 'copy_') and _to_host(name, args, kwargs)): self.calls.append(name)
        return func(*args, **kwargs)

@contextmanager
def no_waits(device, seen:list):
    "Record the host reads inside into `seen`; on a GPU, also make any synchronisation an error (`set_sync_debug_mode`)"
    mode, old = HostReads(), torch.cuda.get_sync_debug_mode() if device == 'cuda' else None
    if device == 'cuda': torch.cuda.set_sync_debug_mode('error')
    try:
        with mode: yield
    finally:
        if device == 'cuda': torch.cuda.set_sync_debug_mode(old)
        seen.extend(mode.calls)

@pytest.mark.parametrize('device', DEVICES)
def test_the_watch_sees_a_wait(device):
    "The check below can fail: a read of a value, a branch on a tensor, a `nonzero` are seen (and on a GPU, raise)"
    x = torch.randn(100, device=device)
    for f in [lambda: x.sum().item(), lambda: bool((x > 0).any()), lambda: x.nonzero()]:
        seen = []
        if device == 'cuda':
            with pytest.raises(RuntimeError, match='synchroniz'), no_waits(device, seen): f()
        else:
            with no_waits(device, seen): f()
        assert seen, f

POLICIES = {  # settled from half-way through 20 steps: no mask changes after that
    'large_final': lambda: dict(sparsity=0.8, schedule=linear.with_pcts(0., 0.5), layer_type=nn.Linear),
    'taylor': lambda: dict(sparsity=0.8, criteria='taylor', schedule=linear.with_pcts(0., 0.5), layer_type=nn.Linear),
    'wanda': lambda: dict(sparsity=0.8, criteria='wanda', schedule=linear.with_pcts(0., 0.5), layer_type=nn.Linear),
    'movement': lambda: dict(sparsity=0.8, criteria='movement', schedule=linear.with_pcts(0., 0.5), layer_type=nn.Linear),
    'global': lambda: dict(sparsity=0.8, context='global', schedule=linear.with_pcts(0., 0.5), layer_type=nn.Linear),
    'rigl': lambda: dict(policy=DynamicSparse(0.8, 'rigl', update_every=2, stop_pct=0.5, layer_type=nn.Linear)),
    'fixed': lambda: dict(policy=FixedMasks(random_masks(digits_mlp(64), 0.8, layer_type=nn.Linear, seed=1))),
}

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('policy', list(POLICIES))
def test_steady_steps_of_the_core_never_wait(device, policy):
    "A plain loop: once the masks are settled, `after_backward`, `after_step` (re-zero, clock, policy) read nothing back from the device"
    torch.manual_seed(0)
    model = digits_mlp(64).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)   # (AdamW: the re-zero after the step is skipped)
    st = SparseTraining(model, opt, 20, **POLICIES[policy]())
    st.rezero = True   # re-zero after every step as well: every per-step call runs
    x, y = torch.randn(32, 1, 8, 8, device=device), torch.randint(0, 10, (32,), device=device)
    seen, watched = [], 0
    for step in range(20):
        steady = st.settled()
        F.cross_entropy(model(x), y).backward()
        if steady:
            with no_waits(device, seen): st.after_backward()
        else: st.after_backward()
        opt.step()
        if steady:
            with no_waits(device, seen): st.after_step()
            watched += 1
        else: st.after_step()
        opt.zero_grad()
    assert watched >= 5 and st.clock == 20
    assert seen == [], f"host reads in the steady per-step path: {seen}"

class Watch(Callback):
    "Runs every batch event of the callback that trains with masks under `no_waits` once its masks are settled"
    order = MaskedTraining.order + 1
    def __init__(self, device): self.device, self.seen, self.watched = device, [], 0

def watch_events(cb, w):
    "Wrap `cb` so that its batch events run under `no_waits` when its core is settled (a class of its own, as fastai calls `cb(event)`)"
    cls = type(cb)
    def __call__(self, event_name):
        steady = event_name in _BATCH and self.core is not None and self.core.settled() and self.learn.training
        if not steady: return cls.__call__(self, event_name)
        if event_name == 'after_batch': w.watched += 1
        with no_waits(w.device, w.seen): return cls.__call__(self, event_name)
    object.__setattr__(cb, '__class__', type(cls.__name__, (cls,), {'__call__': __call__}))

_BATCH = set("before_batch after_pred after_loss before_backward after_backward before_step after_step after_cancel_step after_batch".split())

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('amp', [None, 'fp16', 'bf16'])
@pytest.mark.parametrize('kind', ['large_final', 'taylor', 'wanda', 'dst'])
def test_steady_batches_of_the_callback_never_wait(device, amp, kind):
    "fastai: once the masks are settled, none of the callback's batch events reads anything back from the device"
    cb = (DynamicSparseCallback(0.8, 'rigl', update_every=3, stop_pct=0.3, layer_type=CONV_LIN) if kind == 'dst' else
          SparsifyCallback(0.8, criteria=kind, schedule=linear.with_pcts(0., 0.3), layer_type=CONV_LIN))
    w = Watch(device)
    watch_events(cb, w)
    learn = learner(device, cbs=[cb, w], amp=amp)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(2, 1e-2)
    assert w.watched >= 10
    assert w.seen == [], f"host reads in the callback's steady batch events: {w.seen}"

# ---- the GPU benchmark's smoke run
@CPU_CASE
def test_gpu_benchmark_quick_runs_on_cpu(tmp_path):
    "`bench/gpu.py --quick` (tiny sizes, on the CPU) runs every section and writes its result file"
    out = tmp_path/'gpu.md'
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    r = subprocess.run([sys.executable, str(ROOT/'bench'/'gpu.py'), '--quick', '--device', 'cpu', '--write-result', str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for part in ('1. Training', '2. One mask update', '3. Sparse inference'): assert part in r.stdout, part
    md = out.read_text()
    assert md.startswith('## ') and '<details' in md
    assert re.search(r'^Run: commit `[0-9a-f]{7,40}', md, re.M), "no stamp line"
    assert re.search(r'^```text\n\$ python bench/gpu\.py --quick --device cpu\b.*\n.+', md, re.M)   # the form the Benchmarks page takes
