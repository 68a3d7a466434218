"""Losses.

MMGL pre-training (Wan et al., TIFS 2023, §III):

* Global granularity -- permutation recovery. Both modalities' images are cut into K
  horizontal stripes and shuffled by the same random permutation; the network predicts
  K x K logits, which Sinkhorn normalisation (alternating row/column normalisation, here
  in log space) turns into a doubly stochastic "soft permutation" matrix, with Gumbel
  noise for the Gumbel-Sinkhorn relaxation (Mena et al., ICLR 2018) during training. The
  loss is the MSE between the soft permutation and the ground-truth permutation matrix,
  for both modalities through the same head. (:func:`log_sinkhorn`,
  :func:`gumbel_sinkhorn`, :func:`perm_mse_loss`, :func:`perm_matrix`,
  :func:`perm_accuracy`.)
* Local granularity -- part-aware cycle-contrastive (PCC) loss on the K stripe
  embeddings (:func:`pcc_loss`).

ReID losses shared by AGW and DDAG fine-tuning (docs/FINETUNE.md): :func:`pdist`,
:class:`TripletLoss` (batch-hard) and :class:`TripletLoss_WRT` (weighted regularisation
triplet, default = the authors' published numerics).

Permutation-matrix convention (used everywhere, matches ``data_loader.DeviceAugment``
where output stripe i = input stripe perms[b, i]):

    P[b, i, j] = 1  iff  shuffled position i holds original stripe j  (j = perms[b, i]).

The network's logits use the same layout (row = shuffled position, column = original
stripe), so ``P^T @ shuffled`` restores the original order.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import utils


# ============================================================================ permutation recovery
def log_sinkhorn(log_alpha, n_iters=20, temp=1.0):
    """Sinkhorn normalisation in log space: ``n_iters`` rounds of row- then column-
    normalisation of ``log_alpha / temp`` ([..., K, K]). Returns the log of an (approx.)
    doubly stochastic matrix; logsumexp keeps it stable for any logit scale. Runs in
    float32 even under autocast."""
    la = log_alpha.float() / temp
    for _ in range(n_iters):
        la = la - torch.logsumexp(la, dim=-1, keepdim=True)   # rows sum to 1
        la = la - torch.logsumexp(la, dim=-2, keepdim=True)   # columns sum to 1
    return la


def sample_gumbel(shape, device, generator=None, eps=1e-20):
    u = torch.rand(shape, device=device, generator=generator)
    return -torch.log(-torch.log(u + eps) + eps)


def gumbel_sinkhorn(logits, n_iters=20, temp=1.0, n_samples=10, noise=1.0, training=True,
                    generator=None):
    """Gumbel-Sinkhorn soft permutations (Mena et al.): S((X + noise * g) / temp).

    Training: ``n_samples`` independent Gumbel draws per input -> [n_samples * B, K, K],
    sample-major (rows s*B .. s*B+B-1 are draw s), which :func:`perm_mse_loss` matches by
    repeating the target. Not training (or noise == 0): the noise-free [B, K, K]."""
    logits = logits.float()
    if training and noise > 0 and n_samples > 0:
        g = sample_gumbel((n_samples,) + tuple(logits.shape), logits.device, generator)
        logits = (logits.unsqueeze(0) + noise * g).flatten(0, 1)
    return log_sinkhorn(logits, n_iters, temp).exp()


def perm_matrix(perms):
    """(B, K) index permutations -> (B, K, K) float one-hot, P[b, i, perms[b, i]] = 1
    (shuffled position i holds original stripe perms[b, i])."""
    return F.one_hot(perms.long(), perms.shape[-1]).float()


def perm_mse_loss(soft_perm, target_perm, reduction="mean"):
    """MSE between soft permutations [S*B, K, K] (S Gumbel samples, sample-major) and the
    ground-truth matrices [B, K, K] (the paper's objective for permutation recovery):
    ``mean`` averages over every entry; ``matrix`` sums over the K x K entries of each
    matrix (the squared Frobenius distance) and averages over matrices, K*K times more."""
    n, b = soft_perm.shape[0], target_perm.shape[0]
    if n % b:
        raise ValueError(f"{n} soft permutations do not tile {b} targets")
    target = target_perm.to(soft_perm.dtype).repeat(n // b, 1, 1)
    if reduction == "matrix":
        return (soft_perm - target).pow(2).sum(dim=(1, 2)).mean()
    return F.mse_loss(soft_perm, target)


@torch.no_grad()
def perm_accuracy(logits_or_soft, perms, soft=False, n_iters=20, temp=1.0):
    """(whole-permutation accuracy, stripe accuracy) as python floats.

    Each sample is decoded by the Hungarian algorithm (scipy ``linear_sum_assignment``,
    maximising) on the noise-free Sinkhorn matrix. We maximise the sum of its LOG
    entries, i.e. the most probable permutation (the Gumbel-matching MAP). Row/column
    normalisation only shifts rows and columns by constants, so this is the same
    assignment as on the raw logits. ``soft=True``: the input is already a soft
    permutation matrix. Only called at print intervals (it syncs to the host)."""
    x = logits_or_soft.detach().float()
    score = x.clamp_min(1e-30).log() if soft else log_sinkhorn(x, n_iters, temp)
    score = score.cpu().numpy().astype(np.float64)
    truth = perms.detach().cpu().numpy()
    pred = np.empty_like(truth)
    for b in range(score.shape[0]):
        rows, cols = linear_sum_assignment(score[b], maximize=True)
        pred[b, rows] = cols
    hit = pred == truth
    return float(hit.all(axis=1).mean()), float(hit.mean())


# ============================================================================ PCC
def _soft_nn(query, pool, temp, exclude=None):
    """Soft nearest neighbour: sum_u softmax_u(q.u / t) u over the pool rows."""
    sim = query @ pool.t() / temp
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    return torch.softmax(sim, dim=-1) @ pool


def _info_nce_symmetric(a, b, temp, gather=None, offset=0, groups=0):
    """InfoNCE with positives on the diagonal, both directions (a->b and b->a).

    With ``gather`` (DDP), the keys are the rows of all ranks and the local row i's
    positive is global row ``offset + i``: every rank's mean over its queries, averaged
    by DDP, is then the single-process loss over the whole batch. ``groups`` = K > 0: row
    r belongs to group r % K (stripe index k) and only keys of the query's own group are
    candidates (negatives from the same part only)."""
    def ce(q, keys, labels):
        logits = q @ keys.t() / temp
        if groups:
            other = (labels[:, None] % groups) != (torch.arange(keys.shape[0], device=q.device) % groups)
            logits = logits.masked_fill(other, float("-inf"))
        return F.cross_entropy(logits, labels)
    if gather is None:
        labels = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (ce(a, b, labels) + ce(b, a, labels))
    labels = offset + torch.arange(a.shape[0], device=a.device)
    return 0.5 * (ce(a, gather(b), labels) + ce(b, gather(a), labels))


def pcc_loss(z_rgb, z_ir, temp=0.07, pool_rgb=None, pool_ir=None, offset=0,
             gather=None, pool="all", form="pair", detach_pool=False):
    """Part-aware cycle-contrastive loss (MMGL's local granularity, paper §III-C).

    z_rgb, z_ir: [B, K, D] L2-normalised stripe embeddings. For every query stripe q
    (each stripe of each image, both modalities) q_x is its soft nearest neighbour in the
    OTHER modality's stripe pool, sum_u softmax_u(q.u / t) u. Then (``form``):

    * ``pair`` (the figure: --pcc_reading figure, first): q_s is q's soft nearest neighbour in its OWN modality's
      pool without the K stripes of q's own image (else q would simply find itself);
      (q_x_i, q_s_i) is a positive pair and (q_x_i, q_s_j), j != i, are negatives over all
      queries of that modality: a symmetric InfoNCE at temperature t. A stripe's
      cross-modal neighbour must agree with its intra-modal one.
    * ``cycle`` (cycle-back, as in temporal cycle-consistency): q_x is matched back against
      q's own modality's pool, softmax(q_x.u / t), and the cycle must return to q itself:
      cross-entropy with q as the target, every other stripe of that modality a negative.
    * ``mutual`` ("cycle-consistent RGB-IR patches" as positives, read literally): a REAL
      stripe pair (q, v) is positive when v is q's nearest stripe in the other modality
      and q is v's nearest back (a hard, gradient-free match); InfoNCE of q against every
      stripe of the other modality with v as the target, over the matched queries only
      (:func:`_mutual_nce`).

    ``pool`` (what "part-aware" restricts): ``all`` searches every B*K stripe of a modality
    regardless of its index k; ``part`` only stripes with the same index k as the query
    (with stripes in original order, the same body part; in shuffled order, the same row),
    for the neighbours AND the contrast's negatives. Why it matters: with ``all``, stripes
    of the same body part in other images are negatives, so the loss pushes body-part
    information OUT of the stripe features, the very information the permutation task
    needs; with ``part`` that information is constant inside every contrast set.

    ``detach_pool``: the neighbour pools (and the cycle's back-match keys) are constants,
    as support sets are in nearest-neighbour contrastive methods (NNCLR); the gradient
    reaches each stripe only as a query.

    Both forms average over the two modalities. OUR READINGS (the paper leaves them open):
    the same t serves the soft-NN and the InfoNCE; q_x and q_s are L2-normalised again
    before the InfoNCE, because a softmax mixture of unit vectors is shorter
    than 1 and InfoNCE at t=0.07 assumes cosine similarities.

    Distributed: ``pool_rgb``/``pool_ir`` are the all-rank gathered embeddings
    [B_all, K, D] (utils.all_gather_with_grad) used as the neighbour pools; the local
    queries are rows ``offset .. offset+B-1`` of them (``offset`` = this rank's first
    image), which the own-image exclusion and the cycle target need. With ``gather`` (a
    gradient-correct all-gather of [N, D] rows) the pair form's InfoNCE negatives are the
    q_s / q_x of all ranks too, so N ranks compute the loss of one process holding the
    whole batch.
    """
    if pool not in ("all", "part") or form not in ("pair", "cycle", "mutual"):
        raise ValueError(f"pcc_loss: pool must be all|part and form pair|cycle|mutual, got {pool!r}, {form!r}")
    K, D = z_rgb.shape[1], z_rgb.shape[2]
    pool_rgb = z_rgb if pool_rgb is None else pool_rgb
    pool_ir = z_ir if pool_ir is None else pool_ir
    if form == "mutual":
        # under DDP with gather: the mean over EVERY rank's matched queries, not a mean of
        # per-rank means (ranks match different numbers of stripes)
        average = utils.all_reduce_mean if gather is not None else None
        return 0.5 * (_mutual_nce(z_rgb, pool_rgb, pool_ir, temp, offset, pool, average)
                      + _mutual_nce(z_ir, pool_ir, pool_rgb, temp, offset, pool, average))
    loss = 0.0
    for z, own_pool, other_pool in ((z_rgb, pool_rgb, pool_ir), (z_ir, pool_ir, pool_rgb)):
        q = z.float().reshape(-1, D)
        p_own = own_pool.float().reshape(-1, D)
        p_other = other_pool.float().reshape(-1, D)
        if detach_pool:   # neighbours as targets: the gradient reaches only the queries
            p_own, p_other = p_own.detach(), p_other.detach()
        n_img = own_pool.shape[0]
        if n_img < 2:
            raise ValueError("pcc_loss needs at least 2 images per modality "
                             "(the own-modality pool excludes the query's image)")
        dev = q.device
        q_img = offset + torch.arange(z.shape[0], device=dev).repeat_interleave(K)
        p_img = torch.arange(n_img, device=dev).repeat_interleave(K)
        other_part = None
        if pool == "part":   # exclude stripes of another index k
            q_k, p_k = torch.arange(K, device=dev).repeat(z.shape[0]), torch.arange(K, device=dev).repeat(n_img)
            other_part = q_k[:, None] != p_k[None, :]
            p_other_k = torch.arange(K, device=dev).repeat(other_pool.shape[0])
            q_x = _soft_nn(q, p_other, temp, exclude=q_k[:, None] != p_other_k[None, :])
        else:
            q_x = _soft_nn(q, p_other, temp)
        if form == "cycle":
            q_x = F.normalize(q_x, dim=-1)
            logits = q_x @ p_own.t() / temp
            if other_part is not None:
                logits = logits.masked_fill(other_part, float("-inf"))
            target = q_img * K + torch.arange(K, device=dev).repeat(z.shape[0])
            loss = loss + F.cross_entropy(logits, target)
            continue
        exclude = q_img[:, None] == p_img[None, :]
        if other_part is not None:
            exclude = exclude | other_part
        q_s = _soft_nn(q, p_own, temp, exclude=exclude)
        q_x, q_s = F.normalize(q_x, dim=-1), F.normalize(q_s, dim=-1)
        loss = loss + _info_nce_symmetric(q_x, q_s, temp, gather, offset * K,
                                          groups=K if pool == "part" else 0)
    return loss / 2


def _mutual_nce(z, own_pool, other_pool, temp, offset=0, pool="all", average=None):
    """``form='mutual'`` for one query modality: z [B, K, D] (rows ``offset..`` of
    own_pool [B_all, K, D]), other_pool [M, K, D]. Each query stripe's hard nearest
    neighbour in the other modality is its positive when the match is mutual (cycle-
    consistent); ``pool='part'`` searches the match among stripes of the same index k only
    (with ``--pcc_order original``: the same body part, "part-aware"), while the InfoNCE
    always contrasts against EVERY stripe of the other modality, so other parts are
    negatives. The matching is a constant, only the InfoNCE carries gradient. The mean runs
    over the matched queries (no host sync); no mutual pair in the batch: 0. ``average``
    (DDP): the cross-rank mean of a tensor, so that the count is every rank's; DDP's mean of
    the ranks' gradients then equals one process's on the whole batch."""
    K, D = z.shape[1], z.shape[2]
    q, own, other = z.float().reshape(-1, D), own_pool.float().reshape(-1, D), other_pool.float().reshape(-1, D)
    sim = q @ other.t()
    with torch.no_grad():
        match, back = sim.detach(), other.detach() @ own.detach().t()
        if pool == "part":   # candidates of the same index k only
            k_q, k_other = torch.arange(K, device=q.device).repeat(z.shape[0]), \
                torch.arange(K, device=q.device).repeat(other_pool.shape[0])
            k_own = torch.arange(K, device=q.device).repeat(own_pool.shape[0])
            match = match.masked_fill(k_q[:, None] != k_other[None, :], float("-inf"))
            back = back.masked_fill(k_other[:, None] != k_own[None, :], float("-inf"))
        fwd = match.argmax(1)                                    # q -> its nearest other-modality stripe
        keep = back.argmax(1)[fwd] == offset * K + torch.arange(q.shape[0], device=q.device)
    ce = F.cross_entropy(sim / temp, fwd, reduction="none")
    count = keep.sum().float()
    if average is not None:
        count = average(count)   # every rank's matches / world size
    return (ce * keep).sum() / count.clamp(min=1e-6)


# ============================================================================ ReID losses
def pdist(x, y):
    """Euclidean distance matrix [N, M] (clamped before sqrt, as the authors do, so the
    gradient at a zero distance stays finite)."""
    x, y = x.float(), y.float()
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return d2.clamp(min=1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al.): for each anchor the furthest positive
    and the closest negative, MarginRankingLoss(d_an, d_ap, 1) with ``margin``.
    Returns (loss, correct) with correct = #anchors with d_an >= d_ap (a tensor, so no
    host sync per step)."""

    def __init__(self, margin=0.3):
        super().__init__()
        self.margin = margin
        self.ranking_loss = nn.MarginRankingLoss(margin=margin)

    def forward(self, inputs, targets):
        dist = pdist(inputs, inputs)
        pos = targets[:, None] == targets[None, :]
        d_ap = dist.masked_fill(~pos, float("-inf")).max(1).values
        d_an = dist.masked_fill(pos, float("inf")).min(1).values
        loss = self.ranking_loss(d_an, d_ap, torch.ones_like(d_an))
        return loss, (d_an >= d_ap).sum()


def _softmax_weights_authors(dist, mask):
    """The authors' weighting: the max is taken over dist*mask INCLUDING the masked zeros.
    For the negative term (dist = -d_an <= 0) that max is 0, nothing is subtracted, and
    once d_an exceeds ~15 exp(-d_an) falls below the 1e-6 in Z: the weights, hence the
    negative term, vanish. Published AGW/DDAG numbers were made this way."""
    max_v = (dist * mask).max(dim=1, keepdim=True).values
    diff = dist - max_v
    z = (diff.exp() * mask).sum(dim=1, keepdim=True) + 1e-6
    return diff.exp() * mask / z


def _softmax_weights_stable(dist, mask):
    """Softmax over the masked-in entries only (max over those; masked entries never
    reach exp, so nothing overflows)."""
    keep = mask > 0
    max_v = dist.masked_fill(~keep, float("-inf")).max(dim=1, keepdim=True).values
    max_v = torch.where(torch.isfinite(max_v), max_v, torch.zeros_like(max_v))
    e = (dist - max_v).masked_fill(~keep, float("-inf")).exp()
    return e / (e.sum(dim=1, keepdim=True) + 1e-6)


class TripletLoss_WRT(nn.Module):
    """Weighted regularisation triplet (AGW, Ye et al.): softmax(d_ap)-weighted positive
    distance (emphasising far positives) and softmax(-d_an)-weighted negative distance
    (emphasising close negatives), SoftMarginLoss(d_an_w - d_ap_w, 1) (computed as an
    overflow-free softplus). No margin.

    ``stable=False`` (default) reproduces the authors' numerics (see
    :func:`_softmax_weights_authors`); ``stable=True`` is the numerically sound
    softmax. Returns (loss, correct) like :class:`TripletLoss`."""

    def __init__(self, stable=False):
        super().__init__()
        self.stable = stable

    def forward(self, inputs, targets, normalize_feature=False):
        if normalize_feature:
            inputs = F.normalize(inputs, dim=-1)
        dist = pdist(inputs, inputs)
        is_pos = (targets[:, None] == targets[None, :]).float()
        is_neg = 1.0 - is_pos
        dist_ap, dist_an = dist * is_pos, dist * is_neg
        weights = _softmax_weights_stable if self.stable else _softmax_weights_authors
        furthest_positive = (dist_ap * weights(dist_ap, is_pos)).sum(1)
        closest_negative = (dist_an * weights(-dist_an, is_neg)).sum(1)
        # SoftMarginLoss(x, 1) = mean log(1 + exp(-x)), written as softplus(-x): the same
        # value wherever torch's SoftMarginLoss is finite, but finite where it overflows
        # (x < -88 in float32, i.e. large distances with a vanished negative term, which
        # happens at step 0 when fine-tuning from a pre-trained backbone with big features)
        loss = F.softplus(furthest_positive - closest_negative).mean()
        return loss, (closest_negative >= furthest_positive).sum()
