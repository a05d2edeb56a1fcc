"""Augmentations: seeding, eval-mode, shape checks, label consistency and the fastai callback in a real training loop."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from audiotl_nb.augment import (AUGMENTATIONS, AugmentCallback, AugmentPipeline, FilterAugment, FrameShift,
                                FreqMixStyle, FrequencyWarp, Mixup, SpecAugment, TimeJitter, WaveformMix,
                                augment_preset, create_augment, partners)
from audiotl_nb.core import UnknownNameError, seed_everything
from audiotl_nb.losses import FrameKDLoss

B, N, T, NF, C = 6, 4000, 50, 32, 3


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    wave = torch.randn(B, N, generator=g)
    spec = 10 * torch.randn(B, 1, T, NF, generator=g) - 30
    frames = (torch.rand(B, T, C, generator=g) > 0.6).float()
    teacher = torch.rand(B, T, C, generator=g)
    return wave, spec, frames, teacher


def _input(name):
    wave, spec, *_ = _batch()
    return wave if AUGMENTATIONS.get(name)().stage == "wave" else spec


ALWAYS = dict(p=1.0)


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_same_seed_same_output_and_seeds_differ(name):
    x = _input(name)
    kw = {} if name == "frame_shift" else ALWAYS
    a = create_augment(name, seed=3, **kw)(x)
    b = create_augment(name, seed=3, **kw)(x)
    c = create_augment(name, seed=4, **kw)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_global_seed_and_explicit_generator(name):
    x = _input(name)
    aug = create_augment(name, **({} if name == "frame_shift" else ALWAYS))
    seed_everything(11); a = aug(x)
    seed_everything(11); b = aug(x)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(aug(x, generator=g1), aug(x, generator=g2))
    # successive calls with an own seed give a new draw each time
    own = create_augment(name, seed=1, **({} if name == "frame_shift" else ALWAYS))
    assert not torch.equal(own(x), own(x))


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_eval_mode_and_p0_leave_input_alone(name):
    x = _input(name)
    wave, spec, frames, teacher = _batch()
    out = create_augment(name, seed=0).eval()(x, frames, teacher)
    assert all(torch.equal(o, r) for o, r in zip(out, (x, frames, teacher)))
    out = create_augment(name, seed=0, p=0.0)(x, frames, teacher)
    assert torch.equal(out[1], frames) and torch.equal(out[2], teacher)
    if name != "waveform_mix":
        assert torch.equal(out[0], x)


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_wrong_stage_is_refused(name):
    wave, spec, *_ = _batch()
    aug = create_augment(name)
    if aug.stage == "wave":
        with pytest.raises(ValueError, match="before the front-end"): aug(spec)
    elif aug.stage == "spec":
        with pytest.raises(ValueError, match="after the front-end"): aug(wave)


def test_targets_must_match_batch():
    wave, spec, frames, _ = _batch()
    with pytest.raises(ValueError, match="do not match a batch"):
        Mixup(p=1.0)(spec, frames[:3])


def test_partners_are_other_clips():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        j = partners(rng, n)
        assert (j != np.arange(n)).all() and ((0 <= j) & (j < n)).all()
    assert partners(rng, 1).tolist() == [0]


def test_mixup_identity_labels_teacher_stay_equal():
    # when the teacher equals the labels, they must still be equal after mixing: same λ, same partner
    wave, spec, frames, _ = _batch()
    for aug, x in [(Mixup(p=1.0, seed=0), spec), (WaveformMix(p=1.0, seed=0), wave),
                   (FrameShift(seed=0), spec), (augment_preset("pretrained_sed", seed=0)["spec"], spec)]:
        _, y, t = aug(x, frames, frames.clone())
        assert torch.equal(y, t)


def test_mixup_of_float64_and_soft_labels_stay_in_range():
    wave, spec, frames, teacher = _batch()
    x, y, t = Mixup(p=1.0, seed=0)(spec.double(), frames, teacher)
    assert x.dtype == torch.float64 and y.min() >= 0 and y.max() <= 1
    lam = Mixup(p=1.0, seed=0)
    lam(spec)
    assert (lam.last["lam"] >= 0.5).all()


def test_mixup_without_dominance_draws_both_sides():
    m = Mixup(alpha=0.5, p=1.0, dominant=False, seed=0)
    m(torch.zeros(2000, 2))
    assert (m.last["lam"] < 0.5).mean() == pytest.approx(0.5, abs=0.05)


def test_frame_shift_wraps_and_keeps_energy():
    _, spec, frames, _ = _batch()
    out, fr = FrameShift(seed=2)(spec, frames)
    assert torch.allclose(out.sum(2), spec.sum(2))          # a roll only reorders frames
    assert torch.equal(fr.sum(1), frames.sum(1))


def test_specaugment_mask_recorded_and_mean_fill():
    _, spec, *_ = _batch()
    aug = SpecAugment(time_mask=10, freq_mask=5, n_freq_masks=2, mask_value="mean", seed=0)
    out = aug(spec)
    mask = aug.last["mask"]
    assert mask.any()
    fill = spec.mean(dim=(-2, -1), keepdim=True).expand_as(spec)
    assert torch.equal(out[mask], fill[mask]) and torch.equal(out[~mask], spec[~mask])


def test_specaugment_works_on_three_dim_features():
    x = torch.randn(4, T, NF)
    out = SpecAugment(time_mask=10, seed=0)(x)
    assert out.shape == x.shape and (out == 0).any()


def test_filter_augment_gain_bounds():
    _, spec, *_ = _batch()
    fa = FilterAugment(p=1.0, seed=0)
    out = fa(spec)
    ratio = (out / spec)[:, 0].mean(1)                      # (B, F) linear factors
    assert ratio.min() >= 10 ** (-6 / 20) - 1e-5 and ratio.max() <= 10 ** (6 / 20) + 1e-5


def test_frequency_warp_per_batch_gate():
    _, spec, *_ = _batch()
    fw = FrequencyWarp(p=0.5, per_batch=True, seed=0)
    for _ in range(5):
        fw(spec)
        assert fw.last["gate"].all() or not fw.last["gate"].any()


def test_freq_mixstyle_preserves_time_structure():
    _, spec, *_ = _batch()
    out = FreqMixStyle(p=1.0, seed=0)(spec)
    # per clip and frequency the map is affine in time: correlation with the input along time is 1
    x, y = spec[0, 0] - spec[0, 0].mean(0), out[0, 0] - out[0, 0].mean(0)
    corr = (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0))
    assert torch.allclose(corr, torch.ones(NF), atol=1e-4)


def test_time_jitter_bounds():
    wave, *_ = _batch()
    tj = TimeJitter(max_shift=10, seed=0)
    out = tj(wave)
    for i, s in enumerate(tj.last["shift"]):
        assert abs(s) <= 10
        assert torch.equal(torch.roll(out[i], -int(s))[20:-20], wave[i][20:-20])


def test_presets_and_names():
    for name in ("pretrained_sed", "conformer_ssl"):
        pre = augment_preset(name, seed=0)
        assert pre["wave"].stage == "wave" and pre["spec"].stage == "spec"
    with pytest.raises(UnknownNameError):
        augment_preset("nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_draws_on_gpu():
    wave, spec, frames, _ = _batch()
    for name in AUGMENTATIONS.names():
        x = wave if create_augment(name).stage == "wave" else spec
        kw = {} if name == "frame_shift" else ALWAYS
        a = create_augment(name, seed=0, **kw)(x, frames)
        b = create_augment(name, seed=0, **kw)(x.cuda(), frames.cuda())
        for u, v in zip(a, b): torch.testing.assert_close(u, v.cpu(), rtol=1e-4, atol=1e-3)


def test_callback_in_training_loop_with_teacher():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset

    _, spec, frames, _ = _batch()
    ds = TensorDataset(spec, frames, frames.clone())          # teacher probabilities = labels
    ds.n_inp = 1
    dls = DataLoaders(DataLoader(ds, bs=3, shuffle=True), DataLoader(ds, bs=3))

    class Net(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(NF, C)
        def forward(self, x): return self.lin(x[:, 0])

    seen = []
    kd = FrameKDLoss(0.9, teacher_logits=False)
    def loss(pred, y, t):
        seen.append((torch.is_grad_enabled(), y.detach().clone(), t.detach().clone()))
        return kd(pred, y, t)

    cb = AugmentCallback(FrameShift(), Mixup(p=1.0), FreqMixStyle(p=1.0), seed=0)
    learn = Learner(dls, Net(), loss_func=loss, cbs=cb)
    with learn.no_logging(): learn.fit(2, 1e-2)
    train = [s for s in seen if s[0]]
    valid = [s for s in seen if not s[0]]
    assert len(train) == 4 and len(valid) == 4
    assert all(torch.equal(y, t) for _, y, t in train)          # labels and teacher mixed and shifted alike
    assert any(((y > 0) & (y < 1)).any() for _, y, _ in train)  # they were mixed
    assert all(set(y.unique().tolist()) <= {0.0, 1.0} for _, y, _ in valid)
    assert repr(cb) == "AugmentCallback(FrameShift, Mixup, FreqMixStyle)"


def test_pipeline_rejects_mixed_stages():
    with pytest.raises(ValueError, match="front-end"):
        AugmentPipeline(WaveformMix(), FilterAugment())


def test_show_augment_draws_specs_waves_and_labels():
    import matplotlib
    matplotlib.use("Agg")
    from audiotl_nb.augment import show_augment
    wave, spec, frames, _ = _batch()
    out, fr = FrameShift(seed=0)(spec, frames)
    fig = show_augment(spec, out, frames, fr, n=2, title="frame shift")
    assert len(fig.axes) == 8
    mel = lambda w: w.unfold(-1, 160, 80).abs().log1p()[:, None, :, :NF]     # a stand-in front-end (B, 1, T, F)
    fig = show_augment(wave, TimeJitter(seed=0)(wave), frontend=mel, n=1)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="frontend"):
        show_augment(wave, wave)
