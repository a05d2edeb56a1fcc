"""Models: registry, heads, checkpoints, PANNs CNNs (against an independent forward pass), ResNet-50, SED wrapper."""
import math
import pickle

import librosa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from audiotl_nb.audio import create_frontend
from audiotl_nb.core import CheckpointError, ConfigError, UnknownNameError
from audiotl_nb.models.cnn import (PANNS_FRONTENDS, Cnn10, Cnn14, check_panns_extractor, panns_extractor_state)
from audiotl_nb.models.core import (count_params, create_model, freeze_backbone, list_models, load_checkpoint,
                                    model_from_checkpoint, param_groups_lrd, pool_frame_logits, replace_head,
                                    save_checkpoint)
from audiotl_nb.models.sed import resample_frames


# ---------------------------------------------------------------- an independent PANNs forward pass
# Written from the published description (FACTS.md, paper 1): bn0 over mel bins, conv blocks of two
# 3x3 convs without bias + BN + ReLU and 2x2 average pooling, mean over frequency, max + mean over
# time, fc1 + ReLU, output layer; torchlibrosa's extractor: reflect-padded conv STFT, power, mel
# matrix, 10 log10(max(x, 1e-10)). Functional ops only, reading a PANNs-layout state dict.

def _bn(x, s, p):
    return F.batch_norm(x, s[p + ".running_mean"], s[p + ".running_var"], s[p + ".weight"], s[p + ".bias"], False, 0.0, 1e-5)

def panns_reference(s, x, n_blocks, wav_cfg=None):
    "Clip probabilities and embedding of a PANNs CNN with state dict `s` on log-mel (or waveform with `wav_cfg`)."
    if wav_cfg is not None:  # the extractor inside PANNs' model
        n_fft, hop = s["spectrogram_extractor.stft.conv_real.weight"].shape[-1], wav_cfg["hop_length"]
        w = F.pad(x[:, None], (n_fft // 2, n_fft // 2), mode="reflect")
        re = F.conv1d(w, s["spectrogram_extractor.stft.conv_real.weight"], stride=hop)
        im = F.conv1d(w, s["spectrogram_extractor.stft.conv_imag.weight"], stride=hop)
        power = (re ** 2 + im ** 2).transpose(1, 2)                       # (B, T, n_fft/2+1)
        x = 10 * torch.log10(torch.clamp(power @ s["logmel_extractor.melW"], min=1e-10))[:, None]
    x = _bn(x.transpose(1, 3), s, "bn0").transpose(1, 3)
    for i in range(1, n_blocks + 1):
        for j in (1, 2):
            x = F.relu(_bn(F.conv2d(x, s[f"conv_block{i}.conv{j}.weight"], padding=1), s, f"conv_block{i}.bn{j}"))
        if not (n_blocks == 6 and i == 6): x = F.avg_pool2d(x, 2)
    x = x.mean(3)
    x = x.max(2).values + x.mean(2)
    emb = F.relu(F.linear(x, s["fc1.weight"], s["fc1.bias"]))
    return torch.sigmoid(F.linear(emb, s["fc_audioset.weight"], s["fc_audioset.bias"])), emb


def _randomise(model):
    "Random weights and batch-norm statistics, so that every term of the forward pass matters."
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point and not name.startswith("frontend"):
                if name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * (0.5 if t.dim() == 1 else 1.0 / math.sqrt(t[0].numel())))
    return model.eval()


def _panns_state(model, frontend="panns16k"):
    return {**panns_extractor_state(frontend), **model.state_dict()}


@pytest.mark.parametrize("cls,blocks,width", [(Cnn10, 4, 0.25), (Cnn14, 6, 0.125)])
def test_panns_outputs_equal_reference(cls, blocks, width, tmp_path):
    src = _randomise(cls(n_classes=527, width=width))
    state = _panns_state(src)
    torch.save({"model": state, "iteration": 1}, tmp_path / "panns.pth")
    model = cls.from_pretrained(tmp_path / "panns.pth").eval()
    x = torch.randn(2, 1, 160, 64) * 10 - 40
    ref_prob, ref_emb = panns_reference(state, x, blocks)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(x)), ref_prob, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.embed(x), ref_emb, atol=1e-5, rtol=1e-5)


def test_panns_waveform_path_matches_reference(tmp_path):
    "With the panns16k front-end the model on waveforms matches PANNs' conv-STFT extractor + network."
    src = _randomise(Cnn10(n_classes=10, width=0.25))
    state = _panns_state(src)
    torch.save({"model": state}, tmp_path / "panns.pth")
    model = Cnn10.from_pretrained(tmp_path / "panns.pth", frontend="panns16k").eval()
    wav = torch.randn(2, 16000) * 0.1
    ref_prob, ref_emb = panns_reference(state, wav, 4, wav_cfg=PANNS_FRONTENDS["panns16k"])
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(wav)), ref_prob, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.embed(wav), ref_emb, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- extractor weights vs librosa / numpy

@pytest.mark.parametrize("preset", ["panns16k", "panns32k"])
def test_extractor_state_matches_librosa(preset):
    cfg = create_frontend(preset).config
    ext = panns_extractor_state(preset)
    mel = librosa.filters.mel(sr=cfg["sample_rate"], n_fft=cfg["n_fft"], n_mels=cfg["n_mels"], fmin=cfg["f_min"], fmax=cfg["f_max"]).T
    np.testing.assert_allclose(ext["logmel_extractor.melW"].numpy(), mel, atol=1e-6)
    n = cfg["n_fft"]
    window = librosa.filters.get_window("hann", n, fftbins=True)
    dft = np.fft.rfft(np.diag(window), axis=0)  # row k: DFT of the windowed unit impulses
    np.testing.assert_allclose(ext["spectrogram_extractor.stft.conv_real.weight"][:, 0].numpy(), dft.real, atol=1e-5)
    np.testing.assert_allclose(ext["spectrogram_extractor.stft.conv_imag.weight"][:, 0].numpy(), dft.imag, atol=1e-5)


def test_extractor_mismatch_names_both(tmp_path):
    state = _panns_state(Cnn10(n_classes=3, width=0.25), "panns32k")
    torch.save({"model": state}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError) as e:
        Cnn10.from_pretrained(tmp_path / "c.pth", frontend="panns16k")
    assert "panns32k" in str(e.value) and "'name': 'panns16k'" in str(e.value)
    assert Cnn10.from_pretrained(tmp_path / "c.pth", frontend="panns32k").frontend.sample_rate == 32000
    with pytest.raises(CheckpointError, match="n_fft"):  # a front-end unlike any PANNs one
        check_panns_extractor(state, create_frontend("panns16k", n_fft=2048, win_length=2048))
    with pytest.raises(CheckpointError, match="type"):
        check_panns_extractor(state, "ast_fbank128")


# ---------------------------------------------------------------- checkpoint layouts

@pytest.mark.parametrize("cls", [Cnn10, Cnn14])
def test_both_checkpoint_layouts(cls, tmp_path):
    src = _randomise(cls(n_classes=7, width=0.125))
    state = src.state_dict()
    panns = {"model": {**panns_extractor_state("panns16k"), **state}, "iteration": 5}
    autrainer = {k.replace("fc_audioset.", "out."): v for k, v in state.items()}
    assert "out.weight" in autrainer and not any(k.startswith("fc_audioset") for k in autrainer)
    ddp = {"module." + k: v for k, v in autrainer.items()}
    torch.save(panns, tmp_path / "panns.pth"); torch.save(autrainer, tmp_path / "model.pt"); torch.save(ddp, tmp_path / "ddp.pt")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        want = src(x)
        for f in ("panns.pth", "model.pt", "ddp.pt"):
            m = cls.from_pretrained(tmp_path / f).eval()
            assert m.config["width"] == 0.125 and m.head.out_features == 7
            torch.testing.assert_close(m(x), want, atol=1e-6, rtol=0)
        m = cls.from_pretrained(autrainer, n_classes=3).eval()  # a state dict directly, new head
        assert m(x).shape == (2, 3)
        torch.testing.assert_close(m.embed(x), src.embed(x), atol=1e-6, rtol=0)


def test_from_pretrained_refuses_code_and_wrong_models(tmp_path):
    class Payload:
        def __reduce__(self): return (print, ("code ran",))
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="run code"):
        Cnn10.from_pretrained(tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="conv_block1"):
        Cnn10.from_pretrained({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="does not fit"):  # Cnn14 weights are not a Cnn10
        Cnn10.from_pretrained(Cnn14(n_classes=2, width=0.125).state_dict())
    with pytest.raises(CheckpointError, match="does not exist"):
        Cnn10.from_pretrained(tmp_path / "missing.pth")


# ---------------------------------------------------------------- every model: shapes, backward, round trip

MODELS = {
    "cnn10": (dict(width=0.125), (2, 1, 64, 64), 4),
    "cnn14": (dict(width=0.0625), (2, 1, 64, 64), 2),
    "resnet50": (dict(layers=[1, 1, 1, 1]), (2, 1, 64, 32), 2),
    "sed": (dict(backbone="cnn10", backbone_kw={"width": 0.125}, rnn_hidden=8), (2, 1, 100, 64), 25),
}

@pytest.mark.parametrize("name", list(MODELS))
def test_model_contract(name, tmp_path):
    kw, shape, t_out = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, n_classes=5, **kw)
    x = torch.randn(*shape)
    out = model(x)
    assert out.shape == (2, 5)
    emb, frames = model.embed(x), model.frames(x)
    assert emb.shape[0] == 2 and emb.dim() == 2
    assert frames.shape[:2] == (2, t_out) and frames.shape[2] == emb.shape[1]
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # state-dict round trip through a checkpoint
    p = save_checkpoint(tmp_path / "m.pt", model, labels=list("abcde"))
    again = model_from_checkpoint(p)
    assert again.config == model.config and again.labels == list("abcde")
    model.eval(); again.eval()
    with torch.no_grad(): torch.testing.assert_close(again(x), model(x))
    again2 = create_model(name, n_classes=5, **kw)
    again2.load_state_dict(model.state_dict())
    with torch.no_grad(): torch.testing.assert_close(again2.eval()(x), model(x))


def test_registry_and_unknown_names():
    names = list_models()
    for n in ("cnn10", "cnn14", "resnet50", "sed"): assert n in names
    with pytest.raises(UnknownNameError) as e: create_model("cnn12", 3)
    assert "cnn10" in str(e.value) and "resnet50" in str(e.value)
    with pytest.raises(UnknownNameError, match="frame pooling"):
        create_model("sed", 3, backbone="cnn10", backbone_kw={"width": 0.125}, pooling="median")


def test_waveform_models_and_checkpoint_frontend(tmp_path):
    fe = create_frontend("panns16k")
    for name, kw in (("cnn10", dict(width=0.125)), ("resnet50", dict(layers=[1, 1, 1, 1])),
                     ("sed", dict(backbone="cnn10", backbone_kw={"width": 0.125}, rnn=False))):
        m = create_model(name, n_classes=4, frontend=fe, **kw).eval()
        wav = torch.randn(2, 16000)
        with torch.no_grad(): out = m(wav)
        assert out.shape == (2, 4)
        assert m.config["frontend"] == fe.config
        p = save_checkpoint(tmp_path / f"{name}.pt", m)
        assert load_checkpoint(p)["frontend"] == fe.config
        with pytest.raises(CheckpointError) as e: load_checkpoint(p, expect_frontend="panns32k")
        assert "panns16k" in str(e.value) and "panns32k" in str(e.value)
        with torch.no_grad(): torch.testing.assert_close(model_from_checkpoint(p, expect_frontend=fe.config).eval()(wav), out)
    with pytest.raises(ValueError, match="expects waveforms"):
        create_model("cnn10", 2, frontend=fe, width=0.125)(torch.randn(1, 1, 50, 64))


def test_checkpoint_refuses_code_and_garbage(tmp_path):
    class Payload:
        def __reduce__(self): return (print, ("code ran",))
    torch.save({"format": "audiotl_nb/1", "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="run code"): load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"): load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an audiotl_nb checkpoint"): load_checkpoint(tmp_path / "other.pt")


# ---------------------------------------------------------------- surgery: heads, freezing, LR decay

def test_replace_head_freeze_and_lrd():
    m = create_model("cnn10", n_classes=527, width=0.125)
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("fc_audioset")}
    replace_head(m, 10)
    assert m.fc_audioset.out_features == 10 and m.head is m.fc_audioset and m.config["n_classes"] == 10
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if k in before)
    freeze_backbone(m)
    assert count_params(m, trainable=True) == 64 * 10 + 10
    freeze_backbone(m, False)
    groups = param_groups_lrd(m, lr=1.0, decay=0.5)
    assert [g["lr"] for g in groups] == [0.5 ** i for i in range(len(groups) - 1, -1, -1)]
    assert groups[0]["params"][0] is m.bn0.weight and groups[-1]["params"][0] is m.fc_audioset.weight
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    sed = create_model("sed", 3, backbone="cnn10", backbone_kw={"width": 0.125}, rnn_hidden=4)
    g = param_groups_lrd(sed, lr=1.0, decay=0.9)
    assert g[-1]["params"][0] is sed.head.weight and g[-2]["params"][0] is sed.rnn.weight_ih_l0
    assert sum(len(x["params"]) for x in g) == len(list(sed.parameters()))


# ---------------------------------------------------------------- SED pieces

def test_resample_frames_against_numpy():
    h = torch.randn(1, 7, 3)
    down = resample_frames(h, 3)  # adaptive average pooling windows: [0,3), [2,5), [4,7)
    want = torch.stack([h[:, 0:3].mean(1), h[:, 2:5].mean(1), h[:, 4:7].mean(1)], 1)
    torch.testing.assert_close(down, want)
    up = resample_frames(h, 20)  # linear interpolation at the centres of the output steps
    pos = np.clip((np.arange(20) + 0.5) * 7 / 20 - 0.5, 0, 6)
    want = np.stack([np.interp(pos, np.arange(7), h[0, :, d].numpy()) for d in range(3)], 1)
    np.testing.assert_allclose(up[0].numpy(), want, atol=1e-6)


def test_sed_long_recording_and_frame_count():
    sed = create_model("sed", 2, backbone="cnn10", backbone_kw={"width": 0.125}, rnn_hidden=4, slice_seconds=1.0).eval()
    for frames_in, expected in ((100, 25), (101, 25), (350, 25 + 25 + 25 + 12)):
        with torch.no_grad(): z = sed.frame_logits(torch.randn(1, 1, frames_in, 64))
        assert z.shape == (1, expected, 2)
    fe = create_frontend("panns16k")
    sedw = create_model("sed", 2, frontend=fe, backbone="cnn10", backbone_kw={"width": 0.125}, rnn=False, slice_seconds=1.0).eval()
    with torch.no_grad(): z = sedw.frame_logits(torch.randn(1, 40000))  # 2.5 s of waveform
    assert z.shape == (1, 62, 2)


def test_frame_pooling_against_numpy():
    z = torch.randn(3, 11, 4)
    p = torch.sigmoid(z).numpy()
    for method, want in (("max", p.max(1)), ("mean", p.mean(1)), ("linsoft", (p ** 2).sum(1) / p.sum(1))):
        np.testing.assert_allclose(torch.sigmoid(pool_frame_logits(z, method)).numpy(), want, atol=1e-6)


def test_missing_optional_dependency_is_named(monkeypatch):
    "A family whose dependency is missing is skipped; asking for an unknown model then names the package."
    import importlib
    from audiotl_nb.core import Registry
    from audiotl_nb.models import core
    real_import = importlib.import_module
    def fake_import(name, *a, **kw):
        if name == "audiotl_nb.models.hf": raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
        if name == "audiotl_nb.models.ssl": raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # absent family
        return real_import(name, *a, **kw)
    monkeypatch.setattr(core.importlib, "import_module", fake_import)
    monkeypatch.setattr(core, "MODELS", Registry("model"))
    monkeypatch.setattr(core, "_IMPORTED", False)
    monkeypatch.setattr(core, "_UNAVAILABLE", {})
    with pytest.raises(UnknownNameError) as e: core.create_model("wav2vec2", 2)
    assert "transformers" in " ".join(getattr(e.value, "__notes__", []))
    assert core._UNAVAILABLE == {"hf": "transformers"}
    def broken(name, *a, **kw):  # a genuine bug inside a family module is not hidden
        if name == "audiotl_nb.models.seq": raise ModuleNotFoundError("No module named 'audiotl_nb.nothing'", name="audiotl_nb.nothing")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(core.importlib, "import_module", broken)
    monkeypatch.setattr(core, "_IMPORTED", False)
    with pytest.raises(ModuleNotFoundError): core.list_models()
