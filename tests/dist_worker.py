"""One rank of the distributed checks in `test_distributed.py`, started by `torchrun` (fastai's own DistributedTrainer,
through accelerate, over gloo on CPU processes). Writes what it ended with to `<out>/<case>_<rank>.json`."""
import hashlib, json, os, sys, warnings
from pathlib import Path
warnings.simplefilter('ignore')
import torch, torch.nn as nn, torch.distributed as dist
from fastai.basics import Learner, Callback, CrossEntropyLossFlat, accuracy
from fastai.callback.tracker import SaveModelCallback
import fastai.distributed  # noqa: F401 (patches Learner.distrib_ctx)
sys.path.insert(0, str(Path(__file__).parent))
import gloo_shim
from fastsparse.callback import SparsifyCallback
from fastsparse.callback import DynamicSparseCallback
from fastsparse.distributed import mask_digest, masks_agree
from fastsparse.training import MaskedTraining
from fastsparse.schedule import linear
from fastsparse.demo import digits_dls, digits_cnn

CONV_LIN = (nn.Conv2d, nn.Linear)

class SeqNet(nn.Module):
    "An LSTM that reads a digit row by row (8 steps of 8 pixels) and classifies it from its last hidden state"
    def __init__(self, hidden=32):
        super().__init__(); self.rnn,self.head = nn.LSTM(8, hidden, batch_first=True),nn.Linear(hidden, 10)
    def forward(self, x): return self.head(self.rnn(x.view(x.shape[0], 8, 8))[0][:, -1])

def make(case):
    if case == 'rigl': return DynamicSparseCallback(0.8, 'rigl', update_every=3, layer_type=CONV_LIN)
    if case == 'lstm_taylor': return SparsifyCallback(0.8, 'weight', 'local', 'taylor', linear.with_pcts(0., 1.), layer_type=nn.LSTM)
    return SparsifyCallback(0.8, 'weight', 'global' if case == 'taylor' else 'local', case, linear.with_pcts(0., 1.), layer_type=CONV_LIN)

def weights_digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()): h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

def model_for(case): return SeqNet() if case.startswith('lstm') else digits_cnn(8)

def learner(cb, path, seed, case):
    torch.manual_seed(seed)   # a different initialisation on each rank: DDP must start them all from rank 0's weights
    # bs=48: each rank's sharded loader yields one batch fewer per epoch than its `len` says (14 of 15)
    return Learner(digits_dls(bs=48), model_for(case), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb, path=path)

class FirstClock(Callback):
    "The clock of the sparsity callback when training starts (after a checkpoint was restored)"
    order = MaskedTraining.order + 1
    def __init__(self, cb): self.cb, self.start = cb, None
    def before_train(self):
        if self.start is None: self.start = self.cb.clock

def report(cb, learn, case, **kw):
    sp = cb.sparsifier
    return dict(masks=mask_digest(sp.masks), agree=masks_agree(sp.masks), weights=weights_digest(learn.model), clock=cb.clock,
                total=cb.total, masked={n: int((~sp.masks[sp.weight_name(n)]).sum()) for n in sp.layers},
                numel={n: m.weight.numel() for n, m in sp.layers.items()}, targets=dict(sp.targets),
                held=all(bool((m.weight[~sp.masks[sp.weight_name(n)]] == 0).all()) for n, m in sp.layers.items()),
                keys=list(learn.model.state_dict()) == list(model_for(case).state_dict()), **kw)

def main(out, cases):
    gloo_shim.patch()
    torch.set_num_threads(1)
    rank = int(os.environ['RANK'])
    for case in cases:
        cb = make(case)
        learn = learner(cb, out, 100 + rank, case)
        with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_logging():
            learn.fit(2, 1e-2, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname=f'{case}_ck'))
        res = report(cb, learn, case, wrapped_after=type(learn.model).__name__)
        # resume on every rank from the checkpoint rank 0 saved after epoch 0
        dist.barrier()
        cb2 = make(case)
        l2 = learner(cb2, out, 200 + rank, case)
        l2.load(f'{case}_ck_0', with_opt=True)
        first = FirstClock(cb2)
        with l2.distrib_ctx(sync_bn=False, cpu=True), l2.no_logging():
            l2.fit(2, 1e-2, start_epoch=1, cbs=first)
        res['resumed'] = report(cb2, l2, case, start=first.start)
        Path(out, f'{case}_{rank}.json').write_text(json.dumps(res))

if __name__ == '__main__':
    rc = 0
    try: main(sys.argv[1], sys.argv[2].split(','))
    except BaseException: import traceback; traceback.print_exc(); rc = 1
    # end without the interpreter's teardown, which aborts now and then in gloo's threads ("terminate called")
    sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)
