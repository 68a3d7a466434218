"""Small shared helpers: user-facing errors, logging, meters, seeding, device choice,
safe checkpoint I/O, progress bars and the distributed (torchrun) plumbing.

Every script in the repository (pre-training, AGW/, DDAG/, tools) imports this module,
so nothing here may depend on a particular method.
"""
import argparse
import atexit
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- errors
class UserError(Exception):
    """An error the user caused (bad path, flag, checkpoint ...).

    Scripts wrap their ``main`` with :func:`cli`, which turns this into ONE line on
    stderr and exit status 2 instead of a traceback.
    """


_PENDING_WARNINGS = []


def warn(message):
    """A warning about the flags or the machine, printed with the run header rather than at
    once: a user error found later is then the only output, and the warning reaches the
    run's log. Scripts without a header print them at exit."""
    _PENDING_WARNINGS.append(f"warning: {message}")


def flush_warnings():
    for line in _PENDING_WARNINGS:
        print(line)
    _PENDING_WARNINGS.clear()


atexit.register(flush_warnings)


def cli(main):
    """Run ``main()``; a :class:`UserError` becomes ``error: <message>`` and exit 2. On any
    failure, runs that had not finished an epoch leave no outputs (:class:`StartGuard`)."""
    try:
        return main()
    except UserError as e:
        StartGuard.cleanup_all()
        _PENDING_WARNINGS.clear()   # the run never started: its warnings are moot
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        StartGuard.cleanup_all()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        StartGuard.cleanup_all()
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, bad choice) are ONE line
    ``error: ...`` and exit 2 through :func:`cli`, like every other user error, instead of
    a usage block. Help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def resolve_path(path, default_rel=None):
    """``path`` as given (relative to the cwd), or ``default_rel`` resolved against the
    repository root when ``path`` is None/empty, so that the same default works from the
    repository root, AGW/ and DDAG/."""
    if path:
        return Path(path).expanduser().resolve()
    return (REPO_ROOT / default_rel).resolve()


def check_schedule(args):
    """The checks every trainer's lr schedule needs: a positive ``--lr``, and a warning
    when the warm-up is longer than the run (the lr would never reach ``--lr``)."""
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.warmup_epochs > args.epochs:
        warn(f"--warmup_epochs {args.warmup_epochs} > --epochs {args.epochs}: the lr never "
             f"reaches --lr {args.lr} (it stops at {args.lr * args.epochs / args.warmup_epochs:.3g})")


def check_stripes(num_stripe, img_h=None):
    """MMGL's K horizontal stripes: at least 2, of equal height (K divides the image height)."""
    if num_stripe < 2 or (img_h is not None and img_h % num_stripe):
        raise UserError(f"--num_stripe must be >= 2 and divide --img_h {img_h}, got {num_stripe}"
                        if img_h is not None else f"--num_stripe must be at least 2, got {num_stripe}")


def choice_check(name, value, choices):
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- logging
class Tee:
    """Duplicate everything written to stdout into a log file (like the authors'
    ``Logger``), so a run's text log is what its terminal showed (plus the run header's
    full argument list, which goes to the file only)."""

    def __init__(self, path, stream=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)
        self.stream = stream or sys.stdout

    def write(self, s):
        self.stream.write(s)
        self.file.write(s)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return self.stream.isatty()

    def close(self):
        self.file.close()


def setup_log(log_dir, name):
    """Tee stdout into ``<log_dir>/<name>.txt``; returns the path."""
    path = Path(log_dir) / f"{name}.txt"
    if not isinstance(sys.stdout, Tee):
        sys.stdout = Tee(path)
    return path


class StartGuard:
    """Removes the outputs a run created (text log, JSON lines, TensorBoard run) if it fails
    before its first epoch is done, so a run that never started leaves nothing behind.
    ``disarm()`` once an epoch has finished; ``cleanup()`` on failure."""

    active = []   # the guards of this process; utils.cli cleans them up on failure

    def __init__(self, *paths):
        self.new = [Path(p) for p in paths if not Path(p).exists()]
        self.armed = True
        StartGuard.active.append(self)

    @classmethod
    def cleanup_all(cls):
        for guard in cls.active:
            guard.cleanup()

    def disarm(self):
        self.armed = False

    def cleanup(self):
        if not self.armed:
            return
        for p in self.new:
            if isinstance(sys.stdout, Tee) and Path(sys.stdout.file.name) == p:
                sys.stdout.file.close()
                sys.stdout = sys.stdout.stream
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


def git_revision():
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_run_header(args, device, extra=None):
    """The header every run starts with: command, revision, time, device, ``extra`` lines.
    The full sorted argument list goes to the log file only (when stdout is tee'd into
    one), so the terminal stays short; without a log it is printed."""
    print("=" * 78)
    print(f"{' '.join(sys.argv)}")
    dtype, _ = amp_setup(getattr(args, "amp", False), device)
    precision = {None: "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast + GradScaler"}[
        dtype and str(dtype).split(".")[-1]]
    print(f"git {git_revision()} | {datetime.datetime.now().isoformat(timespec='seconds')} "
          f"| device {device} | {precision} | world size {get_world_size()}")
    arg_lines = [f"  {k:>20}: {getattr(args, k)}" for k in sorted(vars(args))]
    if isinstance(sys.stdout, Tee):
        sys.stdout.file.write("\n".join(arg_lines) + "\n")
        print(f"all {len(arg_lines)} arguments: {sys.stdout.file.name}")
    else:   # no log file (the test scripts): the arguments as a compact paragraph
        import textwrap
        print(textwrap.fill(" ".join(f"{k}={getattr(args, k)}" for k in sorted(vars(args))), 100,
                            initial_indent="args: ", subsequent_indent="  "))
    for line in (extra or []):
        print(line)
    flush_warnings()
    print("=" * 78)


class JsonLog:
    """One JSON object per line (one per epoch) beside the text log."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record):
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def format_time(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress(iterable, total=None, desc="", enable=None):
    """A small progress bar with ETA on stderr; silent when stderr is not a terminal
    (logs and CI stay clean) or on a non-zero rank."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    if enable is None:
        enable = sys.stderr.isatty() and is_main_process()
    if not enable:
        yield from iterable
        return
    start = time.time()
    last = 0.0
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if now - last > 0.2 or n == total:
            last = now
            rate = n / max(now - start, 1e-9)
            if total:
                eta = (total - n) / max(rate, 1e-9)
                msg = f"\r{desc} {n}/{total} [{format_time(now - start)}<{format_time(eta)}, {rate:.1f}it/s]"
            else:
                msg = f"\r{desc} {n} [{format_time(now - start)}, {rate:.1f}it/s]"
            sys.stderr.write(msg)
            sys.stderr.flush()
    sys.stderr.write("\n")


# ----------------------------------------------------------------------------- seeding / device
def set_seed(seed, deterministic=False):
    import torch
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
    import torch
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
    import torch
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


# ----------------------------------------------------------------------------- training steps
def amp_setup(enabled, device):
    """``--amp`` -> (autocast dtype or None, GradScaler). bf16 where the device supports it
    (no loss scaling needed; always on the CPU), else fp16 with an active GradScaler. The
    scaler is a pass-through when it is not needed, so the step code is the same either way."""
    import torch
    dtype = None
    if enabled:
        fp16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        dtype = torch.float16 if fp16 else torch.bfloat16
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``; a no-op context when ``dtype`` is None."""
    import torch
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class NonFiniteWatch:
    """Remembers the first step whose loss, or whose gradient while the loss was finite, is
    not finite, on the device, without a host sync per step; ``check`` (called at print
    time, the one sync there) stops the run."""

    def __init__(self, device):
        import torch
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)
        self.in_grad = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, loss, step, params=None):
        """``params``: the trained parameters, after backward, to watch their gradients too
        (leave it out under fp16 loss scaling, where inf gradients are expected and skipped)."""
        import torch
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
    import torch
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
    import torch
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def _free_space(path):
    """Free space on the filesystem holding ``path`` (or its nearest existing parent), as text."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def save_checkpoint(obj, path):
    """Write atomically: a crash or a full disk mid-save leaves the previous file intact and
    no temporary file behind; a write failure is one UserError naming the path."""
    import torch
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch reports a short write as RuntimeError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"cannot write checkpoint {path} ({reason}); {_free_space(path.parent)}; "
                        f"the previous checkpoint there, if any, is unchanged") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def check_writable(*folders):
    """Create each output folder and write/remove a probe file in it, so a wrong
    --model_path/--log_path fails before any training instead of at the first save."""
    for folder in folders:
        folder = Path(folder)
        probe = folder / f".write_test_{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output folder {folder} is not writable ({e.strerror or e})") from None


def _safe_globals():
    """What ``weights_only`` loading may rebuild besides tensors: the numpy scalars and
    arrays the authors' ``.t`` files hold (their ``cmc``/``mAP``), our RNG states."""
    allowed = [np.dtype, np.ndarray, np.float64, np.float32, np.int64, np.int32,
               np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType,
               np.dtypes.Int32DType, np.dtypes.UInt32DType, np.dtypes.BoolDType]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    allowed += [_reconstruct, scalar]
    return allowed


def find_checkpoint(resume, model_path):
    """``--resume`` as given (relative to the cwd), else as a name under ``--model_path``
    (the authors' convention); UserError naming every place looked at."""
    given = Path(resume).expanduser()
    candidates = [given] if given.is_absolute() else [given.resolve(), Path(model_path) / given]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"--resume {resume}: no such checkpoint file (looked at "
                    + " and ".join(str(c) for c in candidates) + ")")


def load_checkpoint(path, trust=False):
    """Load a checkpoint with ``torch.load(weights_only=True)`` and an allow-list for
    numpy scalars. Anything else (an arbitrary pickled object) is refused unless the
    user passes ``--trust-checkpoint`` (``trust=True``)."""
    import pickle
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..); files of torch < 1.6 are a pickle (0x80 ...)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"{path} is not a PyTorch checkpoint (not a torch.save file)")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError / EOFError variants
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if not trust and isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e).lower():
            raise UserError(f"{path} holds objects other than tensors and numbers ({first}); if you "
                            f"trust this file, pass --trust-checkpoint to unpickle it fully") from None
        raise UserError(f"cannot read checkpoint {path}: truncated or corrupt ({first})") from None


# ----------------------------------------------------------------------------- distributed
def is_distributed():
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return get_dist().get_rank() if is_distributed() else 0


def get_world_size():
    return get_dist().get_world_size() if is_distributed() else 1


def get_dist():
    import torch.distributed as dist
    return dist


def is_main_process():
    return get_rank() == 0


def init_distributed(gpu):
    """Set up DDP from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and return
    the device. Without torchrun this is plain :func:`select_device`."""
    import torch
    import torch.distributed as dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return select_device(gpu)
    want_cuda = _cuda_usable("" if gpu is None else str(gpu).strip())
    if want_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if not want_cuda:
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def barrier():
    if is_distributed():
        get_dist().barrier()


def cleanup_distributed():
    if is_distributed():
        get_dist().destroy_process_group()


def _gather_function():
    import torch

    class _GatherWithGrad(torch.autograd.Function):
        """all_gather whose backward sums every rank's gradient for this rank's slice
        (all_reduce), so d(sum of all ranks' losses)/d(local input) is exact."""

        @staticmethod
        def forward(ctx, x):
            dist = get_dist()
            parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts, 0)

        @staticmethod
        def backward(ctx, grad):
            dist = get_dist()
            grad = grad.contiguous()
            dist.all_reduce(grad)
            n = grad.shape[0] // dist.get_world_size()
            return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]

    return _GatherWithGrad


def all_gather_with_grad(x):
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, with a
    gradient-correct backward. DDP averages gradients over ranks, so with each rank's loss
    a mean over its local queries, the update equals the single-process one on the gathered
    batch. Without a process group this is the identity."""
    if not is_distributed():
        return x
    return _gather_function().apply(x)


def reduce_mean(value):
    """Average a python/tensor scalar over ranks (for printing only)."""
    if not is_distributed():
        return float(value)
    import torch
    t = torch.tensor([float(value)], dtype=torch.float64)
    if get_dist().get_backend() == "nccl":
        t = t.cuda()
    get_dist().all_reduce(t)
    return t.item() / get_world_size()


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
    import torch
    if sync_bn:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif is_main_process():
            print("warning: --sync_bn needs CUDA; BatchNorm statistics stay per rank on the CPU")
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
