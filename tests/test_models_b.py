"""Sequence models, AST, the SSL conformer and the Hugging Face backbones: contract, gradients,
round trips, sizes against the papers, and agreement with reference libraries (timm, transformers)."""
import math

import pytest
import torch
from torch import nn

from audiotl_nb.core import CheckpointError, ConfigError, UnknownNameError
from audiotl_nb.models.core import (count_macs, count_params, create_model, list_models, load_checkpoint,
                                    model_from_checkpoint, model_from_config, replace_head, save_checkpoint)

SEQ_TINY = {
    "crnn": dict(width=4, gru_hidden=16),
    "cnn_transformer": dict(width=4, d_model=32, n_heads=8, ffn_dim=64),
    "transformer": dict(d_model=32, n_heads=8, n_layers=2, ffn_dim=64),
    "conformer": dict(d_model=32, n_heads=4, n_layers=2, ffn_dim=64, kernel_size=7),
    "ast": dict(n_mels=64, n_frames=96, fstride=8, tstride=8, size="tiny", embed_dim=32, depth=2, n_heads=4),
    "cf_tiny": dict(),
    "ssl_conformer": dict(z_dim=16, d_model=16, n_heads=2, n_layers=1, ffn_dim=32, kernel_first=5, kernel=3),
}
# expected number of frames from `frames` for a (B, 1, 96, 64) log-mel input
SEQ_FRAMES = {"crnn": 12, "cnn_transformer": 12, "transformer": 96, "conformer": 24, "ast": 11, "cf_tiny": 24,
              "ssl_conformer": 24}


def _hf_tiny(kind):
    from audiotl_nb.models.hf import tiny_hf_config
    return dict(hf_config=tiny_hf_config(kind))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models run fastest on one thread (and do not stall when the machine is busy)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def logmel():
    return torch.randn(3, 1, 96, 64, generator=torch.Generator().manual_seed(0))


def test_all_registered():
    names = set(list_models())
    assert set(SEQ_TINY) | {"cf_s", "cf_l", "wav2vec2", "hubert", "wavlm"} <= names


@pytest.mark.parametrize("name", list(SEQ_TINY))
def test_logmel_model_contract(name, logmel, tmp_path):
    torch.manual_seed(0)
    m = create_model(name, 5, **SEQ_TINY[name])
    out = m(logmel)
    assert out.shape == (3, 5)
    assert isinstance(m.head, nn.Linear) and m.head.out_features == 5
    frames, emb = m.frames(logmel), m.embed(logmel)
    assert frames.shape[:2] == (3, SEQ_FRAMES[name]) and emb.shape == (3, m.embed_dim)
    out.square().mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None and n != "mask_emb"]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # state-dict round trip, through the checkpoint format and through a plain state dict
    m.eval()
    save_checkpoint(tmp_path / "m.pt", m, labels=list("abcde"))
    m2 = model_from_checkpoint(tmp_path / "m.pt").eval()
    m3 = model_from_config(m.config); m3.load_state_dict(m.state_dict()); m3.eval()
    with torch.no_grad():
        ref = m(logmel)
        assert torch.equal(m2(logmel), ref) and torch.equal(m3(logmel), ref)
        assert torch.equal(m2.frames(logmel), m.frames(logmel))
    assert load_checkpoint(tmp_path / "m.pt")["labels"] == list("abcde")
    assert replace_head(m2, 2)(logmel).shape == (3, 2)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm"])
def test_hf_contract(kind, tmp_path):
    torch.manual_seed(0)
    wav = torch.randn(2, 8000) * 0.1
    m = create_model(kind, 3, **_hf_tiny(kind))
    assert m(wav).shape == (2, 3) and m.frames(wav).shape == (2, 99, 32) and m.embed(wav).shape == (2, 32)
    m(wav).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    save_checkpoint(tmp_path / "m.pt", m.eval())
    m2 = model_from_checkpoint(tmp_path / "m.pt", n_classes=6).eval()
    with torch.no_grad():
        assert torch.equal(m2.frames(wav), m.frames(wav))
    assert m2(wav).shape == (2, 6)


def test_hf_local_folder_matches_transformers(tmp_path):
    import transformers
    from audiotl_nb.models.hf import tiny_hf_config
    torch.manual_seed(1)
    ref = transformers.WavLMModel(transformers.WavLMConfig(**tiny_hf_config("wavlm"))).eval()
    ref.save_pretrained(tmp_path / "wavlm")
    m = create_model("wavlm", 4, pretrained=str(tmp_path / "wavlm")).eval()
    wav = torch.randn(2, 16000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(m.frames(wav), ref(wav).last_hidden_state)
    assert m.source == str(tmp_path / "wavlm") and "pretrained" not in m.config
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("wavlm", 4, pretrained=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="not 'hubert'"):
        create_model("hubert", 4, pretrained=str(tmp_path / "wavlm"))


def test_waveform_frontends():
    wav = torch.randn(2, 16000) * 0.1
    crnn = create_model("crnn", 4, frontend="panns16k", **SEQ_TINY["crnn"])
    assert crnn(wav).shape == (2, 4) and crnn.frames(wav).shape == (2, 101 // 8, 32)  # 101 frames at 10 ms
    ssl = create_model("cf_tiny", 4, frontend="w2v_conformer")
    ctx, tgt, mask = ssl.forward_ssl(wav)
    assert ctx.shape == tgt.shape == (2, 12, 32) and mask.shape == (2, 12)              # 51 frames / 4
    assert model_from_config(ssl.config).frontend.config == ssl.frontend.config
    with pytest.raises(ValueError, match="expects waveforms"):
        crnn(torch.randn(2, 1, 96, 64))


@pytest.mark.parametrize("name,paper", [("cf_s", 18.4e6), ("cf_l", 88.1e6)])
def test_ssl_sizes_match_paper(name, paper):
    with torch.device("meta"):
        m = create_model(name, 527)
    n = count_params(m) - count_params(m.head)
    assert abs(n / paper - 1) < 0.05, (name, n)
    assert all(p.is_meta for p in m.parameters())


def test_ssl_block_order_and_kernels():
    with torch.device("meta"):
        m = create_model("cf_s", 10)
    layers = m.context_encoder.layers
    assert len(layers) == 12 and all(l.convolution_first for l in layers)
    kernels = [l.conv_module.sequential[2].kernel_size[0] for l in layers]
    assert kernels == [31] + [15] * 11
    assert m.feature_encoder.proj.in_features == 4 * 64 and m.mask_prob == 0.3 and m.mask_span == 3


def test_ssl_pretraining_learns():
    "A few steps of contrastive pre-training on a fixed batch reduce the loss."
    from audiotl_nb.losses import Wav2Vec2ContrastiveLoss
    torch.manual_seed(0)
    m = create_model("cf_tiny", 2, dropout=0.0)
    t = torch.linspace(0, 1, 160)
    x = (torch.sin(2 * math.pi * t[:, None] * torch.arange(1, 65)) + 0.1 * torch.randn(4, 1, 160, 64))
    loss_fn = Wav2Vec2ContrastiveLoss(n_distractors=8, seed=0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    masks = [m.sample_mask(4, 40, generator=g) for _ in range(2)]
    losses = []
    for step in range(15):
        loss = loss_fn(*m.forward_ssl(x, mask=masks[step % 2]), generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_span_mask_counts_and_device():
    from audiotl_nb.models.ssl import span_mask
    for steps in (7, 30, 125, 500):
        m = span_mask(8, steps, 0.3, 3)
        k = min(max(1, int(0.3 * steps / 3 + 0.5)), steps // 3)
        assert (m.sum(1) == 3 * k).all()
    a = span_mask(4, 50, generator=torch.Generator().manual_seed(3))
    b = span_mask(4, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_ast_matches_timm_deit(tmp_path):
    timm = pytest.importorskip("timm")
    from audiotl_nb.models.ast import load_deit_weights
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=7).eval()
    torch.save(ref.state_dict(), tmp_path / "deit.pth")
    m = create_model("ast", 7, n_mels=224, n_frames=224, fstride=16, tstride=16, size="tiny")
    load_deit_weights(m, tmp_path / "deit.pth").eval()
    img = torch.randn(2, 1, 224, 224)                            # a grey image = (F, T) spectrogram
    with torch.no_grad():
        want = ref.forward_features(img.repeat(1, 3, 1, 1))      # (B, 2 + 196, D)
        got = m.tokens(img.transpose(2, 3))                      # our input is (B, 1, T, F)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(m.embed(img.transpose(2, 3)), (want[:, 0] + want[:, 1]) / 2, atol=2e-5, rtol=1e-4)


def test_ast_pos_resize_matches_timm():
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed
    from audiotl_nb.models.ast import resize_pos_embed
    pos = torch.randn(1, 2 + 24 * 24, 16)
    ours = resize_pos_embed(pos, (24, 24), (12, 101))
    theirs = resample_abs_pos_embed(pos, [12, 101], [24, 24], num_prefix_tokens=2, interpolation="bilinear",
                                    antialias=False)
    torch.testing.assert_close(ours, theirs)


def test_ast_other_input_lengths():
    m = create_model("ast", 3, **SEQ_TINY["ast"]).eval()
    with torch.no_grad():
        for t in (16, 50, 200):
            assert m(torch.randn(1, 1, t, 64)).shape == (1, 3)
            assert m.frames(torch.randn(1, 1, t, 64)).shape[1] == (t - 16) // 8 + 1


def test_macs_scale_with_length():
    "Conv/GRU models are linear in the input length; self-attention adds a quadratic term."
    def macs(name, t, **kw):
        with torch.device("meta"):
            m = create_model(name, 10, **kw)
        return count_macs(m, torch.zeros(1, 1, t, 64, device="meta"))
    r_crnn = macs("crnn", 800) / macs("crnn", 400)
    assert abs(r_crnn - 2) < 0.02
    r_tr = macs("transformer", 800) / macs("transformer", 400)
    assert r_tr > 2.05


def test_bad_configs():
    with pytest.raises(ConfigError, match="at least 32 mel bins"):
        create_model("crnn", 3, n_mels=16)
    with pytest.raises(ConfigError, match="not divisible"):
        create_model("conformer", 3, d_model=30, n_heads=4)
    with pytest.raises(UnknownNameError, match="Valid HF backbone names"):
        from audiotl_nb.models.hf import HFBackbone
        HFBackbone(3, kind="data2vec")
    with pytest.raises(ConfigError, match="either hf_config or a pretrained folder"):
        create_model("hubert", 3, hf_config={"hidden_size": 32}, pretrained="x")


@pytest.mark.parametrize("backbone,kw,x", [
    ("cf_tiny", {}, torch.randn(2, 1, 500, 64)),                         # 5 s of 10 ms log-mel frames
    ("ast", SEQ_TINY["ast"], torch.randn(2, 1, 500, 64)),
    ("cnn_transformer", SEQ_TINY["cnn_transformer"], torch.randn(2, 1, 500, 64)),
    ("wav2vec2", "hf", torch.randn(2, 80000) * 0.1),                      # 5 s of 16 kHz audio
])
def test_frame_sed_wrapper(backbone, kw, x):
    "Every sequence model plugs into the frame-level SED wrapper: 5 s → 125 frames of 40 ms."
    kw = _hf_tiny(backbone) if kw == "hf" else kw
    sed = create_model("sed", 3, backbone=backbone, backbone_kw=kw, rnn_hidden=8, input_rate=100.0)
    assert sed.frame_logits(x).shape == (2, 125, 3) and sed(x).shape == (2, 3)
    sed(x).sum().backward()
    no_grad = [n for n, p in sed.named_parameters() if p.grad is None and not n.endswith("mask_emb")]
    assert not no_grad, no_grad
