"""Multi-process PCC (torchrun, gloo on CPU) with --gather: train.mmgl_losses on 2 ranks,
each holding half of the global batch, gives the PCC loss and the gradients of ONE process
holding the whole batch, to float rounding.

The ranks run this file as a script (``torch.distributed.run ... tests/test_ddp_pcc.py
OUT``): every rank builds the same seeded global batch of stripe inputs, projects its half
through a seeded linear layer (a stand-in for the network's last parameters), L2-normalises
as MMGLNet does, calls the real ``train.mmgl_losses`` with the parsed training flags, and
back-propagates the PCC loss. What DDP would apply is then compared with one process: the
loss averaged over ranks, the linear layer's gradient averaged over ranks (DDP's
all-reduce mean), and the gradient of each rank's stripe features (divided by the world size,
as DDP's average scales it).

Positives must be found across ranks (rank r's rows are rows r*b.. of the gathered pool:
the ``offset`` in mmgl_losses), so a wrong rank offset fails here.

Under the default mutual reading the ranks find different numbers of mutual matches; the
mean must still run over every rank's matches (test_mutual_pcc_with_unequal_matches_...).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

B_ALL, K, D_IN, D = 8, 6, 12, 16
WORLD = 2
# the readings compared: the default (mutual, same-part matching) and the first reading
# (pair, all stripes), each from the flags train.py parses
# (pair, all stripes), each from the flags train.py parses; "mutual_part_random": the default
# on unrelated RGB/IR stripes, where the ranks find different numbers of mutual matches
MUTUAL = ["--pcc_form", "mutual", "--pcc_pool", "part"]
READINGS = {"mutual_part": MUTUAL, "pair_all": ["--pcc_form", "pair", "--pcc_pool", "all"],
            "pair_part": ["--pcc_form", "pair", "--pcc_pool", "part"], "mutual_part_random": MUTUAL}


def batch(reading):
    """The seeded global batch: stripe inputs [B_ALL, K, D_IN] per modality, the projection,
    perm logits and permutations. For the mutual reading the IR stripes are the RGB ones
    plus a little noise, so every stripe's nearest other-modality stripe is its own pair's
    (mutual matches exist for every query, in both processes' settings alike); the pair
    readings get independent random stripes."""
    g = torch.Generator().manual_seed(7)
    x_rgb = torch.randn(B_ALL, K, D_IN, generator=g)
    noise = torch.randn(B_ALL, K, D_IN, generator=g)
    x_ir = x_rgb + 0.05 * noise if reading == "mutual_part" else noise
    proj = torch.nn.Linear(D_IN, D)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(D, D_IN, generator=g) / D_IN ** 0.5)
        proj.bias.copy_(0.1 * torch.randn(D, generator=g))
    logits = torch.randn(2 * B_ALL, K, K, generator=g)
    perms = torch.rand(B_ALL, K, generator=g).argsort(1)
    return x_rgb, x_ir, proj, logits, perms


def pcc_and_grads(reading, rows):
    """mmgl_losses' PCC on the images ``rows`` of the global batch (all of them in one
    process, this rank's half under torchrun); its backward. -> (pcc, proj grads, stripe
    grad [2 b, K, D] RGB rows then IR rows)."""
    import train
    x_rgb, x_ir, proj, logits, perms = batch(reading)
    args = train.get_args_parser().parse_args(["--gather", "--pcc_start_acc", "0", *READINGS[reading]])
    z = F.normalize(proj(torch.cat((x_rgb[rows], x_ir[rows]))), dim=-1)   # [2b, K, D], RGB then IR
    z.retain_grad()
    out = {"perm_logits": torch.cat((logits[:B_ALL][rows], logits[B_ALL:][rows])), "stripes": z}
    losses = train.mmgl_losses(out, perms[rows], args, cl_weight=0.5)
    losses["pcc"].backward()
    return losses["pcc"].detach(), proj.weight.grad, proj.bias.grad, z.grad


def worker(out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    b = B_ALL // world
    res = {}
    for reading in READINGS:
        pcc, gw, gb, gz = pcc_and_grads(reading, slice(rank * b, (rank + 1) * b))
        for t in (pcc, gw, gb):   # what DDP applies: the mean over ranks
            dist.all_reduce(t)
            t /= world
        parts = [torch.zeros_like(gz) for _ in range(world)]
        dist.all_gather(parts, gz.contiguous() / world)
        # rank order -> the global batch's order: RGB rows of every rank, then IR rows
        gz_all = torch.cat([p[:b] for p in parts] + [p[b:] for p in parts])
        res.update({f"{reading}/pcc": pcc.numpy(), f"{reading}/grad_weight": gw.numpy(),
                    f"{reading}/grad_bias": gb.numpy(), f"{reading}/grad_stripes": gz_all.numpy()})
    if rank == 0:
        np.savez(Path(out_dir) / "ddp.npz", **res)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One torchrun launch of 2 ranks for every reading."""
    tmp = tmp_path_factory.mktemp("ddp_pcc")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).resolve()), str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return dict(np.load(tmp / "ddp.npz"))


def compare(ddp, reading):
    pcc, gw, gb, gz = pcc_and_grads(reading, slice(0, B_ALL))
    assert pcc.item() > 0.01, reading   # a real contrast, not the empty-match 0
    np.testing.assert_allclose(ddp[f"{reading}/pcc"], pcc.numpy(), rtol=1e-5, err_msg=reading)
    assert np.abs(gw.numpy()).max() > 1e-3, reading
    for name, want in (("grad_weight", gw), ("grad_bias", gb), ("grad_stripes", gz)):
        np.testing.assert_allclose(ddp[f"{reading}/{name}"], want.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=f"{reading} {name}")


@pytest.mark.parametrize("reading", ["mutual_part", "pair_all", "pair_part"])
def test_pcc_with_gather_equals_one_process(ddp, reading):
    compare(ddp, reading)


def test_mutual_pcc_with_unequal_matches_per_rank_equals_one_process(ddp):
    compare(ddp, "mutual_part_random")


if __name__ == "__main__":
    worker(sys.argv[1])
