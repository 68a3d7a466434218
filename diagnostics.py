"""Why does (or doesn't) the pre-training learn? Two per-epoch measurements of what the
two MMGL losses do to the shared network (``train.py --diag``, on by default):

* :func:`stripe_probe`: a linear probe (scikit-learn logistic regression) that predicts
  which ORIGINAL stripe a shuffled stripe shows, from (a) the backbone's stripe-pooled
  features and (b) the PCC embeddings of the held-out images. Trained on half of the
  held-out identities, scored on the other half. High (a) with a permutation head at
  chance: the information is in the backbone and the head does not read it; (a) at
  chance: the backbone does not carry it.
* :func:`grad_cosine`: the cosine between the permutation loss's and the weighted PCC
  loss's gradients on one parameter group (the last backbone stages), and their norms:
  where and how much the two losses pull against each other.
"""
import numpy as np
import torch


def identity_groups(paths):
    """The identity of each held-out image, read from its folder (SYSU-MM01 camN/PID/,
    RegDB Visible|Thermal/PID/, LLCM vis|nir/PID/ all keep one identity per folder)."""
    return np.array([f"{p.rsplit('/', 2)[-2]}" for p in paths])


def stripe_probe(feats, labels, groups, seed=0):
    """Held-out accuracy of a logistic-regression probe: ``feats`` [N, K, D] stripe
    features, ``labels`` [N, K] the original stripe each shows, ``groups`` [N] the image's
    identity (the train/test split is by identity, so no person is in both halves).
    Returns the test accuracy (chance 1/K), or None with fewer than 2 identities."""
    if len(set(groups)) < 2:
        return None
    # imported here: scikit-learn adds ~0.7 s to every train.py start, errors included
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    n, k, d = feats.shape
    x, y = feats.reshape(n * k, d), labels.reshape(n * k)
    g = np.repeat(groups, k)
    train, test = next(GroupShuffleSplit(n_splits=1, test_size=0.5, random_state=seed).split(x, y, g))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    probe.fit(x[train], y[train])
    return float(probe.score(x[test], y[test]))


def grad_cosine(loss_a, loss_b, params):
    """(cosine, |grad a|, |grad b|) of two losses' gradients on ``params`` (one call to
    autograd.grad each, graph kept for the training step's own backward). A loss that does
    not reach ``params`` has norm 0 and cosine 0."""
    params = [p for p in params if p.requires_grad]
    flat = []
    for loss in (loss_a, loss_b):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                               for g, p in zip(grads, params)]))
    na, nb = flat[0].norm(), flat[1].norm()
    cos = (flat[0] @ flat[1]) / (na * nb) if na > 0 and nb > 0 else torch.zeros(())
    return float(cos), float(na), float(nb)


def loss_gradients(net, losses):
    """Where the two losses fight (diagnostics.grad_cosine): the cosine between the
    permutation loss's and the (unweighted) PCC loss's gradients, and both norms, on the
    shared last stage (layer4) and the one before it (layer3), on this step's batch."""
    body = net.base_resnet.base
    stats = {}
    for name in ("layer4", "layer3"):
        cos, n_perm, n_pcc = grad_cosine(losses["perm_rgb"] + losses["perm_ir"], losses["pcc"],
                                                     getattr(body, name).parameters())
        stats.update({f"grad_cos_{name}": cos, f"grad_norm_perm_{name}": n_perm, f"grad_norm_pcc_{name}": n_pcc})
    return stats
