"""Networks: an in-repo ResNet (torchvision key names, no torchvision import), the
two-stream backbone shared by MMGL pre-training, AGW and DDAG, the MMGL pre-training
network, and the key mapping that loads a checkpoint's state_dict into them (our files,
the authors', torchvision's ImageNet ResNets; checkpoint.py reads the files).

Module names follow the authors' AGW code (``visible_module.visible.*``,
``thermal_module.thermal.*``, ``base_resnet.base.*``) so that an MMGL checkpoint drops
straight into the fine-tuning networks (ours and theirs), and theirs into ours.

One deliberate difference from the authors' networks: their stem modules each hold a
whole ResNet-50 of which only conv1/bn1 run (and ``base_resnet.base`` holds an unused
conv1/bn1/fc). Ours hold only what runs; ``load_backbone`` skips the unused tensors
of their checkpoints with a one-line report.
"""
import copy
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import utils
from cli import UserError


# ============================================================================ ResNet
def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block (two 3x3 convs)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50 block, torchvision's "v1.5" (the stride sits on the 3x3 conv, as in the
    ImageNet weights everyone fine-tunes from)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# Buildable architectures. The wider table only lets error messages name what a foreign
# checkpoint looks like.
ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}
KNOWN_LAYOUTS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
                  ("bottleneck", (3, 4, 6, 3)): "resnet50",
                  ("bottleneck", (3, 4, 23, 3)): "resnet101",
                  ("bottleneck", (3, 8, 36, 3)): "resnet152"}


def _make_layer(block, inplanes, planes, blocks, stride):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


def _build_layers(arch, last_stride):
    """layer1..layer4 as nn.Sequential (subclasses walk them block by block) and the
    output channel count. ``last_stride=1`` keeps layer4 at 1/16 resolution
    (288x144 -> 18x9), the re-ID convention."""
    block, counts = ARCHS[arch]
    inplanes, layers = 64, []
    for planes, n, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, last_stride)):
        layer, inplanes = _make_layer(block, inplanes, planes, n, stride)
        layers.append(layer)
    return layers, inplanes


def _init_weights(module):
    """torchvision's ResNet initialisation: Kaiming-normal (fan_out) convs, BN = identity.
    Linear layers keep PyTorch's default, as torchvision does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class ResNet(nn.Module):
    """A plain ResNet with torchvision's module names (conv1, bn1, layer1..4, fc), so its
    state_dict has exactly the key format of torchvision ImageNet files."""

    def __init__(self, arch="resnet50", last_stride=1, num_classes=1000):
        super().__init__()
        cli.choice_check("--arch", arch, tuple(ARCHS))
        self.arch = arch
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        layers, self.out_dim = _build_layers(arch, last_stride)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.out_dim, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ============================================================================ two-stream backbone
class Stem(nn.Module):
    """conv1, bn1, relu, maxpool: the modality-specific part of the two-stream network."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class Body(nn.Module):
    """layer1..layer4: the shared part."""

    def __init__(self, layer1, layer2, layer3, layer4):
        super().__init__()
        self.layer1, self.layer2, self.layer3, self.layer4 = layer1, layer2, layer3, layer4

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Named(nn.Module):
    """One child module under a fixed attribute name. It only exists for the state_dict keys
    of the authors' AGW networks: visible_module.visible.*, thermal_module.thermal.*,
    base_resnet.base.*."""

    def __init__(self, name, child):
        super().__init__()
        self.child_name = name
        self.add_module(name, child)

    def forward(self, x):
        return getattr(self, self.child_name)(x)


class TwoStreamBackbone(nn.Module):
    """ResNet split into modality stems + shared body (AGW's module names).

    stream='two': separate visible/thermal stems (conv1, bn1, relu, maxpool), shared
    layer1-4. stream='one': everything shared; the ONE stem object is registered as both
    ``visible_module.visible`` and ``thermal_module.thermal``, so ``state_dict()`` writes
    it under both prefixes and a one-stream checkpoint loads into a two-stream network
    (AGW/DDAG) unchanged.
    """

    BACKBONE_PREFIXES = ("visible_module.", "thermal_module.", "base_resnet.")

    def __init__(self, arch="resnet50", stream="two", last_stride=1):
        super().__init__()
        cli.choice_check("--arch", arch, tuple(ARCHS))
        cli.choice_check("--stream", stream, ("two", "one"))
        self.arch, self.stream, self.last_stride = arch, stream, last_stride
        vis = Stem()
        self.visible_module = Named("visible", vis)
        self.thermal_module = Named("thermal", Stem() if stream == "two" else vis)
        layers, self.out_dim = _build_layers(arch, last_stride)
        self.base_resnet = Named("base", Body(*layers))
        _init_weights(self)

    def stem(self, x1, x2=None, modal=0):
        """modal 0: cat(visible(x1), thermal(x2)) on the batch dim (RGB first);
        1: visible(x1); 2: thermal(x2)."""
        if modal == 0:
            if self.stream == "one":
                # One shared stem: run it once on the joint batch, so its BN normalises
                # both modalities together exactly as layer1-4 do (OUR READING of
                # "all shared"; the authors' one-stream code is unreleased).
                return self.visible_module(torch.cat((x1, x2), 0))
            return torch.cat((self.visible_module(x1), self.thermal_module(x2)), 0)
        if modal == 1:
            return self.visible_module(x1)
        if modal == 2:
            return self.thermal_module(x2)
        raise ValueError(f"modal must be 0, 1 or 2, got {modal!r}")

    def forward_body(self, x):
        return self.base_resnet(x)

    def forward(self, x1, x2=None, modal=0):
        """Feature map [N, out_dim, H/16, W/16] (last stride 1)."""
        return self.forward_body(self.stem(x1, x2, modal))

    def backbone_keys(self):
        """state_dict keys of the backbone (both stem prefixes and the body)."""
        return [k for k in self.state_dict() if k.startswith(self.BACKBONE_PREFIXES)]


# ============================================================================ MMGL network
class MMGLNet(TwoStreamBackbone):
    """MMGL pre-training network (paper §III, docs/PRETRAIN.md): backbone + permutation head + PCC projections.

    * Global granularity: GAP(F) -> ``fc1`` (Linear out_dim->hidden_dim, ReLU) -> ``fc2``
      (Linear hidden_dim->K*K) -> logits [N, K, K]; row i = shuffled position i,
      column j = original stripe j (see ``loss.perm_matrix``). The head's hidden width
      (1024) and the ReLU are OUR READING (the paper gives neither). ``perm_feat='stripes'``
      (a diagnostic, not the paper's figure) feeds ``fc1`` the K stripe-pooled features
      concatenated instead of GAP(F), so the head knows which row each feature came from.
    * Local granularity: F pooled into K horizontal stripes -> ``local_conv_list[k]``
      (1x1 conv out_dim->proj_dim, with bias, no BN/ReLU so the embedding is not
      confined to the positive orthant) -> L2 normalised [N, K, proj_dim].
      ``pcc_head='mlp'`` adds a nonlinear projection head after it (BatchNorm, ReLU,
      Linear proj_dim->128, as SimCLR/MoCo v2), so the contrast acts on a projection the
      backbone's stripe features need not equal. ``local_branch='separate'`` gives the
      stripe branch its OWN copy of the last ResNet stage (MGN-style branches, each with
      its own layer4) fed by the shared layer3; the permutation head and the backbone that
      AGW/DDAG load keep the shared layer4.

    The state_dict holds exactly the backbone keys plus the head keys of
    ``HEAD_PREFIXES`` (the keys AGW/DDAG drop). ``part=False`` (``--no-part``) builds no
    stripe branch (a --no-pcc run then has no parameters without gradients, which
    DDP would otherwise need find_unused_parameters for).
    """

    HEAD_PREFIXES = ("fc1.", "fc2.", "local_conv_list", "perm_bn.", "pcc_mlp.", "local_layer4.")

    def __init__(self, arch="resnet50", stream="two", num_stripe=6, proj_dim=256,
                 hidden_dim=1024, part=True, last_stride=1, perm_feat="gap",
                 perm_bn=False, pcc_head="linear", local_branch="shared", mlp_dim=128):
        super().__init__(arch, stream, last_stride)
        cli.check_stripes(num_stripe)
        cli.choice_check("--perm_feat", perm_feat, ("gap", "stripes"))
        cli.choice_check("--pcc_head", pcc_head, ("linear", "mlp"))
        cli.choice_check("--local_branch", local_branch, ("shared", "separate"))
        self.num_stripe, self.proj_dim, self.perm_feat = num_stripe, proj_dim, perm_feat
        in_dim = self.out_dim * (num_stripe if perm_feat == "stripes" else 1)
        # perm_bn: BatchNorm1d on the pooled feature before fc1 (like AGW's BNNeck after its
        # pooling), so every channel reaches the head at unit scale
        self.perm_bn = nn.BatchNorm1d(in_dim) if perm_bn else None
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_stripe * num_stripe)
        self.local_conv_list = (nn.ModuleList(nn.Conv2d(self.out_dim, proj_dim, 1)
                                              for _ in range(num_stripe))
                                if part else None)
        self.pcc_mlp = (nn.Sequential(nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True), nn.Linear(proj_dim, mlp_dim))
                        if part and pcc_head == "mlp" else None)
        # the separate branch starts as an exact copy of the shared stage, then trains apart
        self.local_layer4 = (copy.deepcopy(self.base_resnet.base.layer4)
                             if part and local_branch == "separate" else None)

    def perm_head(self, fmap):
        """(permutation logits [N, K, K], fc1's pre-ReLU output [N, hidden_dim]); a unit below
        zero for every image is a dead ReLU (the head's diagnostic)."""
        if self.perm_feat == "stripes":   # [N, C, K] -> [N, C*K]: row position kept
            pooled = F.adaptive_avg_pool2d(fmap, (self.num_stripe, 1)).flatten(1)
        else:
            pooled = fmap.mean(dim=(2, 3))
        if self.perm_bn is not None:
            pooled = self.perm_bn(pooled)
        pre = self.fc1(pooled)
        logits = self.fc2(F.relu(pre)).view(-1, self.num_stripe, self.num_stripe)
        return logits, pre

    def stripe_embed(self, fmap, perms=None):
        """K stripe embeddings [N, K, proj_dim], L2-normalised (float32). With ``perms``
        ([N, K], the shuffle each image got) the stripes are first put back in ORIGINAL
        order, so ``local_conv_list[k]`` projects body part k wherever it was shuffled to
        (``--pcc_order original``); without, stripe k is shuffled position k."""
        K = self.num_stripe
        stripes = F.adaptive_avg_pool2d(fmap, (K, 1)).flatten(2)           # [N, C, K]
        if perms is not None:   # original part j sits at shuffled position argsort(perms)[j]
            inv = perms.argsort(dim=1).to(stripes.device)
            stripes = stripes.gather(2, inv[:, None, :].expand_as(stripes))
        # K separate 1x1 convs on a 1x1 map are K linear maps; one batched einsum does all
        # of them at once instead of K small kernels.
        w = torch.stack([m.weight.flatten(1) for m in self.local_conv_list])  # [K, P, C]
        b = torch.stack([m.bias for m in self.local_conv_list])               # [K, P]
        z = torch.einsum("nck,kpc->nkp", stripes, w.to(stripes.dtype)) + b.to(stripes.dtype)
        if self.pcc_mlp is not None:   # one MLP for all K stripes (BN over the N*K rows)
            z = self.pcc_mlp(z.flatten(0, 1)).view(z.shape[0], K, -1)
        return F.normalize(z.float(), dim=-1)

    def forward(self, x_rgb, x_ir=None, modal=0, pcc=None, perms=None, features=False):
        """Inputs: normalised float NCHW, already stripe-shuffled. modal 0 stacks RGB
        then IR along the batch dim of every output. Returns a dict with 'perm_logits'
        [N, K, K] (float32) and, unless the local branch is off (``pcc=False`` or built
        without it), 'stripes' [N, K, proj_dim] (in original order when ``perms`` [N, K]
        is given, see :meth:`stripe_embed`). ``features``: also 'stripe_pool' [N, K, C],
        the shared backbone's feature map pooled per (shuffled) stripe, for the probes, and
        'perm_hidden' [N, hidden_dim], the head's fc1 output before its ReLU."""
        body = self.base_resnet.base
        x = body.layer3(body.layer2(body.layer1(self.stem(x_rgb, x_ir, modal))))
        fmap = body.layer4(x)
        logits, hidden = self.perm_head(fmap)
        out = {"perm_logits": logits.float()}
        if features:
            out["perm_hidden"] = hidden.float()
            out["stripe_pool"] = F.adaptive_avg_pool2d(fmap, (self.num_stripe, 1)).flatten(2).transpose(1, 2).float()
        if pcc is None:
            pcc = self.local_conv_list is not None
        if pcc:
            if self.local_conv_list is None:
                raise ValueError("this MMGLNet was built with part=False (no stripe branch)")
            local = fmap if self.local_layer4 is None else self.local_layer4(x)
            out["stripes"] = self.stripe_embed(local, perms)
        return out


# ============================================================================ checkpoints -> networks (key mapping)
# Key names: ours follow the authors' AGW network (visible_module.visible.*,
# thermal_module.thermal.*, base_resnet.base.*), so their files and ours load both ways;
# torchvision's ImageNet ResNet keys map onto both stems and the body (load_imagenet).
def _strip_module(sd):
    """Drop the 'module.' prefix DataParallel/DDP checkpoints carry."""
    return OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in sd.items())


_BLOCK_RE = re.compile(r"(?:^|\.)layer([1-4])\.(\d+)\.conv(\d)\.weight$")


def guess_arch(sd):
    """Name the ResNet a state_dict looks like ('resnet50', ...), or None."""
    blocks, block = {}, "basic"
    for k in sd:
        m = _BLOCK_RE.search(k)
        if m:
            layer, idx, conv = int(m.group(1)), int(m.group(2)), int(m.group(3))
            blocks[layer] = max(blocks.get(layer, 0), idx + 1)
            if conv == 3:
                block = "bottleneck"
    if not blocks:
        return None
    counts = tuple(blocks.get(i, 0) for i in range(1, 5))
    return KNOWN_LAYOUTS.get((block, counts), f"a {block} ResNet with blocks {counts}")


def load_imagenet(net, src, source, log=print):
    """Load torchvision-format ImageNet ResNet weights (the state_dict ``src``, read from
    ``source``: checkpoint.load_imagenet reads ``--pretrained PATH``) into a :class:`ResNet`
    or a :class:`TwoStreamBackbone` (conv1/bn1 -> both stems, layerX ->
    base_resnet.base.layerX, fc dropped). Returns the number of tensors loaded."""
    src = _strip_module(src)
    net = utils.unwrap(net)
    own = net.state_dict()
    if isinstance(net, TwoStreamBackbone):
        strip = re.compile(r"^(visible_module\.visible|thermal_module\.thermal|base_resnet\.base)\.")
        wanted = {k: strip.sub("", k) for k in net.backbone_keys()}
    elif isinstance(net, ResNet):
        wanted = {k: k for k in own if not k.startswith("fc.")}
    else:
        raise TypeError(f"load_imagenet expects a ResNet or TwoStreamBackbone, got {type(net).__name__}")
    to_load, missing, mismatched = {}, [], []
    for dst, key in wanted.items():
        if key not in src:
            # Older torchvision files predate BN's num_batches_tracked buffer.
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
        elif src[key].shape != own[dst].shape:
            mismatched.append(key)
        else:
            to_load[dst] = src[key]
    if isinstance(net, ResNet) and all(k in src and src[k].shape == own[k].shape
                                       for k in ("fc.weight", "fc.bias")):
        to_load.update({k: src[k] for k in ("fc.weight", "fc.bias")})
    if missing or mismatched:
        looks = guess_arch(src) or "no ResNet"
        raise UserError(f"--pretrained {source} does not hold {net.arch} ImageNet weights in "
                        f"torchvision's key format (it looks like {looks}; {len(missing)} "
                        f"tensors missing, {len(mismatched)} of a different shape)")
    net.load_state_dict(to_load, strict=False)
    n_src = len({k: None for k in wanted.values() if k in src})
    log(f"loaded {n_src} ImageNet tensors ({net.arch}) from {source}")
    return n_src


# The authors' stems each hold a whole ResNet and their base a whole ResNet too; these
# tensors never run. Anything else unknown is reported as 'unexpected'.
_UNUSED_RE = re.compile(r"^(?:(?:visible_module\.visible|thermal_module\.thermal)\."
                        r"(?:layer\d|fc|avgpool)\.|base_resnet\.base\.(?:conv1|bn1|fc|avgpool)\.)")


def _fmt_keys(keys, n=3):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def load_backbone(net, sd, log=print, source="checkpoint"):
    """Initialise ``net`` (a TwoStreamBackbone subclass: AGW/DDAG) from the state_dict ``sd``
    (checkpoint.network_state of a file): an MMGL pre-training checkpoint (ours or the
    authors') or the authors' fine-tuning networks.

    'module.' prefixes are stripped, pre-training heads (fc1., fc2., local_conv_list)
    dropped, the authors' never-run stem/base ResNet tensors skipped, and every tensor
    whose name and shape match ``net`` loaded. Returns a report dict of key lists:
    loaded, skipped_unused, dropped_head, mismatched, missing_backbone, unexpected.
    UserError when no backbone tensor loads (a wrong file must never mean a silent
    from-scratch run)."""
    net = utils.unwrap(net)
    sd = _strip_module(sd)
    own = net.state_dict()
    report = {k: [] for k in ("loaded", "skipped_unused", "dropped_head", "mismatched",
                              "missing_backbone", "unexpected")}
    to_load = OrderedDict()
    for k, v in sd.items():
        if k.startswith(MMGLNet.HEAD_PREFIXES):
            report["dropped_head"].append(k)
        elif k in own:
            if own[k].shape == v.shape:
                to_load[k] = v
            else:
                report["mismatched"].append(k)
        elif _UNUSED_RE.match(k):
            report["skipped_unused"].append(k)
        else:
            report["unexpected"].append(k)

    # Same key names but another depth/width (e.g. a resnet50 file into --arch resnet18)
    # would load a few coincidentally equal-shaped BN vectors: refuse it outright.
    looks = guess_arch({k: v for k, v in sd.items() if k.startswith(net.BACKBONE_PREFIXES)})
    if looks in KNOWN_LAYOUTS.values() and looks != net.arch:
        raise UserError(f"{source} holds a {looks} backbone but the network is {net.arch} "
                        f"(--arch {looks}?)")

    backbone = net.backbone_keys()
    if getattr(net, "stream", "two") == "one":
        # One shared stem: if the checkpoint has two different stems, keep the visible
        # one deterministically (load order would otherwise let thermal win silently).
        differ = False
        for k in [k for k in to_load if k.startswith("thermal_module.thermal.")]:
            twin = "visible_module.visible." + k[len("thermal_module.thermal."):]
            if twin in to_load:
                differ |= not torch.equal(to_load[twin], to_load[k])
                del to_load[k]
        if differ:
            log("warning: the network has one shared stem but the checkpoint's visible and "
                "thermal stems differ; the visible stem was loaded")
    report["loaded"] = list(to_load)
    # A tensor counts as loaded if its storage was written: with one shared stem the
    # visible and thermal keys are the same tensor.
    written = {own[k].data_ptr() for k in to_load}
    report["missing_backbone"] = [k for k in backbone if own[k].data_ptr() not in written]
    n_ok = len(backbone) - len(report["missing_backbone"])
    if n_ok == 0:
        looks = guess_arch(sd)
        hint = f" (it looks like {looks})" if looks else f" (its keys: {_fmt_keys(sd)})"
        raise UserError(f"{source} matches no backbone key of the {net.arch} network{hint}")
    net.load_state_dict(to_load, strict=False)

    n_other = sum(not k.startswith(net.BACKBONE_PREFIXES) for k in to_load)
    log(f"loaded {n_ok}/{len(backbone)} backbone tensors from {source} "
        f"(dropped {len(report['dropped_head'])} pre-training head tensors, "
        f"skipped {len(report['skipped_unused'])} unused)"
        + (f", plus {n_other} other matching tensors" if n_other else ""))
    if report["mismatched"]:
        log(f"warning: {len(report['mismatched'])} tensors have a different shape and were not "
            "loaded: " + _fmt_keys(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                    for k in report["mismatched"]))
    if report["missing_backbone"]:
        log(f"warning: {len(report['missing_backbone'])} backbone tensors are not in {source} "
            "and keep their initial values: " + _fmt_keys(report["missing_backbone"]))
    if report["unexpected"]:
        log(f"note: {len(report['unexpected'])} tensors of {source} have no counterpart in the "
            "network and were ignored: " + _fmt_keys(report["unexpected"]))
    return report


def load_finetuned(net, state_dict, source, hint="--method/--arch/--dataset", log=print):
    """Load a fine-tuned network's state_dict strictly, except for the tensors the authors'
    networks carry but never run (their stems' whole ResNets), which are skipped with a
    note. Any other missing, unexpected or mis-shaped tensor is a UserError naming a few."""
    net = utils.unwrap(net)
    report = load_backbone(net, state_dict, log=lambda *_: None, source=source)
    own = net.state_dict()
    written = {own[k].data_ptr() for k in report["loaded"]}
    missing = [k for k, v in own.items()
               if v.data_ptr() not in written and not k.endswith("num_batches_tracked")]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", report["unexpected"]),
                       ("pre-training head", report["dropped_head"]),
                       ("of a different shape", report["mismatched"])):
        if keys:
            more = " ..." if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
    if problems:
        raise UserError(f"{source} does not fit this network: " + "; ".join(problems)
                        + f". Was it trained with other {hint}?")
    skipped = len(report["skipped_unused"])
    log(f"loaded all {len(report['loaded'])} tensors of {source}"
        + (f" (skipped {skipped} never-used stem/base tensors of the authors' network)"
           if skipped else ""))
