"""fastai's applications through SparsifyCallback with the recommended settings: collaborative filtering (its bias
tables left dense), tabular embeddings; exact counts, masks that hold after every step, and `learn.export()` /
`load_learner` giving the same predictions."""
import importlib.util, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd
import pytest, torch, torch.nn as nn
from fastai.basics import load_learner, set_seed
from fastai.collab import CollabDataLoaders, collab_learner
from fastsparse.callback import SparsifyCallback
from fastsparse.recipes import recommended
from masks_held import CheckMasks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'bench'))  # the scripts import bench/common.py
_spec = importlib.util.spec_from_file_location('applications', ROOT/'bench'/'applications.py')
apps = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(apps)

def exact(learn, s):
    rep = learn.sparsity_report().set_index('layer').drop('total')
    assert (rep.zeros == (s * rep.params).round()).all(), rep[['zeros', 'params']]
    return rep

def same_predictions(learn, tmp_path):
    learn.path = tmp_path
    learn.export('export.pkl')
    l2 = load_learner(tmp_path/'export.pkl')
    a, _ = learn.get_preds(dl=learn.dls.valid)
    b, _ = l2.get_preds(dl=learn.dls.valid)
    assert torch.equal(a, b)

@pytest.mark.parametrize('use_nn', [False, True], ids=['dot', 'neural'])
def test_collab_recommended(use_nn, tmp_path):
    set_seed(0, reproducible=True)
    dls = CollabDataLoaders.from_df(apps.ratings(n=6000), bs=256, seed=42, valid_pct=0.2, device='cpu')
    cb, chk = SparsifyCallback(0.7, **recommended('collab')), CheckMasks()
    learn = collab_learner(dls, n_factors=16, use_nn=use_nn, layers=[32], y_range=(0, 5.5), cbs=[cb, chk])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 5e-3, wd=0.1)
    assert chk.n == 3 * len(dls.train)
    rep = exact(learn, 0.7)
    if not use_nn:   # the per-user and per-item biases (width-1 embeddings) are not selected, and stay dense
        assert list(rep.index) == ['u_weight', 'i_weight']
        assert int((learn.model.u_bias.weight == 0).sum()) == 0
    else: assert {'embeds.0', 'embeds.1'} <= set(rep.index) and any(n.startswith('layers') for n in rep.index)
    same_predictions(learn, tmp_path)

def test_tabular_recommended(tmp_path):
    learn = apps.Tabular().learner(0.5, 0)
    cb, chk = SparsifyCallback(0.8, **recommended('tabular')), CheckMasks()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2, cbs=[cb, chk])
    assert chk.n == 2 * len(learn.dls.train)
    rep = exact(learn, 0.8)   # local context: every table and layer exactly to 80%
    assert any(t == 'Embedding' for t in rep.type) and any(t == 'Linear' for t in rep.type)
    same_predictions(learn, tmp_path)
