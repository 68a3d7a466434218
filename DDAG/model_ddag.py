"""DDAG network (Ye et al., "Dynamic Dual-Attentive Aggregation Learning for
Visible-Infrared Person Re-Identification", ECCV 2020) on the shared two-stream backbone.

    backbone (visible/thermal stems, shared layer1-4) -> feature map x
    x_pool = GAP(x);  feat = bottleneck(x_pool)  (BN, no shift)
    IWPA  (intra-modality weighted part attention, --wpa):    x, feat -> feat_att
    graph (cross-modality graph attention, --graph, training only): x_pool, adj -> log-probs

Module and parameter names are the authors' ``embed_net`` ones (``bottleneck``,
``classifier``, ``wpa.fc1.0``, ``wpa.fc2``, ``wpa.fc3``, ``wpa.W``, ``wpa.gate``,
``wpa.bottleneck``, ``attention_0..3``, ``out_att``) so their fine-tuned checkpoints load.
Their never-used ``classifier1``/``classifier2`` are built (frozen) only when such a
checkpoint is tested (``authors_extras``; see :func:`network_layout`).
"""
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
from model import TwoStreamBackbone  # noqa: E402
from cli import UserError  # noqa: E402


def _init_bnneck(bn):
    # The authors' BNNeck init (weights_init_kaiming for BatchNorm1d): gamma ~ N(1, 0.01),
    # beta = 0 and frozen ("no shift"), so the BN feature is a pure rescaling.
    nn.init.normal_(bn.weight, 1.0, 0.01)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)


class IWPA(nn.Module):
    """Intra-modality weighted part attention (DDAG §3.1).

    The feature map is pooled into ``part`` horizontal parts; 1x1 convs give each part a
    query (fc1), key (fc2) and value (fc3); cross-part attention softmax(q k^T) over the
    parts refines every part with its context; a learnable gate (softmax over parts,
    initialised uniform) weights the refined parts into one vector, which is added to the
    BN feature ``feat`` (the paper's residual BatchNorm connection) and normalised by this
    module's own ``bottleneck`` -> feat_att.

    ``W`` (1x1 conv + BN with zero-initialised scale, the non-local block's output
    projection) exists in the authors' module but is NEVER applied in their forward; it
    therefore never trains, and applying it to one of their checkpoints would zero the part
    branch. Default (``use_w=False``) is their forward; ``use_w=True`` (``--wpa_proj``)
    applies W to the refined parts, which makes the module start as feat_att =
    bottleneck(feat) exactly.
    """

    def __init__(self, in_channels, part=3, inter_channels=None, use_w=False):
        super().__init__()
        inter = inter_channels or in_channels  # the authors' default: no reduction
        self.part, self.inter_channels, self.use_w = part, inter, use_w
        # fc1 is wrapped in a Sequential and fc2/fc3 are not, exactly as in the authors'
        # module, so that their state_dict keys (wpa.fc1.0.*, wpa.fc2.*) match.
        self.fc1 = nn.Sequential(nn.Conv2d(in_channels, inter, kernel_size=1))
        self.fc2 = nn.Conv2d(in_channels, inter, kernel_size=1)
        self.fc3 = nn.Conv2d(in_channels, inter, kernel_size=1)
        self.W = nn.Sequential(nn.Conv2d(inter, in_channels, kernel_size=1),
                               nn.BatchNorm2d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        if not use_w:
            if inter != in_channels:
                raise ValueError("without W the refined parts are added to feat: "
                                 "inter_channels must equal in_channels")
            # Kept for the checkpoint format only; frozen so that DDP (which tracks only
            # trainable parameters) does not wait for gradients that never come.
            self.W.requires_grad_(False)
        self.bottleneck = nn.BatchNorm1d(in_channels)
        _init_bnneck(self.bottleneck)
        self.gate = nn.Parameter(torch.full((part,), 1.0 / part))

    def forward(self, x, feat):
        parts = F.adaptive_avg_pool2d(x, (self.part, 1))           # [B, C, P, 1]
        q = self.fc1(parts).flatten(2).transpose(1, 2)              # [B, P, C']
        k = self.fc2(parts).flatten(2)                              # [B, C', P]
        v = self.fc3(parts).flatten(2).transpose(1, 2)              # [B, P, C']
        # Unscaled dot products of 2048-d features can exceed fp16's range under AMP:
        # the P x P logits are computed in float32 (negligible cost).
        with torch.autocast(x.device.type, enabled=False):
            att = torch.softmax(torch.bmm(q.float(), k.float()), dim=-1)  # [B, P, P]
        refined = torch.bmm(att.to(v.dtype), v).transpose(1, 2)     # [B, C', P]
        if self.use_w:
            refined = self.W(refined.unsqueeze(-1)).squeeze(-1)     # [B, C, P]
        gate = torch.softmax(self.gate, dim=0).to(refined.dtype)
        weighted = refined @ gate                                   # [B, C]
        return self.bottleneck(weighted + feat)


class GraphAttentionLayer(nn.Module):
    """One graph attention layer (Velickovic et al., GAT; DDAG §3.2, Eq. 7-8).

    h = x W; e_ij = LeakyReLU(a^T [h_i || h_j]) for adjacent (i, j); attention = row
    softmax of e over the neighbours; h'_i = sum_j att_ij h_j (ELU when ``concat``).
    a^T [h_i || h_j] = h_i a1 + h_j a2 with a = [a1; a2], so e is the broadcast sum of two
    N-vectors: O(N F) instead of materialising the N x N x 2F pair tensor.
    """

    def __init__(self, in_features, out_features, dropout, alpha=0.2, concat=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dropout, self.alpha, self.concat = dropout, alpha, concat
        self.W = nn.Parameter(torch.empty(in_features, out_features))
        self.a = nn.Parameter(torch.empty(2 * out_features, 1))
        nn.init.xavier_uniform_(self.W, gain=1.414)
        nn.init.xavier_uniform_(self.a, gain=1.414)

    def forward(self, x, adj):
        h = x @ self.W                                              # [N, F]
        a1, a2 = self.a[:self.out_features], self.a[self.out_features:]
        e = F.leaky_relu((h @ a1) + (h @ a2).t(), self.alpha)      # [N, N]
        # Non-neighbours get -9e15 (the reference value), i.e. zero weight; every node
        # is its own neighbour, so no row is fully masked.
        e = e.masked_fill(adj <= 0, -9e15)
        att = F.dropout(torch.softmax(e, dim=1), self.dropout, training=self.training)
        h_prime = att @ h
        return F.elu(h_prime) if self.concat else h_prime

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, concat={self.concat}"


def build_adjacency(labels):
    """DDAG's cross-modality graph (Eq. 6): node i and j are connected when they share an
    identity label (whatever their modality), each node with itself; rows normalised to
    sum 1. The authors add the identity to the same-label matrix (the diagonal is already
    1 there) and L2-normalise rows; the graph layers only read the support (adj > 0), which
    is the same."""
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


class DDAGNet(TwoStreamBackbone):   # the authors call it embed_net
    """DDAG network. Training forward returns
    ``(x_pool, logits, part_logits, graph_log_probs)`` where part_logits (``wpa``) use the
    SAME classifier as the global BN feature and graph_log_probs (``graph``) are the
    log-softmax of the graph-attention output; absent branches give None.
    Eval forward returns the L2-normalised test features, one per name in
    ``self.feature_names``: ('FC', 'FC_att') with ``wpa``, ('FC',) without it (no copy
    of FC is passed off as an attention feature)."""

    def __init__(self, low_dim, class_num, drop=0.2, part=3, alpha=0.2, nheads=4,
                 arch="resnet50", stream="two", wpa=True, graph=True,
                 wpa_proj=False, authors_extras=False):
        super().__init__(arch, stream, last_stride=1)
        pool_dim = self.out_dim
        self.dropout, self.part, self.use_wpa, self.use_graph = drop, part, wpa, graph
        self.bottleneck = nn.BatchNorm1d(pool_dim)
        _init_bnneck(self.bottleneck)
        self.classifier = nn.Linear(pool_dim, class_num, bias=False)
        nn.init.normal_(self.classifier.weight, 0, 0.001)
        if wpa:
            self.wpa = IWPA(pool_dim, part, use_w=wpa_proj)
        if graph:
            for i in range(nheads):
                self.add_module(f"attention_{i}", GraphAttentionLayer(
                    pool_dim, low_dim, dropout=drop, alpha=alpha, concat=True))
            self.out_att = GraphAttentionLayer(low_dim * nheads, class_num, dropout=drop,
                                               alpha=alpha, concat=False)
            self.nheads = nheads
        if authors_extras:
            # The authors' embed_net also builds classifier1/classifier2 and never uses
            # them; frozen copies only let their checkpoints load without complaint.
            for name in ("classifier1", "classifier2"):
                setattr(self, name, nn.Linear(pool_dim, class_num, bias=False).requires_grad_(False))
        self.feature_names = ("FC", "FC_att") if wpa else ("FC",)

    def new_modules(self):
        """Names of the modules trained at the full learning rate (the backbone gets
        0.1x), as in the authors' optimiser."""
        names = ["bottleneck", "classifier"] + (["wpa"] if self.use_wpa else [])
        if self.use_graph:
            names += [f"attention_{i}" for i in range(self.nheads)] + ["out_att"]
        return names

    def graph_attention(self, x_pool, adj):
        # float32 throughout, also under AMP: the graph is one small batch-sized matrix,
        # and its unnormalised logits can leave fp16's range.
        with torch.autocast(x_pool.device.type, enabled=False):
            x = F.dropout(x_pool.float(), self.dropout, training=self.training)
            x = torch.cat([getattr(self, f"attention_{i}")(x, adj)
                           for i in range(self.nheads)], 1)
            x = F.dropout(x, self.dropout, training=self.training)
            return F.log_softmax(F.elu(self.out_att(x, adj)), dim=1)

    def forward(self, x1, x2=None, modal=0, adj=None):
        x = self.forward_body(self.stem(x1, x2, modal))
        x_pool = x.float().mean(dim=(2, 3))
        feat = self.bottleneck(x_pool)
        feat_att = self.wpa(x, feat) if self.use_wpa else None
        if not self.training:
            feats = (feat,) if feat_att is None else (feat, feat_att)
            return tuple(F.normalize(f, dim=1) for f in feats)
        part_logits = self.classifier(feat_att) if feat_att is not None else None
        log_probs = None
        if self.use_graph:
            if adj is None:
                raise ValueError("graph attention needs adj (model_ddag.build_adjacency(labels))")
            log_probs = self.graph_attention(x_pool, adj)
        return x_pool, self.classifier(feat), part_logits, log_probs


# ----------------------------------------------------------------------------- scripts
def add_model_args(parser):
    """The flags that define the network (the authors' names; shared by train_ddag.py and
    test_ddag.py)."""
    a = parser.add_argument
    a("--wpa", action="store_true", help="intra-modality weighted part attention (IWPA): "
      "part-ID loss in training, FC_att feature in testing")
    a("--graph", action="store_true", help="cross-modality graph attention loss (training only)")
    a("--part", default=3, type=int, help="IWPA: horizontal parts")
    a("--wpa_proj", action="store_true", help="IWPA: apply the zero-initialised output "
      "projection W to the refined parts (the authors define W but never apply it; leave "
      "this off to load and reproduce their checkpoints)")
    a("--low-dim", default=512, type=int, help="graph attention: width of each head")
    a("--nheads", default=4, type=int, help="graph attention: heads")
    a("--drop", default=0.2, type=float, help="graph attention: dropout")
    return parser


def check_model_args(args):
    for flag, value in (("--part", args.part), ("--low-dim", args.low_dim),
                        ("--nheads", args.nheads)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.drop < 1:
        raise UserError(f"--drop must be in [0, 1), got {args.drop}")


def builder(args, imagenet=True, **layout):
    """class_num -> DDAGNet configured by ``args`` (with --pretrained and ``imagenet``: its
    ImageNet weights); ``layout`` overrides flags (the test script takes
    wpa/graph/authors_extras from the checkpoint)."""
    check_model_args(args)
    kw = dict(low_dim=args.low_dim, drop=args.drop, part=args.part, nheads=args.nheads,
              arch=args.arch, stream=args.stream, wpa=args.wpa, graph=args.graph, wpa_proj=args.wpa_proj)
    kw.update(layout)

    def build(class_num):
        net = DDAGNet(class_num=class_num, **kw)
        if imagenet and args.pretrained:
            checkpoint.load_imagenet(net, args.pretrained)
        return net
    return build


def network_layout(state_dict, args, log=print):
    """The branches a fine-tuned DDAG network was built with, read from its state_dict, as
    :func:`builder` overrides: testing needs no matching --wpa/--graph/--part/--nheads
    flags, and the authors' checkpoints (IWPA and graph layers always built, plus two unused
    classifiers) load as they are. {} for anything else (e.g. an MMGL checkpoint)."""
    keys = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if "classifier.weight" not in keys:
        return {}
    layout = {"wpa": "wpa.gate" in keys, "graph": "attention_0.W" in keys,
              "authors_extras": "classifier1.weight" in keys}
    if layout["wpa"]:
        layout["part"] = int(keys["wpa.gate"].shape[0])
    if layout["graph"]:
        layout["nheads"] = sum(bool(re.fullmatch(r"attention_\d+\.W", k)) for k in keys)
        layout["low_dim"] = int(keys["attention_0.W"].shape[1])
    for flag, key in (("--wpa", "wpa"), ("--graph", "graph")):
        if bool(getattr(args, key)) != layout[key]:
            log(f"note: the checkpoint {'has' if layout[key] else 'has no'} "
                f"{'IWPA' if key == 'wpa' else 'graph attention'}: {flag} "
                f"{'assumed' if layout[key] else 'ignored'}")
    return layout
