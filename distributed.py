"""torchrun (DistributedDataParallel) plumbing: who this process is, wrapping a network,
and the two collectives the methods need. Without a process group every helper is the
single-process identity, so the same code runs with and without torchrun.
"""
import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_mean(t):
    """The mean of tensor ``t`` over ranks (a new tensor; ``t`` itself without torchrun).
    The one cross-rank average of the logs (logger.Meter)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice
    (all_reduce), so d(sum of all ranks' losses)/d(local input) is exact."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x):
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, with a
    gradient-correct backward. DDP averages gradients over ranks, so with each rank's loss
    a mean over its local queries, the update equals the single-process one on the gathered
    batch. Without a process group this is the identity."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def unwrap(model):
    """The bare module of a DDP / compiled model (checkpoints never carry 'module.')."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def wrap_ddp(net, device, sync_bn=False):
    """DistributedDataParallel around ``net`` when running under torchrun (else ``net``).
    SyncBatchNorm exists for CUDA only: on CPU ``--sync_bn`` is refused with a warning."""
    if not is_distributed():
        return net
    if sync_bn:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif is_main_process():
            print("warning: --sync_bn needs CUDA; BatchNorm statistics stay per rank on the CPU")
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
