"""model.py and loss.py: Sinkhorn/permutation pieces, PCC, ReID triplets, the network's
shapes and key layout, and the checkpoint loaders (real files through torch.save /
checkpoint.load)."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint  # noqa: E402
import loss  # noqa: E402
import model  # noqa: E402
from cli import UserError  # noqa: E402

HEADS = model.MMGLNet.HEAD_PREFIXES
BACKBONE = model.TwoStreamBackbone.BACKBONE_PREFIXES


@pytest.fixture(scope="module")
def mmgl50():
    torch.manual_seed(0)
    return model.MMGLNet("resnet50", "two")


# ============================================================================ Sinkhorn / permutations
def test_sinkhorn_is_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 6, generator=g)
    for scale, iters in ((1, 20), (3, 100)):          # peakier logits need more rounds
        p = loss.log_sinkhorn(logits * scale, n_iters=iters).exp()
        assert torch.allclose(p.sum(-1), torch.ones(5, 6), atol=1e-4)
        assert torch.allclose(p.sum(-2), torch.ones(5, 6), atol=1e-4)
    # temperature: log_sinkhorn(x, temp=t) == log_sinkhorn(x / t)
    assert torch.allclose(loss.log_sinkhorn(logits, 20, temp=0.5), loss.log_sinkhorn(logits * 2, 20))
    # log space stays finite for huge logits (a naive exp-space Sinkhorn overflows)
    big = loss.log_sinkhorn(logits * 1000, n_iters=5)
    assert torch.isfinite(big).all()


def test_sinkhorn_recovers_permutation_and_mse():
    g = torch.Generator().manual_seed(1)
    perms = torch.stack([torch.randperm(6, generator=g) for _ in range(8)])
    P = loss.perm_matrix(perms)
    # convention: P[b, i, perms[b, i]] = 1
    assert P[3, 2, perms[3, 2]] == 1 and P.sum() == 8 * 6
    soft = loss.gumbel_sinkhorn(10 * P, n_iters=20, training=False)
    assert soft.shape == (8, 6, 6)
    assert torch.allclose(soft, P, atol=1e-3)
    assert loss.perm_accuracy(10 * P, perms) == (1.0, 1.0)
    assert loss.perm_mse_loss(P, P).item() == 0.0
    assert loss.perm_mse_loss(soft, P).item() > 0
    assert loss.perm_mse_loss(torch.full_like(P, 1 / 6), P).item() > 0.1


def test_perm_matrix_matches_stripe_shuffle_convention():
    # output stripe i = input stripe perms[i]  <=>  shuffled = P @ original
    perms = torch.tensor([[2, 0, 3, 1]])
    original = torch.arange(4.0).view(1, 4, 1) * 10
    shuffled = original[:, perms[0]]
    P = loss.perm_matrix(perms)
    assert torch.equal(P @ original, shuffled)
    assert torch.equal(P.transpose(1, 2) @ shuffled, original)


def test_gumbel_samples_shape_noise_and_generator():
    logits = torch.randn(4, 6, 6)
    s1 = loss.gumbel_sinkhorn(logits, n_iters=10, n_samples=3, noise=1.0,
                              generator=torch.Generator().manual_seed(7))
    s2 = loss.gumbel_sinkhorn(logits, n_iters=10, n_samples=3, noise=1.0,
                              generator=torch.Generator().manual_seed(7))
    assert s1.shape == (12, 6, 6) and torch.equal(s1, s2)
    assert not torch.allclose(s1[:4], s1[4:8])          # independent draws
    clean = loss.gumbel_sinkhorn(logits, n_iters=10, n_samples=3, training=False)
    assert clean.shape == (4, 6, 6)
    target = loss.perm_matrix(torch.stack([torch.randperm(6) for _ in range(4)]))
    # the target is repeated per sample: equal to the mean of per-sample losses
    per = torch.stack([F.mse_loss(s1[i * 4:(i + 1) * 4], target) for i in range(3)]).mean()
    assert torch.allclose(loss.perm_mse_loss(s1, target), per)


def test_perm_accuracy_hand_cases():
    K = 6
    truth = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    good = 5 * loss.perm_matrix(truth)
    assert loss.perm_accuracy(good, truth) == (1.0, 1.0)
    swapped = truth.clone()
    swapped[:, [1, 2]] = swapped[:, [2, 1]]            # one swap per sample
    whole, stripe = loss.perm_accuracy(5 * loss.perm_matrix(swapped), truth)
    assert whole == 0.0 and stripe == pytest.approx((K - 2) / K)
    # one sample right, one swapped -> whole 0.5
    mixed = torch.stack([good[0], 5 * loss.perm_matrix(swapped)[1]])
    whole, stripe = loss.perm_accuracy(mixed, truth)
    assert whole == 0.5 and stripe == pytest.approx((K + K - 2) / (2 * K))
    # soft input path: a doubly stochastic matrix that favours the truth
    soft = 0.7 * loss.perm_matrix(truth) + 0.3 / K
    assert loss.perm_accuracy(soft, truth, soft=True) == (1.0, 1.0)


def test_hungarian_beats_rowwise_argmax():
    # row-wise argmax would pick column 0 twice; the assignment must stay a permutation
    logits = torch.tensor([[[5.0, 4.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    whole, _ = loss.perm_accuracy(logits, torch.tensor([[1, 0, 2]]))
    assert whole == 1.0


# ============================================================================ PCC
def _structured(n_id=4, twins=2, K=6, D=32, noise=0.02, seed=0):
    """n_id identities x twins images; stripe k of identity c is a fixed direction plus
    a little per-image noise. RGB and IR are built from the SAME directions."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(n_id, K, D, generator=g), dim=-1)
    z = base.repeat_interleave(twins, 0) + noise * torch.randn(n_id * twins, K, D, generator=g)
    return F.normalize(z, dim=-1)


def test_pcc_low_for_consistent_modalities_high_for_random():
    z_rgb = _structured(seed=0)
    noise = torch.randn(z_rgb.shape, generator=torch.Generator().manual_seed(9))
    z_ir = F.normalize(z_rgb + 0.02 * noise, dim=-1)
    consistent = loss.pcc_loss(z_rgb, z_ir).item()
    random_ir = F.normalize(torch.randn(z_rgb.shape, generator=torch.Generator().manual_seed(3)), dim=-1)
    inconsistent = loss.pcc_loss(z_rgb, random_ir).item()
    # consistent: each query's cross- and intra-modal neighbours are the same part of the
    # same identity; only its twin's query is a confusable negative -> about log 2 = 0.69
    # (the floor log(1) = 0 needs every query to be unique). Random IR: ~2.3 here
    # (chance would be log(B*K) = log 48 = 3.87; the RGB side still has structure).
    assert consistent < 0.8
    assert inconsistent > consistent + 1.2
    # the pools are SETS: shuffling stripes within images does not change the loss
    perm = torch.stack([torch.randperm(6) for _ in range(z_ir.shape[0])])
    shuffled = torch.gather(z_ir, 1, perm[..., None].expand_as(z_ir))
    assert loss.pcc_loss(z_rgb, shuffled).item() == pytest.approx(consistent, rel=1e-4)


def test_pcc_gradients_and_pool_offsets():
    z_rgb = _structured(seed=1).requires_grad_(True)
    z_ir = _structured(seed=2).requires_grad_(True)
    out = loss.pcc_loss(z_rgb, z_ir)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z_rgb.grad).all() and torch.isfinite(z_ir.grad).all()
    assert z_rgb.grad.abs().sum() > 0 and z_ir.grad.abs().sum() > 0
    # a "gathered" pool equal to the local batch with offset 0 is the same computation
    with torch.no_grad():
        same = loss.pcc_loss(z_rgb, z_ir, pool_rgb=z_rgb, pool_ir=z_ir, offset=0)
        assert torch.allclose(same, out)
        # rank 1 of 2: local queries are pool rows 4..7
        local = loss.pcc_loss(z_rgb[4:], z_ir[4:], pool_rgb=z_rgb, pool_ir=z_ir, offset=4)
        assert torch.isfinite(local)
    with pytest.raises(ValueError):
        loss.pcc_loss(z_rgb[:1], z_ir[:1])


def test_pcc_cycle_form_hand_case():
    """cycle: the cross-modal soft neighbour of q, matched back into q's own modality, must
    find q. Two images, one stripe, orthogonal directions: RGB a/b, IR exactly a/b, so q_x
    = q (up to the soft-NN mixture) and the loss is the cross-entropy of its
    back-match, computed here by hand."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([a, b])[:, None, :]   # [B=2, K=1, D=2]
    t = 0.5
    w = torch.softmax(torch.tensor([1.0, 0.0]) / t, 0)      # q=a against the pool (a, b)
    q_x = F.normalize(w[0] * a + w[1] * b, dim=0)
    expected = F.cross_entropy((q_x @ torch.stack([a, b]).t() / t)[None], torch.tensor([0]))
    # by symmetry every query (a or b, RGB or IR) has the same loss
    assert loss.pcc_loss(z, z.clone(), t, form="cycle").item() == pytest.approx(expected.item(), rel=1e-5)
    # consistent modalities beat random ones, as for the pair form
    z_rgb = _structured(seed=0)
    z_ir = F.normalize(z_rgb + 0.02 * torch.randn(z_rgb.shape, generator=torch.Generator().manual_seed(9)), dim=-1)
    random_ir = F.normalize(torch.randn(z_rgb.shape, generator=torch.Generator().manual_seed(3)), dim=-1)
    assert loss.pcc_loss(z_rgb, z_ir, form="cycle") + 0.15 < loss.pcc_loss(z_rgb, random_ir, form="cycle")


def test_pcc_part_pool_searches_only_the_same_index():
    """pool='part': a query of index k only sees stripes of index k, as neighbours and as
    negatives, so the loss is exactly the mean over k of the loss of each index on its
    own (both forms), and differs from pool='all'."""
    z_rgb, z_ir = _structured(seed=4), _structured(seed=5)
    for form in ("pair", "cycle"):
        per_k = [loss.pcc_loss(z_rgb[:, k:k + 1], z_ir[:, k:k + 1], form=form) for k in range(6)]
        whole = loss.pcc_loss(z_rgb, z_ir, form=form, pool="part")
        assert whole.item() == pytest.approx(torch.stack(per_k).mean().item(), rel=1e-5)
    for form in ("pair", "cycle"):
        full = loss.pcc_loss(z_rgb, z_ir, form=form, pool="all")
        part = loss.pcc_loss(z_rgb, z_ir, form=form, pool="part")
        assert torch.isfinite(part) and not torch.allclose(full, part)
    with pytest.raises(ValueError):
        loss.pcc_loss(z_rgb, z_ir, pool="row")


def test_stripe_embed_in_original_order():
    """--pcc_order original: stripe j of the output is the stripe the shuffle moved away
    from position j, i.e. body part j, whatever row it sits at (checked with one shared
    projection, so only the order differs)."""
    torch.manual_seed(0)
    net = model.MMGLNet("resnet18", "two", num_stripe=6)
    with torch.no_grad():
        for m in net.local_conv_list[1:]:
            m.weight.copy_(net.local_conv_list[0].weight)
            m.bias.copy_(net.local_conv_list[0].bias)
    fmap = torch.randn(3, net.out_dim, 6, 3)
    perms = torch.stack([torch.randperm(6) for _ in range(3)])
    shuffled = net.stripe_embed(fmap)
    original = net.stripe_embed(fmap, perms)
    for b in range(3):
        for i in range(6):   # shuffled position i holds original part perms[b, i]
            assert torch.allclose(original[b, perms[b, i]], shuffled[b, i], atol=1e-6)


# ============================================================================ ReID losses
# Four 2-D points on a line: x = 0, 1 (id 0) and 3, 5 (id 1). Distances:
# d01=1, d02=3, d03=5, d12=2, d13=4, d23=2 (diagonal sqrt(1e-12) = 1e-6).
POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_pdist():
    d = loss.pdist(POINTS, POINTS)
    assert torch.allclose(d[0], torch.tensor([1e-6, 1.0, 3.0, 5.0]), atol=1e-6)


def test_batch_hard_triplet_hand_case():
    # hardest positive / negative per anchor: a0 (1, 3), a1 (1, 2), a2 (2, 2), a3 (2, 4)
    # hinge max(0, d_ap - d_an + 0.3): 0, 0, 0.3, 0 -> mean 0.075; all d_an >= d_ap
    value, correct = loss.TripletLoss(0.3)(POINTS, LABELS)
    assert value.item() == pytest.approx(0.075, abs=1e-6)
    assert isinstance(correct, torch.Tensor) and correct.item() == 4


def test_wrt_hand_case():
    e = math.exp
    # positives (self at ~0, partner at p): weights softmax([0, p]) -> d_ap_w = p*e^p/(1+e^p)
    # negatives at (n1, n2): weights softmax([-n1, -n2]) -> d_an_w = (n1 e^-n1 + n2 e^-n2)/(e^-n1 + e^-n2)
    def ap(p):
        return p * e(p) / (1 + e(p))

    def an(n1, n2):
        return (n1 * e(-n1) + n2 * e(-n2)) / (e(-n1) + e(-n2))

    rows = [(ap(1), an(3, 5)), (ap(1), an(2, 4)), (ap(2), an(3, 2)), (ap(2), an(5, 4))]
    # SoftMarginLoss(x, 1) = mean log(1 + exp(-x)),  x = d_an_w - d_ap_w
    expected = sum(math.log1p(e(-(n - p))) for p, n in rows) / 4
    for stable in (False, True):
        value, correct = loss.TripletLoss_WRT(stable=stable)(POINTS, LABELS)
        assert value.item() == pytest.approx(expected, rel=1e-4)
        assert correct.item() == sum(n >= p for p, n in rows) == 4


def test_wrt_default_vs_stable():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(16, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    small = F.normalize(feats, dim=1)                  # distances <= 2
    a, _ = loss.TripletLoss_WRT(stable=False)(small, labels)
    b, _ = loss.TripletLoss_WRT(stable=True)(small, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    big = small * 30                                  # distances ~ 20 .. 60
    assert loss.pdist(big, big).masked_fill(labels[:, None] == labels[None], 1e9).min() > 15
    a, _ = loss.TripletLoss_WRT(stable=False)(big, labels)
    b, _ = loss.TripletLoss_WRT(stable=True)(big, labels)
    # authors' form: negative weights underflow -> closest_negative ~ 0 -> loss ~ d_ap
    assert a.item() > b.item() + 5
    assert torch.isfinite(a) and torch.isfinite(b)
    # gradients finite in both forms
    x = big.clone().requires_grad_(True)
    loss.TripletLoss_WRT(stable=True)(x, labels)[0].backward()
    assert torch.isfinite(x.grad).all()


# ============================================================================ networks
def test_shapes_last_stride_resnet18_and_mmgl_outputs():
    torch.manual_seed(0)
    net = model.MMGLNet("resnet18", "two", num_stripe=6, proj_dim=16).eval()
    assert net.out_dim == 512
    with torch.no_grad():
        fmap = model.TwoStreamBackbone.forward(net, torch.randn(1, 3, 288, 144), None, 1)
        assert fmap.shape == (1, 512, 18, 9)
        x_rgb, x_ir = torch.randn(2, 3, 96, 48), torch.randn(2, 3, 96, 48)
        out = net(x_rgb, x_ir)
        assert out["perm_logits"].shape == (4, 6, 6)
        assert out["stripes"].shape == (4, 6, 16)
        assert torch.allclose(out["stripes"].norm(dim=-1), torch.ones(4, 6), atol=1e-5)
        assert "stripes" not in net(x_rgb, x_ir, pcc=False)
        # modal 0 stacks RGB first; in eval mode the halves equal single-modality runs
        single = net(x_rgb, None, modal=1)
        assert torch.allclose(single["perm_logits"], out["perm_logits"][:2], atol=1e-5)
        ir = net(None, x_ir, modal=2)
        assert torch.allclose(ir["stripes"], out["stripes"][2:], atol=1e-5)
        # the batched einsum equals applying local_conv_list[k] to stripe k
        fm = net.forward_body(net.stem(x_rgb, x_ir))
        pooled = F.adaptive_avg_pool2d(fm, (6, 1))
        k = 4
        ref = F.normalize(net.local_conv_list[k](pooled[:, :, k:k + 1]).flatten(1), dim=-1)
        assert torch.allclose(ref, out["stripes"][:, k], atol=1e-5)
    nolocal = model.MMGLNet("resnet18", "two", part=False)
    assert not any(k.startswith("local_conv_list") for k in nolocal.state_dict())


def test_resnet50_last_stride_1_shape(mmgl50):
    net = mmgl50.eval()
    assert net.out_dim == 2048
    with torch.no_grad():
        fmap = model.TwoStreamBackbone.forward(net, None, torch.randn(1, 3, 288, 144), 2)
    assert fmap.shape == (1, 2048, 18, 9)


def test_mmgl_state_dict_keys(mmgl50):
    keys = list(mmgl50.state_dict())
    assert all(k.startswith(BACKBONE + HEADS) for k in keys)
    heads = [k for k in keys if k.startswith(HEADS)]
    assert sorted(heads) == sorted(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
                                   + [f"local_conv_list.{i}.{p}" for i in range(6)
                                      for p in ("weight", "bias")])
    # stems hold only what runs; the body only layer1..4
    assert {k.split(".")[2] for k in keys if k.startswith("visible_module.")} == {"conv1", "bn1"}
    assert {k.split(".")[2] for k in keys if k.startswith("base_resnet.")} == \
        {"layer1", "layer2", "layer3", "layer4"}
    assert "base_resnet.base.layer4.0.downsample.1.running_var" in keys
    assert mmgl50.base_resnet.base.layer4[0].conv2.stride == (1, 1)
    assert isinstance(mmgl50.base_resnet.base.layer3, torch.nn.Sequential)
    assert len(mmgl50.backbone_keys()) == len(keys) - len(heads)


def test_one_stream_writes_both_stem_prefixes():
    net = model.MMGLNet("resnet18", "one", proj_dim=8)
    assert net.visible_module.visible is net.thermal_module.thermal
    sd = net.state_dict()
    vis = {k[len("visible_module.visible."):]: v for k, v in sd.items() if k.startswith("visible_module.")}
    th = {k[len("thermal_module.thermal."):]: v for k, v in sd.items() if k.startswith("thermal_module.")}
    assert vis.keys() == th.keys() and len(vis) == 6
    assert all(torch.equal(vis[k], th[k]) for k in vis)
    # parameters are not double counted, and both stems follow one update
    two = model.MMGLNet("resnet18", "two", proj_dim=8)
    n_one = sum(p.numel() for p in net.parameters())
    n_two = sum(p.numel() for p in two.parameters())
    assert n_two - n_one == sum(p.numel() for p in two.thermal_module.parameters())
    # modal 0 runs the shared stem on the joint batch
    x = torch.randn(2, 3, 64, 32)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.stem(x, x + 1), net.visible_module(torch.cat((x, x + 1))))


def test_load_backbone_from_mmgl_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = model.MMGLNet("resnet18", "two", proj_dim=8)
    path = tmp_path / "sysu_two_epoch_1.t"
    torch.save(src.state_dict(), path)
    from checkpoint import load as load_checkpoint
    dst = model.TwoStreamBackbone("resnet18", "two")
    logs = []
    rep = model.load_backbone(dst, checkpoint.network_state(load_checkpoint(path)), log=logs.append, source=str(path))
    n_bb = len(dst.backbone_keys())
    assert len(rep["loaded"]) == n_bb and not rep["missing_backbone"] and not rep["mismatched"]
    assert sorted(rep["dropped_head"]) == sorted(k for k in src.state_dict() if k.startswith(HEADS))
    assert logs[0] == (f"loaded {n_bb}/{n_bb} backbone tensors from {path} "
                       f"(dropped {len(rep['dropped_head'])} pre-training head tensors, skipped 0 unused)")
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in dst.state_dict().items())
    # one-stream checkpoint into a two-stream (AGW-like) network: both stems get it
    one = model.MMGLNet("resnet18", "one", proj_dim=8)
    dst2 = model.TwoStreamBackbone("resnet18", "two")
    model.load_backbone(dst2, {"module." + k: v for k, v in one.state_dict().items()}, log=logs.append)
    assert torch.equal(dst2.thermal_module.thermal.conv1.weight, one.visible_module.visible.conv1.weight)
    assert torch.equal(dst2.visible_module.visible.conv1.weight, one.visible_module.visible.conv1.weight)
    # a checkpoint with only one stem prefix still fully initialises a one-stream network
    only_vis = {k: v for k, v in ref.items() if not k.startswith("thermal_module.")}
    rep = model.load_backbone(model.TwoStreamBackbone("resnet18", "one"), only_vis, log=logs.append)
    assert not rep["missing_backbone"]


def test_load_backbone_rejects_nothing_matching():
    with pytest.raises(UserError, match="matches no backbone key of the resnet18 network"):
        model.load_backbone(model.TwoStreamBackbone("resnet18"), {"foo.weight": torch.zeros(3)},
                            log=lambda s: None)
    # a resnet50 checkpoint into a resnet18 network: names match, shapes do not
    r50 = {k: v for k, v in model.ResNet("resnet50").state_dict().items()}
    authors_like = {"base_resnet.base." + k: v for k, v in r50.items() if k.startswith("layer")}
    with pytest.raises(UserError, match="holds a resnet50 backbone but the network is resnet18"):
        model.load_backbone(model.TwoStreamBackbone("resnet18"), checkpoint.network_state(authors_like), log=lambda s: None)
    with pytest.raises(UserError, match="not a state_dict"):
        model.load_backbone(model.TwoStreamBackbone("resnet18"), checkpoint.network_state({"epoch": 3}), log=lambda s: None)


def test_load_backbone_authors_style_checkpoint():
    """The authors' stems are whole ResNets and their base has conv1/bn1/fc too."""
    torch.manual_seed(1)
    full = model.ResNet("resnet18").state_dict()
    sd = {}
    for prefix in ("visible_module.visible.", "thermal_module.thermal.", "base_resnet.base."):
        sd.update({"module." + prefix + k: v.clone() for k, v in full.items()})
    sd["module.fc1.weight"] = torch.zeros(3)              # pre-training head
    net = model.TwoStreamBackbone("resnet18", "two")
    logs = []
    rep = model.load_backbone(net, checkpoint.network_state(sd), log=logs.append, source="authors.t")
    n_bb = len(net.backbone_keys())
    n_unused = len(sd) - 1 - n_bb
    assert len(rep["skipped_unused"]) == n_unused and not rep["unexpected"]
    assert not rep["missing_backbone"] and rep["dropped_head"] == ["fc1.weight"]
    assert len(logs) == 1 and f"skipped {n_unused} unused" in logs[0]
    assert torch.equal(net.base_resnet.base.layer2[1].conv2.weight, full["layer2.1.conv2.weight"])


def test_load_imagenet(tmp_path):
    torch.manual_seed(2)
    ref = model.ResNet("resnet18").state_dict()                 # torchvision key format
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(ref, path)
    net = model.TwoStreamBackbone("resnet18", "two")
    logs = []
    n = checkpoint.load_imagenet(net, path, log=logs.append)
    assert n == len(ref) - 2 and "loaded" in logs[0]      # fc dropped
    sd = net.state_dict()
    for k, v in sd.items():
        src = k.replace("visible_module.visible.", "").replace("thermal_module.thermal.", "") \
               .replace("base_resnet.base.", "")
        assert torch.equal(v, ref[src]), k
    # a one-stream network, and an old-style file without num_batches_tracked
    old = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    net2 = model.MMGLNet("resnet18", "one", proj_dim=8)
    checkpoint.load_imagenet(net2, tmp_path / "old.pth", log=logs.append)
    assert torch.equal(net2.thermal_module.thermal.bn1.running_mean, ref["bn1.running_mean"])
    # plain ResNet target
    r = model.ResNet("resnet18")
    checkpoint.load_imagenet(r, path, log=logs.append)
    assert torch.equal(r.fc.weight, ref["fc.weight"])


def test_load_imagenet_errors(tmp_path):
    torch.save(model.ResNet("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="resnet18.*looks like resnet50"):
        checkpoint.load_imagenet(model.TwoStreamBackbone("resnet18"), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="not found"):
        checkpoint.load_imagenet(model.TwoStreamBackbone("resnet18"), tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a state_dict"):
        checkpoint.load_imagenet(model.TwoStreamBackbone("resnet18"), tmp_path / "list.pth")


def test_bad_arch_and_stream():
    with pytest.raises(UserError, match="--arch"):
        model.TwoStreamBackbone("resnet99")
    with pytest.raises(UserError, match="--stream"):
        model.MMGLNet("resnet18", "three")
    net = model.TwoStreamBackbone("resnet18")
    with pytest.raises(ValueError):
        net.stem(torch.zeros(1, 3, 32, 16), None, modal=3)


def test_mmgl_training_step_reduces_loss():
    """End to end on a tiny batch: the full MMGL loss backpropagates and SGD lowers it."""
    torch.manual_seed(0)
    K, B = 4, 4
    net = model.MMGLNet("resnet18", "two", num_stripe=K, proj_dim=16, hidden_dim=64).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x_rgb, x_ir = torch.randn(B, 3, 64, 32), torch.randn(B, 3, 64, 32)
    # RGB and IR share the permutation: the joint batch's target is the same K x K twice
    target = loss.perm_matrix(torch.stack([torch.randperm(K) for _ in range(B)])).repeat(2, 1, 1)

    def total_loss():
        out = net(x_rgb, x_ir)
        soft = loss.gumbel_sinkhorn(out["perm_logits"], n_iters=10, n_samples=2,
                                    generator=torch.Generator().manual_seed(0))
        z = out["stripes"]
        return loss.perm_mse_loss(soft, target) + 0.5 * loss.pcc_loss(z[:B], z[B:])

    first = None
    for _ in range(4):
        total = total_loss()
        first = total.item() if first is None else first
        opt.zero_grad()
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
    assert total_loss().item() < first


def test_wrt_stays_finite_where_soft_margin_overflows():
    """Fine-tuning from a pre-trained backbone starts with large feature distances; the
    authors' weights then drop the negative term and torch's SoftMarginLoss overflows to
    inf (seen at step 0 of the quick start). Ours is finite and equal to SoftMarginLoss
    wherever that is finite."""
    torch.manual_seed(0)
    x, t = torch.randn(16, 8), torch.arange(4).repeat_interleave(4)
    wrt = loss.TripletLoss_WRT()
    small, _ = wrt(x, t)
    big, _ = wrt(x * 100, t)
    assert torch.isfinite(big) and big > 100
    dist = torch.cdist(x, x)
    assert torch.isfinite(small) and small > 0 and dist.max() < 15
