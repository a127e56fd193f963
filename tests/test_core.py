"""The framework-free core (`SparseTraining`) in a plain PyTorch loop, the same trajectory as the fastai callback, one
schedule over `fine_tune`, a training layer that relies only on fastai's documented behaviour, and a public surface
that shadows nothing."""
import re, subprocess, sys, warnings
from functools import partial
from pathlib import Path
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastai.basics import Learner, Callback, OptimWrapper, CrossEntropyLossFlat, accuracy, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastsparse.sparse_training import SparseTraining, opt_states
from fastsparse.callback import SparsifyCallback
from fastsparse.schedule import agp
from fastsparse.sparsifier import Sparsifier
from fastsparse.tensors import select_tensors
from fastsparse.export import save_compressed, load_compressed
from fastsparse.demo import digits_dls, digits_mlp

ROOT = Path(__file__).resolve().parents[1]
adamw = partial(OptimWrapper, opt=partial(torch.optim.AdamW, weight_decay=0.05))
SETTINGS = dict(sparsity=0.9, context='global', schedule=agp, layer_type=nn.Linear)

def plain_loop(epochs=2, lr=3e-3):
    "digits_mlp trained by a plain PyTorch loop with SparseTraining; masks and state checked after every step"
    set_seed(0, reproducible=True)
    dls = digits_dls(shuffle=False)
    model = digits_mlp(32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    st = SparseTraining(model, opt, epochs * len(dls.train), **SETTINGS)
    checked = 0
    for _ in range(epochs):
        model.train()
        for xb, yb in dls.train:   # fastai's batches, as plain tensors
            xb, yb = xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)
            F.cross_entropy(model(xb), yb).backward()
            st.after_backward()
            opt.step()
            st.after_step()
            opt.zero_grad()
            for name, mask in st.masks.items():
                p = model.get_parameter(name)
                assert (p[~mask] == 0).all(), name
                for v in opt_states(opt, p): assert (v[~mask] == 0).all(), name
            checked += 1
    return model, st, checked

def test_plain_loop_holds_masks_and_counts():
    model, st, checked = plain_loop()
    assert checked == st.clock == st.total
    rep = st.sparsity_report().set_index('layer')
    assert rep.loc['total', 'zeros'] == round(0.9 * rep.loc['total', 'params'])   # global: exactly round(s*N)
    assert st.settled() and st.history[-1]['sparsity'] == pytest.approx(0.9, abs=1e-4)

def test_plain_loop_equals_the_callback():
    "Same seed, data order and settings: the fastai callback ends with the plain loop's masks and weights"
    model, st, _ = plain_loop()
    set_seed(0, reproducible=True)
    dls = digits_dls(shuffle=False)
    cb = SparsifyCallback(**SETTINGS)
    learn = Learner(dls, digits_mlp(32), loss_func=CrossEntropyLossFlat(), opt_func=adamw, wd_bn_bias=True, cbs=cb)
    with learn.no_logging(): learn.fit(2, 3e-3)
    assert cb.masks.keys() == st.masks.keys()
    assert all(torch.equal(cb.masks[k], st.masks[k]) for k in st.masks)
    for (k, v), (k2, v2) in zip(learn.model.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.allclose(v, v2, atol=1e-6), k

def test_core_imports_no_fastai():
    code = ("import sys, fastsparse.sparse_training, fastsparse.dst, fastsparse.sparsifier; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastai', 'torchvision')); assert not bad, bad")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)

def test_training_layer_uses_documented_fastai_only():
    "No call-stack walks, no fastai lock, no __setattr__ override, no callbacks found by class-name strings"
    bad = re.compile(r"_getframe|\.lock\b|def __setattr__|__name__ ==|__name__\)? ?== ?'|__module__\.startswith\('fast")
    for f in ['training.py', 'callback.py', 'regularize.py', 'distributed.py', 'sensitivity.py', 'report.py']:
        src = (ROOT/'fastsparse'/f).read_text()
        assert not bad.search(src), (f, bad.search(src).group())

class AtFitEnd(Callback):
    "Record, after each fit of a fine-tune, the sparsity the model's conv weights hold"
    order = 100
    def __init__(self): self.seen = []
    def after_fit(self):
        convs = [m.weight for m in self.learn.model.modules() if isinstance(m, nn.Conv2d)]
        self.seen.append(sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs))

def test_fine_tune_runs_one_schedule_over_both_fits():
    "vision_learner's fine_tune(2): after the frozen epoch the sparsity is the schedule's value at 1/3 of the fine-tune, not the target"
    from fastai.vision.learner import vision_learner
    from torchvision.models import resnet18
    set_seed(0, reproducible=True)
    dls = digits_dls(bs=128, size=32, channels=3)
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=10, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    cb, probe = SparsifyCallback(0.8, schedule=agp, layer_type=nn.Conv2d), AtFitEnd()
    with learn.no_logging(): learn.fine_tune(2, 1e-3, freeze_epochs=1, cbs=[cb, probe])
    convs = {n: m.weight.numel() for n, m in learn.model.named_modules() if isinstance(m, nn.Conv2d)}
    N = sum(convs.values())
    frac = agp(1 / 3)   # the frozen epoch is a third of the fine-tune's batches
    assert len(probe.seen) == 2
    assert probe.seen[0] == pytest.approx(sum(round(0.8 * frac * n) for n in convs.values()) / N, abs=1e-9)
    assert probe.seen[0] < 0.6 and probe.seen[1] == pytest.approx(sum(round(0.8 * n) for n in convs.values()) / N, abs=1e-9)
    assert cb.clock == cb.total == 3 * len(dls.train)
    assert learn.recorder.metric_names.items.count('sparsity') == 1

def test_star_import_shadows_nothing():
    "After `from fastai.vision.all import *`, `from fastsparse.all import *` replaces no name of fastai, builtins or the standard library"
    code = ("import sys, builtins, fastai.vision.all as fv, fastsparse.all as fa; "
            "taken = set(dir(fv)) | set(dir(builtins)) | set(sys.stdlib_module_names); "
            "clash = sorted(set(fa.__all__) & taken); assert not clash, clash; "
            "ns = {}; exec('from fastai.vision.all import *; from fastsparse.all import *; random.seed(0); sched_lin(0, 1, .5)', ns)")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)

def test_attention_selected_whole():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), 1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # nothing of the attention is left dense: no warning
        sel = select_tensors(enc, nn.MultiheadAttention)
    assert [t.name for t in sel.values()] == ['layers.0.self_attn.in_proj_weight', 'layers.0.self_attn.out_proj.weight']
    sp = Sparsifier(enc, layer_type=nn.MultiheadAttention).sparsify_model(0.5)
    assert int((~sp.masks['layers.0.self_attn.out_proj.weight']).sum()) == 32
    with pytest.warns(UserWarning) as w: select_tensors(enc, nn.Linear)   # in_proj left dense: named, with a public remedy
    assert 'NonDynamicallyQuantizable' not in str(w[0].message) and 'add MultiheadAttention to layer_type' in str(w[0].message)

def test_bad_inputs_named():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got list"): Sparsifier([1, 2, 3])
    with torch.device('meta'): meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"'meta' device \(0.weight, 0.bias, \.\.\.\).*to_empty"): Sparsifier(meta, layer_type=nn.Linear)
    with pytest.raises(ValueError, match="'meta' device"): SparseTraining(meta, None, 10, sparsity=0.5, layer_type=nn.Linear)

def test_truncated_compressed_file(tmp_path):
    m = nn.Sequential(nn.Linear(64, 64))
    Sparsifier(m, layer_type=nn.Linear).sparsify_model(0.9)
    f = tmp_path/'m.fsz'
    save_compressed(m, f)
    data = f.read_bytes()
    (tmp_path/'cut.fsz').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"is truncated or corrupt"): load_compressed(tmp_path/'cut.fsz')
    (tmp_path/'junk.fsz').write_bytes(b'not a file of save_compressed')
    with pytest.raises(ValueError, match=r"is truncated or corrupt"): load_compressed(tmp_path/'junk.fsz')
