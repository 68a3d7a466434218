"""The run's environment, as every script sets it up: seeds and RNG states, the device
(``--gpu``, torchrun's local rank), mixed precision (``--amp``), the guards that stop a run
whose numbers went non-finite before anything is saved, and the torchrun (DDP) helpers:
who this process is, wrapping a network, and the two collectives the methods need (without
a process group each is the single-process identity, so one code path runs both ways).
"""
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError, warn


# ----------------------------------------------------------------------------- torchrun
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


# ----------------------------------------------------------------------------- seeding / device
def set_seed(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _cuda_usable(gpu):
    """Whether ``--gpu`` asks for CUDA and CUDA is there; one warning line when it asks for
    CUDA that is absent (the run goes on on the CPU)."""
    if gpu.lower() in ("", "cpu", "-1"):
        return False
    if not torch.cuda.is_available():
        warn(f"--gpu {gpu} asked for CUDA but none is available; running on the CPU")
        return False
    return True


def select_device(gpu):
    """``--gpu`` -> torch.device. '' / 'cpu' / '-1' mean CPU. A GPU index asks for CUDA;
    if CUDA is absent or the index does not exist we warn and use the CPU (never crash,
    never silently pretend). Under torchrun the local rank picks the GPU."""
    gpu = "" if gpu is None else str(gpu).strip()
    if not _cuda_usable(gpu):
        return torch.device("cpu")
    if is_distributed():
        idx = int(os.environ.get("LOCAL_RANK", 0))
    else:
        try:
            idx = int(gpu.split(",")[0])
        except ValueError:
            raise UserError(f"--gpu must be a device index such as 0, or 'cpu'; got {gpu!r}")
    if idx >= torch.cuda.device_count():
        warn(f"--gpu {gpu} but only {torch.cuda.device_count()} CUDA device(s); using cuda:0")
        idx = 0
    torch.cuda.set_device(idx)
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", idx)


def init_device(gpu):
    """Set up DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and return
    the device. Without torchrun this is plain :func:`select_device`."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return select_device(gpu)
    want_cuda = _cuda_usable("" if gpu is None else str(gpu).strip())
    if want_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend="nccl" if want_cuda else "gloo")
    if not want_cuda:
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


# ----------------------------------------------------------------------------- precision and guards
def amp_setup(enabled, device):
    """``--amp`` -> (autocast dtype or None, GradScaler). bf16 where the device supports it
    (no loss scaling needed; always on the CPU), else fp16 with an active GradScaler. The
    scaler is a pass-through when it is not needed, so the step code is the same either way."""
    dtype = None
    if enabled:
        fp16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        dtype = torch.float16 if fp16 else torch.bfloat16
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``; a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class NonFiniteWatch:
    """Remembers the first step whose loss, or whose gradient while the loss was finite, is
    not finite, on the device, without a host sync per step; ``check`` (called at print
    time, the one sync there) stops the run."""

    def __init__(self, device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)
        self.in_grad = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, loss, step, params=None):
        """``params``: the trained parameters, after backward, to watch their gradients too
        (leave it out under fp16 loss scaling, where inf gradients are expected and skipped)."""
        value = loss.detach().float()
        in_grad = torch.zeros((), dtype=torch.bool, device=value.device)
        if params is not None:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                total = getattr(torch.nn.utils, "get_total_norm", None)   # torch >= 2.6
                norm = (total(grads) if total else torch.stack([g.detach().float().norm() for g in grads]).norm())
                norm = norm.float().to(value.device)
                in_grad = torch.isfinite(value) & ~torch.isfinite(norm)
                value = torch.where(in_grad, norm, value)
        new = ~torch.isfinite(value) & (self.step < 0)
        self.step = torch.where(new, torch.full_like(self.step, step), self.step)
        self.value = torch.where(new, value, self.value)
        self.in_grad = torch.where(new, in_grad, self.in_grad)

    def check(self, epoch, last_good):
        """Raise UserError if a loss or gradient was not finite; ``last_good``: the checkpoint
        that the stop leaves untouched (None: none written yet)."""
        step = int(self.step)
        if step >= 0:
            what = (f"the gradient norm became {self.value.item()} (the loss was finite)"
                    if bool(self.in_grad) else f"loss became {self.value.item()}")
            raise UserError(f"{what} at epoch {epoch} step {step}; stopped before saving; last good "
                            f"checkpoint: {last_good or 'none saved yet'}")


def nonfinite_bn_stats(net):
    """Names of the BatchNorm layers of ``net`` whose running mean/var hold NaN or inf."""
    return [name for name, m in unwrap(net).named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            and not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())]


def check_finite(values, what, net=None):
    """UserError if the array/tensor ``values`` holds NaN or inf, saying how many of what
    and which BatchNorm running statistics of ``net`` went non-finite (the usual cause
    when the loss itself stayed finite)."""
    bad = int((~np.isfinite(np.asarray(values))).any(axis=tuple(range(1, np.ndim(values)))).sum()) \
        if np.ndim(values) > 1 else int((~np.isfinite(np.asarray(values))).sum())
    if not bad:
        return
    bn = nonfinite_bn_stats(net) if net is not None else []
    cause = (f"; non-finite BatchNorm running statistics in {len(bn)} layers ({', '.join(bn[:2])}"
             f"{', ...' if len(bn) > 2 else ''})" if bn else "")
    raise UserError(f"{what}: {bad} of {len(values)} are not finite{cause}; stopped before saving")


def get_rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
