"""A sparse fit beside fastai's own callbacks: each ends at the sparsity asked, or warns naming the tensors and the
cause; masks and optimizer state hold after every step; `lr_find`, `fine_tune`, `tta` and `show_results` work around it."""
import warnings
import numpy as np
import pytest, torch, torch.nn as nn
from fastai.basics import Learner, CrossEntropyLossFlat, accuracy, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback, ReduceLROnPlateau, TerminateOnNaNCallback
from fastai.callback.training import GradientClip, GradientAccumulation, BnFreeze
from fastai.callback.mixup import MixUp, CutMix
from fastai.callback.progress import CSVLogger
from fastai.callback.channelslast import ChannelsLast
from fastsparse.callback import SparsifyCallback, DynamicSparseCallback
from fastsparse.tracker import SaveSparseModelCallback, SparseEarlyStoppingCallback
from fastsparse.training import SparsityColumn
from fastsparse.schedule import agp
from fastsparse.demo import digits_dls, digits_cnn, digits_data
from masks_held import CheckMasks

CONV_LIN = (nn.Conv2d, nn.Linear)
def sparsify(end=0.5): return SparsifyCallback(0.8, schedule=agp.with_pcts(0, end), layer_type=CONV_LIN)
def dst(): return DynamicSparseCallback(0.8, 'rigl', update_every=4, layer_type=CONV_LIN)
MAKERS = {'sparsify': sparsify, 'dst': dst}

def learner(cb, path=None):
    set_seed(0, reproducible=True)
    return Learner(digits_dls(), digits_cnn(8), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb, path=path or '.')

def fit(learn, n=2, cbs=()):
    "Fit, returning the warnings about sparsity below the target"
    with warnings.catch_warnings(record=True) as w, learn.no_logging(), learn.no_bar():
        warnings.simplefilter('always')
        learn.fit_one_cycle(n, 1e-2, cbs=list(cbs))
    return [str(x.message) for x in w if 'below the sparsity asked' in str(x.message)]

def exact(learn):
    "Every selected tensor holds exactly its target count of zeros"
    rep = learn.sparsity_report().set_index('layer').drop('total')
    assert (rep.zeros == (rep.target * rep.params).round()).all(), rep[['zeros', 'target', 'params']]

def others(tmp_path):
    return {'ReduceLROnPlateau': lambda: ReduceLROnPlateau(patience=0),
            'GradientClip': lambda: GradientClip(0.1),
            'GradientAccumulation': lambda: GradientAccumulation(128),
            'MixUp': MixUp, 'CutMix': CutMix, 'BnFreeze': BnFreeze,
            'TerminateOnNaN': TerminateOnNaNCallback,
            'CSVLogger': lambda: CSVLogger(fname=str(tmp_path/'history.csv')),
            'ChannelsLast': ChannelsLast}
NAMES = ['ReduceLROnPlateau', 'GradientClip', 'GradientAccumulation', 'MixUp', 'CutMix', 'BnFreeze', 'TerminateOnNaN',
         'CSVLogger', 'ChannelsLast']

@pytest.mark.parametrize('kind', list(MAKERS))
@pytest.mark.parametrize('other', NAMES)
def test_composes(kind, other, tmp_path):
    cb, chk = MAKERS[kind](), CheckMasks()
    learn = learner(cb, tmp_path)
    warned = fit(learn, 2, [others(tmp_path)[other](), chk])
    assert warned == [] and chk.n > 0
    exact(learn)
    assert learn.recorder.metric_names.items.count('sparsity') == 1 and not any(isinstance(m, SparsityColumn) for m in learn.metrics)
    if other == 'CSVLogger': assert 'sparsity' in (tmp_path/'history.csv').read_text().splitlines()[0]

# monitoring the sparsity column (lowest first) makes the best epoch the first one, and stops the fit after the second
def lowest_sparsity(cls, **kw): return cls(monitor='sparsity', comp=np.less, **kw)

def test_save_model_reloading_an_early_epoch_warns(tmp_path):
    learn = learner(sparsify(end=1.), tmp_path)
    warned = fit(learn, 3, [lowest_sparsity(SaveModelCallback, fname='best')])
    assert len(warned) == 1 and 'weights were loaded after the last batch' in warned[0] and 'SaveSparseModelCallback' in warned[0]
    rep = learn.sparsity_report().set_index('layer')
    assert rep.loc['total', 'achieved'] == pytest.approx(0.8 * agp(1/3), abs=0.01)   # the report reads the weights kept: the first epoch's
    for n in ('0', '3', '7', '12'): assert f"{n} " in warned[0]   # every tensor named, with its sparsity

def test_save_sparse_model_keeps_the_target(tmp_path):
    learn = learner(sparsify(end=0.5), tmp_path)
    assert fit(learn, 4, [lowest_sparsity(SaveSparseModelCallback, fname='best')]) == []
    exact(learn)

def test_early_stopping_mid_schedule_warns():
    learn = learner(sparsify(end=1.))
    warned = fit(learn, 4, [lowest_sparsity(EarlyStoppingCallback, patience=1)])
    assert len(warned) == 1 and 'cancelled in epoch 2 of 4' in warned[0] and 'SparseEarlyStoppingCallback' in warned[0]

def test_sparse_early_stopping_keeps_the_target():
    learn = learner(sparsify(end=0.5))
    assert fit(learn, 4, [lowest_sparsity(SparseEarlyStoppingCallback, patience=1)]) == []
    exact(learn)

def test_save_sparse_model_without_a_final_epoch_warns(tmp_path):
    "A fit stopped before its schedule ended has no epoch at the final sparsity: nothing to load, and it says so"
    learn = learner(sparsify(end=1.), tmp_path)
    stop = lowest_sparsity(EarlyStoppingCallback, patience=1)
    with pytest.warns(UserWarning, match='no epoch ended at the final sparsity'), learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(4, 1e-2, cbs=[SaveSparseModelCallback(monitor='valid_loss', fname='best'), stop])

@pytest.mark.parametrize('kind', list(MAKERS))
def test_lr_find_then_fit(kind):
    "The callback stands aside while lr_find probes (its weights come back), then the fit reaches the target"
    learn = learner(MAKERS[kind]())
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_logging(), learn.no_bar(): learn.lr_find(num_it=20, show_plot=False)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k]), k
    assert not any(isinstance(m, SparsityColumn) for m in learn.metrics)
    assert fit(learn, 2) == []
    exact(learn)

def test_fine_tune_tta_show_results_predict():
    learn = learner(sparsify(end=0.5))
    with learn.no_logging(), learn.no_bar(): learn.fine_tune(2, 1e-2, freeze_epochs=1)
    exact(learn)
    preds, targs = learn.tta(n=2)
    assert (preds.argmax(1) == targs).float().mean() > 0.5
    learn.show_results(max_n=4)
    x = digits_data()[1].x[0]
    cat, idx, probs = learn.predict(x)
    assert probs.shape == (10,) and int(idx) == int(cat)
    exact(learn)   # nothing above changed a weight
