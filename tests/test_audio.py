"""Audio I/O and front-ends against their references (librosa, torchaudio, scipy), with real files on disk."""
import json
import math

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from scipy.signal import resample_poly

from audiotl_nb.audio import (FRONTENDS, KaldiFbankFrontend, LogMelFrontend, Normalizer, create_frontend,
                              feature_spec, feature_stats, load_audio, normalize_star, save_audio, audio_info)
from audiotl_nb.core import ConfigError, DataError, UnknownNameError


def _signal(sr, seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    y = 0.3 * np.sin(2 * np.pi * (150 + 400 * t) * t) + 0.1 * np.sin(2 * np.pi * 3000 * t) + 0.05 * rng.standard_normal(t.size)
    return y.astype(np.float32)


def _librosa_db(y, sr, n_fft, hop, win, n_mels, fmin, fmax, pad_mode="reflect"):
    S = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=n_fft, hop_length=hop, win_length=win, window="hann",
                                       center=True, pad_mode=pad_mode, power=2.0, n_mels=n_mels, fmin=fmin,
                                       fmax=fmax, htk=False, norm="slaney")
    return librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=None).T


# --- front-ends against librosa -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panns16k_equals_librosa_10s(seed):
    y = _signal(16000, 10.0, seed)
    out = create_frontend("panns16k")(torch.from_numpy(y))
    assert out.shape == (1, 1, 1001, 64)
    ref = _librosa_db(y, 16000, 512, 160, 512, 64, 50, 8000)
    assert np.abs(out[0, 0].numpy() - ref).max() <= 1e-3


def test_panns32k_equals_librosa():
    y = _signal(32000, 3.0)
    ref = _librosa_db(y, 32000, 1024, 320, 1024, 64, 50, 14000)
    out = create_frontend("panns32k")(torch.from_numpy(y))[0, 0].numpy()
    assert np.abs(out - ref).max() <= 1e-3


def test_w2v_conformer_equals_librosa():
    y = _signal(16000, 3.0)
    ref = _librosa_db(y, 16000, 1024, 320, 1024, 64, 0, 8000)
    assert np.abs(create_frontend("w2v_conformer")(torch.from_numpy(y))[0, 0].numpy() - ref).max() <= 1e-3


def test_atdr_equals_librosa_and_its_frame_count():
    y = _signal(16000, 10.0)
    y0 = y - y.mean()  # the preset removes each clip's mean, as paper 4's code does
    ref = _librosa_db(y0, 16000, 4096, 400, 1024, 64, 0, 8000, pad_mode="constant")  # centred, zero padding
    assert ref.shape == (401, 64)
    out = create_frontend("atdr64x400")(torch.from_numpy(y))
    assert out.shape == (1, 1, 400, 64)  # cut to 400 frames as the paper's 64x400
    assert np.abs(out[0, 0].numpy() - ref[:400]).max() <= 1e-3
    short = create_frontend("atdr64x400")(torch.from_numpy(y[:16000 * 5]))
    assert short.shape[2] == 400 and bool((short[0, 0, 201:] == 0).all())  # zero-padded like the paper's target_length


def test_ast_fbank128_equals_kaldi_fbank_batched():
    ys = torch.from_numpy(np.stack([_signal(16000, 4.0, s) for s in range(3)]))
    out = create_frontend("ast_fbank128")(ys)
    assert out.shape == (3, 1, 398, 128)
    for i, w in enumerate(ys):
        ref = torchaudio.compliance.kaldi.fbank((w - w.mean())[None], htk_compat=True, sample_frequency=16000,
                                                use_energy=False, window_type="hanning", num_mel_bins=128,
                                                dither=0.0, frame_shift=10)
        torch.testing.assert_close(out[i, 0], ref, atol=1e-3, rtol=0)  # the batched mean rounds differently


@pytest.mark.parametrize("name", FRONTENDS.names())
def test_batched_equals_one_by_one(name):
    fe = create_frontend(name)
    x = torch.randn(3, fe.sample_rate) * 0.1
    batched = fe(x)
    single = torch.cat([fe(xi) for xi in x])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert fe(x[:, None]).shape == batched.shape  # (B, 1, N) input too


def _stft_logmel(fe, x):
    "The textbook pipeline on one tensor: torch.stft, |X|^2 (or |X|), the filter bank, amplitude_to_DB."
    c = fe.cfg
    X = torch.stft(x, c.n_fft, c.hop_length, c.win_length, window=fe.window, center=c.center, pad_mode=c.pad_mode,
                   onesided=True, return_complex=True)
    S = X.abs() if c.power == 1.0 else X.abs().pow(2)
    M = torch.matmul(S.transpose(1, 2), fe.fb)
    mult = 10.0 if c.power == 2.0 else 20.0
    return torchaudio.functional.amplitude_to_DB(M[:, None], mult, c.amin, math.log10(max(c.amin, c.ref)), c.top_db)[:, 0]


@pytest.mark.parametrize("kw", [dict(name="panns16k"), dict(name="panns32k"), dict(name="atdr64x400", n_frames=None),
                                dict(name="w2v_conformer"), dict(name="panns16k", power=1.0, amin=1e-5),
                                dict(name="panns16k", top_db=60.0), dict(name="panns16k", ref=3.0),
                                dict(name="panns16k", mel_scale="htk", mel_norm=None, f_min=0.0),
                                dict(name="panns16k", center=False), dict(name="panns16k", pad_mode="constant"),
                                dict(name="panns16k", pad_mode="replicate"), dict(name="panns16k", pad_mode="circular"),
                                dict(name="panns16k", win_length=400, window="hamming"),
                                dict(name="panns16k", hop_length=400, n_mels=40)])
def test_logmel_equals_torch_stft_pipeline(kw):
    "The CPU path (edge-only padding, pieces, banded filter bank on re², im²) equals the plain torch.stft pipeline."
    fe = create_frontend(kw["name"], **{k: v for k, v in kw.items() if k != "name"}, remove_mean=False)
    g = torch.Generator().manual_seed(0)
    for n in (fe.cfg.n_fft, 1000, fe.sample_rate * 2 + 37):  # one frame's worth, short, and a few seconds
        n = max(n, fe._min_samples())
        x = 0.3 * torch.randn(3, n, generator=g)
        ref = _stft_logmel(fe, x)
        out = fe(x)[:, 0]
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_logmel_large_batch_in_pieces_and_gradients():
    "A batch larger than one CPU piece gives each clip's own features; with gradients the same numbers come out."
    fe = create_frontend("panns16k")
    x = torch.from_numpy(np.stack([_signal(16000, 10.0, s) for s in range(5)]))
    out = fe(x)
    for i in (0, 4):
        ref = _librosa_db(x[i].numpy(), 16000, 512, 160, 512, 64, 50, 8000)
        assert np.abs(out[i, 0].numpy() - ref).max() <= 1e-3
    xg = x[:2, :16000].clone().requires_grad_(True)
    y = fe(xg)
    y.sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all()) and float(xg.grad.abs().sum()) > 0
    torch.testing.assert_close(y.detach(), fe(x[:2, :16000]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FRONTENDS.names())
def test_config_round_trip_json(name):
    fe = create_frontend(name).with_normalization({"mean": -30.0, "std": 12.0}, scale=2.0)
    cfg = json.loads(json.dumps(fe.config))
    assert cfg["name"] == name and cfg["sample_rate"] == fe.sample_rate
    clone = create_frontend(cfg)
    assert clone.config == fe.config and type(clone) is type(fe)
    x = torch.randn(fe.sample_rate) * 0.1
    assert torch.equal(clone(x), fe(x))
    assert feature_spec(clone) == feature_spec(create_frontend(name))


def test_create_frontend_errors_and_overrides():
    with pytest.raises(UnknownNameError, match="panns16k"):
        create_frontend("pans16k")
    with pytest.raises(ConfigError, match="Allowed keys"):
        create_frontend("panns16k", nmels=32)
    with pytest.raises(ConfigError, match="win_length"):
        create_frontend("panns16k", win_length=1024)
    with pytest.raises(ConfigError, match="empty"):
        create_frontend("panns16k", n_mels=256)  # more mels than FFT bins can fill
    with pytest.raises(ConfigError, match="type"):
        create_frontend({"name": "x", "type": "kaldi_fbank", "hop_length": 3})
    fe = create_frontend("panns16k", n_mels=128, f_max=7000.0)
    assert (fe.n_mels, fe.cfg.f_max, fe.name) == (128, 7000.0, "panns16k")
    assert isinstance(create_frontend(fe), LogMelFrontend) and isinstance(create_frontend("ast_fbank128"), KaldiFbankFrontend)


def test_frame_rate_and_num_frames():
    fe = create_frontend("panns16k")
    assert fe.hop_seconds == 0.01 and fe.frame_rate == 100.0
    assert fe.num_frames(160000) == 1001
    assert create_frontend("ast_fbank128").num_frames(160000) == 998
    assert create_frontend("w2v_conformer").num_frames(160000) == 501


def test_silence_and_tiny_clips_are_finite():
    for name in FRONTENDS:
        fe = create_frontend(name)
        for n in (1, 10, fe.sample_rate):
            out = fe(torch.zeros(n))
            assert torch.isfinite(out).all() and out.shape[2] == fe.num_frames(n)


def test_model_state_dict_has_no_frontend_buffers():
    model = torch.nn.Sequential(create_frontend("panns16k"), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(2, 1600))
    assert all(not k.startswith("0.") for k in model.state_dict())


# --- normalisation -------------------------------------------------------------------------------

def test_feature_stats_matches_numpy_and_normalize_star():
    rng = np.random.default_rng(0)
    chunks = [torch.from_numpy(rng.normal(-40 + i, 5 + i, size=(1, 1, 50 + 10 * i, 8)).astype(np.float32)) for i in range(4)]
    allf = np.concatenate([c.reshape(-1, 8).numpy().astype(np.float64) for c in chunks])
    st = feature_stats(chunks)
    assert math.isclose(st["mean"], allf.mean(), rel_tol=1e-12) and math.isclose(st["std"], allf.std(), rel_tol=1e-12)
    assert st["count"] == allf.size
    pb = feature_stats([(c, 1) for c in chunks], per_bin=True)
    np.testing.assert_allclose(pb["mean"], allf.mean(0), rtol=1e-12)
    np.testing.assert_allclose(pb["std"], allf.std(0), rtol=1e-12)
    z = torch.cat([normalize_star(st)(c).reshape(-1) for c in chunks]).double()
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.var(unbiased=False)) - 0.25) < 1e-5
    assert Normalizer(1.0, 2.0, 2.0).config == {"mean": 1.0, "std": 2.0, "scale": 2.0}
    with pytest.raises(ValueError):
        feature_stats([])
    with pytest.raises(ConfigError):
        create_frontend("panns16k", norm_mean=[0.0] * 3, norm_std=[1.0] * 3)


# --- files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext,subtype,tol", [(".wav", "PCM_16", 1e-4), (".wav", "PCM_24", 1e-6), (".wav", "FLOAT", 0),
                                             (".flac", "PCM_16", 1e-4), (".ogg", "VORBIS", 0.2)])  # Vorbis is lossy
def test_formats_round_trip(tmp_path, ext, subtype, tol):
    x = np.stack([_signal(16000, 1.0, 0), _signal(16000, 1.0, 1)]) * 0.5
    p = save_audio(tmp_path / f"a{ext}", torch.from_numpy(x), 16000, subtype=subtype)
    assert audio_info(p)["channels"] == 2 and audio_info(p)["subtype"] == subtype
    y, sr = load_audio(p)
    assert sr == 16000 and y.dtype == torch.float32 and y.shape == (16000,)
    assert np.abs(y.numpy() - x.mean(0)).max() <= tol + 1e-7
    y2, _ = load_audio(p, mono=False)
    assert y2.shape == (2, 16000)


def test_segment_and_offset_past_end(tmp_path):
    x = _signal(8000, 2.0)
    p = save_audio(tmp_path / "a.wav", x, 8000, subtype="FLOAT")
    seg, _ = load_audio(p, offset=0.5, duration=1.0)
    np.testing.assert_array_equal(seg.numpy(), x[4000:12000])
    tail, _ = load_audio(p, offset=1.5)
    np.testing.assert_array_equal(tail.numpy(), x[12000:])
    past, _ = load_audio(p, offset=5.0)
    assert past.shape == (0,)


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
def test_resampling_matches_polyphase_reference(tmp_path, orig):
    t = np.arange(orig * 2) / orig
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)
    p = save_audio(tmp_path / "a.wav", x, orig, subtype="FLOAT")
    y, sr = load_audio(p, sr=16000)
    assert sr == 16000 and y.shape == (32000,)
    g = math.gcd(orig, 16000)
    ref = resample_poly(x.astype(np.float64), 16000 // g, orig // g)
    mid = slice(1000, 31000)  # away from the edges, where the two filters treat the boundary differently
    assert np.abs(y.numpy()[mid] - ref[mid]).max() < 2e-3
    torch.testing.assert_close(y, torchaudio.functional.resample(torch.from_numpy(x), orig, 16000))


def test_broken_files_raise_data_error_naming_the_file(tmp_path):
    x = _signal(16000, 1.0)
    good = {ext: save_audio(tmp_path / f"ok{ext}", x, 16000).read_bytes() for ext in (".wav", ".flac", ".ogg")}
    cases = {"cut.wav": good[".wav"][: len(good[".wav"]) // 2], "cut.flac": good[".flac"][: len(good[".flac"]) // 2],
             "cut.ogg": good[".ogg"][: len(good[".ogg"]) // 2], "cut_tail.ogg": good[".ogg"][:-20],
             "junk.wav": np.random.default_rng(0).bytes(4096), "zero.flac": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    nan = x.copy(); nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    for name in list(cases) + ["nan.wav", "missing.wav"]:
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            load_audio(tmp_path / name)
    for ext in good:  # the intact originals still load
        assert load_audio(tmp_path / f"ok{ext}")[0].shape == (16000,)


def test_zero_length_file_returns_empty(tmp_path):
    p = save_audio(tmp_path / "e.wav", np.zeros((2, 0)), 16000)
    y, sr = load_audio(p, sr=8000)
    assert y.shape == (0,) and sr == 8000
    with pytest.raises(DataError, match="empty waveform"):
        create_frontend("panns16k")(y)


def test_save_audio_is_atomic_on_failure(tmp_path):
    p = save_audio(tmp_path / "a.wav", np.zeros(100), 16000)
    before = p.read_bytes()
    with pytest.raises(Exception):
        save_audio(p, np.zeros(100), 16000, subtype="NOT_A_SUBTYPE")
    assert p.read_bytes() == before and sorted(q.name for q in tmp_path.iterdir()) == ["a.wav"]
