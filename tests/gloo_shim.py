"""The one change fastai's own distributed training needs to run on CPU processes over gloo, as CI must (it has no GPU).

fastai's `DistributedDL._broadcast` sends rank 0's sample order to the other ranks as a CUDA tensor, because NCCL only
moves CUDA tensors; gloo moves CPU tensors, and there is no CUDA here. Everything else is fastai's and accelerate's own
code path, the one users run under `torchrun`: `learn.distrib_ctx(sync_bn=False, cpu=True)` (SyncBatchNorm is GPU-only;
`cpu=True` makes accelerate set up a CPU process group, DDP without device ids). Import this module, then call `patch()`."""
import torch, torch.distributed as dist
import fastai.distributed as fd

def _broadcast_cpu(self, t, rank):
    "fastai's `DistributedDL._broadcast` with a CPU tensor (gloo), instead of a CUDA one (NCCL)"
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()

def patch(): fd.DistributedDL._broadcast = _broadcast_cpu
