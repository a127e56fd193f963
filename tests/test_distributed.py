"""Sparse training under fastai's own distributed training: `learn.distrib_ctx()` (accelerate's DistributedDataParallel)
in two CPU processes over gloo, started by `torchrun`, each rank initialised differently. For every kind of criterion
(gradients: taylor; weight history: movement; activations: wanda; dense gradients for regrowth: RigL; and taylor on an
LSTM's gate matrices) both ranks must
end with the same masks and weights, exact counts, masked weights at zero, a clock that ends where the sharded data
ends, and a checkpoint saved by rank 0 must resume on both. The one shim fastai's CPU path needs is `tests/gloo_shim.py`."""
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest

CASES = ['taylor', 'movement', 'wanda', 'rigl', 'lstm_taylor']
HERE = Path(__file__).parent

def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Both ranks' results, from one `torchrun` launch of two processes"
    out = tmp_path_factory.mktemp('dist')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), str(HERE/'dist_worker.py'), str(out), ','.join(CASES)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    return {c: [json.loads((out/f'{c}_{k}.json').read_text()) for k in (0, 1)] for c in CASES}

@pytest.mark.parametrize('case', CASES)
def test_same_masks_and_weights_on_both_ranks(runs, case):
    r0, r1 = runs[case]
    assert r0['masks'] == r1['masks'] and r0['agree'] and r1['agree'], f"{case}: masks differ between ranks"
    assert r0['weights'] == r1['weights'], f"{case}: weights differ between ranks"
    assert r0['wrapped_after'] in ('Sequential', 'SeqNet') and r0['keys']   # unwrapped after the fit, plain state dict

@pytest.mark.parametrize('case', CASES)
def test_exact_counts_and_masks_held(runs, case):
    for r in runs[case]:
        if case == 'taylor':   # global context: exactly round(s*N) over the layers
            assert sum(r['masked'].values()) == round(0.8 * sum(r['numel'].values()))
        else:
            for n, k in r['masked'].items(): assert k == round(r['targets'][n] * r['numel'][n]), n
        assert r['held']

@pytest.mark.parametrize('case', CASES)
def test_the_clock_ends_where_the_data_ends(runs, case):
    "Each rank's loader says 15 batches an epoch and yields 14: the schedule still ends on the last batch that runs"
    for r in runs[case]: assert r['clock'] == r['total'] == 2 * 14

@pytest.mark.parametrize('case', CASES)
def test_checkpoint_from_rank_0_resumes_on_every_rank(runs, case):
    a, b = (r['resumed'] for r in runs[case])
    assert a['start'] == b['start'] == 14     # both restored the clock rank 0 saved after the first epoch
    assert a['masks'] == b['masks'] and a['weights'] == b['weights'] and a['agree']
    assert a['clock'] == a['total'] == 28 and a['held'] and a['keys']
