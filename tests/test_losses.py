"""Losses checked against reference implementations and hand computations on random inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch.distributions import Bernoulli, kl_divergence

from audiotl_nb.core import ConfigError, UnknownNameError
from audiotl_nb.losses import (LOSSES, BalancedCE, BCEWithLogits, ConsistencyLoss, FrameKDLoss, SupConLoss,
                               Wav2Vec2ContrastiveLoss, balanced_weights, create_loss, flatten_views,
                               multi_similarity_miner, sample_distractors)


def _lout_loops(z, y, tau):
    "Khosla et al.'s L_out with explicit loops over anchors and positives (no base-temperature factor)."
    z = F.normalize(z.double(), dim=-1)
    n, per_anchor = len(y), []
    for i in range(n):
        P = [p for p in range(n) if p != i and y[p] == y[i]]
        if not P: continue
        den = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        per_anchor.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / den) for p in P) / len(P))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_matches_loops_and_pml(seed, tau):
    g = torch.Generator().manual_seed(seed)
    f, y = torch.randn(10, 2, 16, generator=g), torch.randint(0, 4, (10,), generator=g)
    ours = SupConLoss(tau)(f, y).item()
    z, yy = flatten_views(f, y)
    assert ours == pytest.approx(_lout_loops(z, yy, tau), rel=1e-5)
    assert ours == pytest.approx(pml_losses.SupConLoss(tau)(F.normalize(z, dim=-1), yy).item(), rel=1e-6)


def test_supcon_has_no_base_temperature_factor():
    # SupContrast's reference code multiplies by tau/0.07; the paper's plain L_out does not
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(12, 8, generator=g), torch.arange(12) % 3
    assert SupConLoss(0.1)(f, y).item() == pytest.approx(_lout_loops(f, y, 0.1), rel=1e-5)
    assert SupConLoss(0.1)(f, y).item() != pytest.approx(0.1 / 0.07 * _lout_loops(f, y, 0.1), rel=1e-3)


def test_supcon_gradients_and_mining():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(16, 2, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (16,), generator=g)
    loss = SupConLoss(0.1, miner="multi_similarity")(f, y)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    # a custom miner object is accepted as is
    assert SupConLoss(0.1, miner=multi_similarity_miner(0.2)).miner.epsilon == 0.2
    with pytest.raises(UnknownNameError):
        SupConLoss(miner="triplet")


def test_supcon_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, D\) or \(B, V, D\)"):
        SupConLoss()(torch.randn(2, 3, 4, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="labels must have shape"):
        SupConLoss()(torch.randn(4, 2, 5), torch.zeros(3))


def _w2v_loops(c, z, b, t, negs, tau):
    out = []
    for i in range(len(b)):
        ci = c[b[i], t[i]]
        sims = [F.cosine_similarity(ci, z[b[i], t[i]], dim=0)] + [F.cosine_similarity(ci, z[b[i], d], dim=0) for d in negs[i]]
        sims = torch.stack(sims) / tau
        out.append(-(sims[0] - torch.logsumexp(sims, 0)))
    return torch.stack(out).mean()


def test_wav2vec2_matches_loops():
    g = torch.Generator().manual_seed(0)
    c, z = torch.randn(2, 30, 6, generator=g), torch.randn(2, 30, 6, generator=g)
    mask = torch.rand(2, 30, generator=g) < 0.3
    loss = Wav2Vec2ContrastiveLoss(n_distractors=10, temperature=0.1)
    b, t, negs = sample_distractors(mask, 10, torch.Generator().manual_seed(7))
    ours = loss(c, z, mask, generator=torch.Generator().manual_seed(7))
    assert ours.item() == pytest.approx(_w2v_loops(c, z, b, t, negs, 0.1).item(), rel=1e-5)
    logits = loss.logits(c, z, mask, generator=torch.Generator().manual_seed(7))
    assert logits.shape == (int(mask.sum()), 11)


def test_wav2vec2_seeded_module_is_reproducible():
    g = torch.Generator().manual_seed(0)
    c, z = torch.randn(2, 40, 4, generator=g), torch.randn(2, 40, 4, generator=g)
    mask = torch.rand(2, 40, generator=g) < 0.3
    a, b = Wav2Vec2ContrastiveLoss(seed=3), Wav2Vec2ContrastiveLoss(seed=3)
    assert a(c, z, mask).item() == b(c, z, mask).item()
    assert a(c, z, mask).item() == b(c, z, mask).item()  # the sequences advance together
    other = Wav2Vec2ContrastiveLoss(seed=4)(c, z, mask).item()
    assert other != a(c, z, mask).item()


def test_wav2vec2_clip_without_masked_steps_is_skipped():
    c = torch.randn(2, 10, 4)
    mask = torch.zeros(2, 10, dtype=torch.bool); mask[1, :4] = True
    b, t, negs = sample_distractors(mask, 5, torch.Generator().manual_seed(0))
    assert (b == 1).all() and len(t) == 4
    assert torch.isfinite(Wav2Vec2ContrastiveLoss(5)(c, c, mask))


def test_balanced_ce_on_random_imbalanced_data():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 500, size=7)
    p, t = torch.randn(200, 7), torch.as_tensor(rng.integers(0, 7, 200))
    ref = torch.nn.CrossEntropyLoss(weight=torch.tensor(1.0 / counts, dtype=torch.float32))(p, t)
    for norm in (True, False):
        assert BalancedCE(counts, normalize=norm)(p, t).item() == pytest.approx(ref.item(), rel=1e-5)
    # any rescaling of the weights leaves the mean unchanged
    w = torch.tensor(1.0 / counts, dtype=torch.float32)
    assert F.cross_entropy(p, t, weight=123 * w).item() == pytest.approx(ref.item(), rel=1e-5)
    assert balanced_weights(counts).sum().item() == pytest.approx(7.0, rel=1e-6)


def test_balanced_ce_errors():
    with pytest.raises(ConfigError, match="classes \\[0, 2\\]"):
        BalancedCE([0, 3, 0])
    with pytest.raises(ConfigError, match="n_classes=2"):
        BalancedCE.from_targets([0, 1, 2], 2)


def test_balanced_ce_moves_with_module():
    crit = BalancedCE([1, 2, 3]).double()
    assert crit.weight.dtype == torch.float64
    assert "weight" in crit.state_dict()


def test_consistency_matches_distributions_on_frames():
    g = torch.Generator().manual_seed(0)
    a, b = 2 * torch.randn(3, 7, 4, generator=g), 2 * torch.randn(3, 7, 4, generator=g)  # torch.distributions overflows to inf on saturated logits
    ref = kl_divergence(Bernoulli(logits=a), Bernoulli(logits=b)) + kl_divergence(Bernoulli(logits=b), Bernoulli(logits=a))
    assert ConsistencyLoss()(a, b).item() == pytest.approx(2 * ref.mean().item(), rel=1e-5)
    assert ConsistencyLoss(weight=1.0, reduction="sum")(a, b).item() == pytest.approx(ref.sum().item(), rel=1e-5)
    assert ConsistencyLoss(reduction="none")(a, b).shape == a.shape


def test_consistency_gradient_reaches_both_views():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    ConsistencyLoss()(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_frame_kd_on_random_frames():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 25, 6, generator=g), torch.randn(4, 25, 6, generator=g)
    y = (torch.rand(4, 25, 6, generator=g) > 0.8).float()
    p = torch.sigmoid(s).double()
    bce = lambda q: -(q * torch.log(p) + (1 - q) * torch.log(1 - p)).mean()
    ref = 0.9 * bce(torch.sigmoid(t).double()) + 0.1 * bce(y.double())
    assert FrameKDLoss()(s, y, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_bce_thin_wrapper():
    s, y = torch.randn(5, 3), torch.randint(0, 2, (5, 3))
    assert BCEWithLogits()(s, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(s, y.float()).item())
    assert BCEWithLogits().decodes(torch.tensor([0.2, 0.7])).tolist() == [False, True]


def test_registry():
    assert set(LOSSES.names()) == {"bce", "balanced_ce", "supcon", "wav2vec2", "consistency", "frame_kd"}
    with pytest.raises(UnknownNameError, match="Valid loss names"):
        create_loss("supcontrast")
    assert create_loss("frame_kd", lam=0.5).lam == 0.5


def test_supcon_degenerate_batches_follow_pml():
    # documented PML behaviour: no negative pair (one class) or no positive pair (all distinct) → 0
    f = torch.randn(6, 8)
    assert SupConLoss()(f, torch.zeros(6, dtype=torch.long)).item() == 0.0
    assert SupConLoss()(f, torch.arange(6)).item() == 0.0
    # anchors without a positive are left out of the mean (L_out is undefined for them)
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    assert SupConLoss()(f, y).item() == pytest.approx(_lout_loops(f, y, 0.1), rel=1e-5)
