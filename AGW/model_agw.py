"""AGW network (Ye et al., "Deep Learning for Person Re-identification: A Survey and
Outlook", TPAMI 2021, §4 "AGW baseline"), cross-modality version:

    two-stream ResNet (modality-specific stems, shared layer1-4, last stride 1)
    + non-local attention blocks after the last 2 blocks of layer2 and the last 3 of layer3
    + generalised-mean (GeM) pooling, p = 3
    + BNNeck: BatchNorm1d with a frozen zero bias, then a bias-free classifier.

Training returns (pooled feature, logits): the triplet loss sees the pooled feature, the ID
loss the logits of the BN feature. Evaluation returns (l2norm(pooled), l2norm(BN feature)),
printed as POOL and FC. ``method='base'`` drops the non-local blocks and uses average pooling.

Parameter names are the authors' (``NL_2.0.theta.weight``, ``bottleneck.*``,
``classifier.weight`` ...), and the backbone's are those of :class:`model.TwoStreamBackbone`,
so the authors' AGW checkpoints and MMGL pre-training checkpoints load directly.
"""
import sys
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
from model import TwoStreamBackbone  # noqa: E402
from cli import choice_check  # noqa: E402

METHODS = ("agw", "base")
FEATURE_NAMES = ("POOL", "FC")  # the evaluation outputs, as the test lines name them
NL_WIDTHS = ("authors", "half")
# Non-local blocks per ResNet layer (layer1..layer4), placed after the LAST blocks of the layer.
NON_LOCAL_BLOCKS = (0, 2, 3, 0)


class Non_local(nn.Module):
    """Non-local block (Wang et al., CVPR 2018) in the form of the authors' AGW code:
    z = x + W(y), y_i = 1/N * sum_j theta(x_i) . phi(x_j) * g(x_j) -- the "dot product"
    variant, affinities scaled by 1/N (no softmax). W ends in a BatchNorm2d initialised to
    zero, so a fresh block is the identity and does not disturb a pre-trained backbone.

    ``inter_channels``: the published AGW checkpoints have ONE intermediate channel (their
    code computes ``reduc_ratio // reduc_ratio``), which is our default (nl_width='authors');
    nl_width='half' gives the intended C/2. Both keep the 1/N scaling.
    """

    def __init__(self, in_channels, inter_channels=1):
        super().__init__()
        self.in_channels, self.inter_channels = in_channels, inter_channels
        self.g = nn.Sequential(nn.Conv2d(in_channels, inter_channels, kernel_size=1))
        self.W = nn.Sequential(nn.Conv2d(inter_channels, in_channels, kernel_size=1),
                               nn.BatchNorm2d(in_channels))
        nn.init.constant_(self.W[1].weight, 0.0)
        nn.init.constant_(self.W[1].bias, 0.0)
        self.theta = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inter_channels, kernel_size=1)

    def forward(self, x):
        b, _, h, w = x.shape
        n = h * w
        g_x = self.g(x).flatten(2)          # [B, I, N]
        theta_x = self.theta(x).flatten(2)  # [B, I, N]
        phi_x = self.phi(x).flatten(2)      # [B, I, N]
        # Without a softmax the affinity is linear, so (theta^T phi) g^T = theta^T (phi g^T):
        # the second order costs N*I^2 instead of N^2*I and never builds the N x N matrix
        # (N = 648 positions in layer2 at 288x144, I = 1 for the authors' width).
        if self.inter_channels < n:
            y = theta_x.transpose(1, 2) @ (phi_x @ g_x.transpose(1, 2) / n)   # [B, N, I]
        else:
            y = (theta_x.transpose(1, 2) @ phi_x / n) @ g_x.transpose(1, 2)
        y = y.transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return x + self.W(y)


def _out_channels(layer):
    """Output channels of a ResNet layer: its last BatchNorm2d (bn3 of a Bottleneck, bn2 of a
    BasicBlock; a downsample BN comes earlier in module order)."""
    return [m for m in layer[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def gem_pool(x, p=3.0, eps=1e-12):
    """Generalised-mean pooling over H, W as the authors compute it on post-ReLU maps:
    (mean(x^p) + eps)^(1/p). In float32: under fp16 autocast x^3 overflows beyond ~40."""
    x = x.float().flatten(2)
    return (x.pow(p).mean(dim=-1) + eps).pow(1.0 / p)


class AGWNet(TwoStreamBackbone):
    """AGW / baseline cross-modality network (the authors call it embed_net; module names as theirs).

    class_num: training identities; arch: 'resnet50' | 'resnet18'; stream: 'two' (AGW)
    or 'one'; method: 'agw' | 'base'; nl_width: 'authors' (1 channel) | 'half' (C/2);
    For resnet18 (2 blocks per layer) the blocks go after the last min(n, 2) blocks.
    """

    feature_names = FEATURE_NAMES

    def __init__(self, class_num, arch="resnet50", stream="two", method="agw",
                 nl_width="authors"):
        super().__init__(arch=arch, stream=stream, last_stride=1)
        choice_check("--method", method, METHODS)
        choice_check("--nl_width", nl_width, NL_WIDTHS)
        self.method, self.nl_width = method, nl_width
        self.non_local = method == "agw"
        layers = [getattr(self.base_resnet.base, f"layer{i}") for i in range(1, 5)]
        self.nl_after = []  # per layer: the block indices followed by a non-local block
        for i, (layer, n) in enumerate(zip(layers, NON_LOCAL_BLOCKS), 1):
            n = min(n, len(layer)) if self.non_local else 0
            c = _out_channels(layer)
            inter = 1 if nl_width == "authors" else c // 2
            setattr(self, f"NL_{i}", nn.ModuleList(Non_local(c, inter) for _ in range(n)))
            self.nl_after.append(list(range(len(layer) - n, len(layer))))

        self.pool_dim = self.out_dim
        self.bottleneck = nn.BatchNorm1d(self.pool_dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift
        # the authors' weights_init_kaiming for BatchNorm1d / weights_init_classifier
        nn.init.normal_(self.bottleneck.weight, 1.0, 0.01)
        nn.init.zeros_(self.bottleneck.bias)
        self.classifier = nn.Linear(self.pool_dim, class_num, bias=False)
        nn.init.normal_(self.classifier.weight, 0.0, 0.001)

    def new_modules(self):
        """The modules trained at the full learning rate; the backbone, non-local blocks
        included, gets 0.1x, as in the authors' optimiser."""
        return ["bottleneck", "classifier"]

    def forward_body(self, x):
        base = self.base_resnet.base
        for i in range(1, 5):
            layer, nl = getattr(base, f"layer{i}"), getattr(self, f"NL_{i}")
            after = self.nl_after[i - 1]
            for j, block in enumerate(layer):
                x = block(x)
                if j in after:
                    x = nl[after.index(j)](x)
        return x

    def forward(self, x1, x2=None, modal=0):
        """modal 0: RGB batch x1 and IR batch x2 (stacked RGB first); 1: RGB only; 2: IR only.
        train -> (pooled [B, C], logits [B, classes]); eval -> (l2norm(pooled), l2norm(BN))."""
        x = self.forward_body(self.stem(x1, x2, modal))
        if self.non_local:
            x_pool = gem_pool(x)
        else:
            x_pool = x.float().mean(dim=(2, 3))
        feat = self.bottleneck(x_pool)
        if self.training:
            return x_pool, self.classifier(feat)
        return F.normalize(x_pool, dim=1), F.normalize(feat, dim=1)


# ----------------------------------------------------------------------------- scripts
def add_model_args(parser):
    """The flags that define the network (shared by train.py and test.py)."""
    parser.add_argument("--method", default="agw", choices=METHODS,
                        help="agw: non-local + GeM + WRT triplet; base: plain two-stream "
                             "baseline with average pooling and batch-hard triplet")
    parser.add_argument("--nl_width", default="authors", choices=NL_WIDTHS,
                        help="non-local intermediate channels: 'authors' = 1 (the published "
                             "checkpoints), 'half' = C/2 (the intended width)")
    return parser


def builder(args):
    """class_num -> AGWNet configured by ``args`` (with --pretrained: its ImageNet weights)."""
    def build(class_num):
        net = AGWNet(class_num, arch=args.arch, stream=args.stream, method=args.method, nl_width=args.nl_width)
        if args.pretrained:
            checkpoint.load_imagenet(net, args.pretrained)
        return net
    return build
