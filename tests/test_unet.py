"""pipeline/model/unet.py: the paper's parameter counts, shapes, the time embedding, attention and the config checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.model.unet import PRESETS, AttnBlock, UNet, count_parameters, model_config, timestep_embedding


def _meta_unet(cfg: ModelConfig) -> UNet:
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        return UNet(cfg)


def test_cifar10_preset_has_the_papers_35_7m_parameters():
    n = count_parameters(_meta_unet(model_config("cifar10")))
    assert abs(n - 35.7e6) <= 0.1e6
    assert n == 35_746_307  # the count of the authors' TF model, reproduced by the common PyTorch ports


@pytest.mark.parametrize("preset", ["lsun256", "celebahq256"])
def test_256_presets_have_about_113_7m_parameters(preset):
    cfg = model_config(preset)
    assert (cfg.base_channels, list(cfg.channel_mult), cfg.num_res_blocks, list(cfg.attn_resolutions)) == (
        128, [1, 1, 2, 2, 4, 4], 2, [16],
    )
    assert abs(count_parameters(_meta_unet(cfg)) - 113.7e6) <= 0.5e6


def test_digits_preset_is_small_and_grey():
    cfg = model_config("digits")
    assert cfg.channels == 1 and cfg.image_size == 8 and cfg.attn_resolutions == [4]  # the lowest resolution
    assert count_parameters(_meta_unet(cfg)) < 1.5e6
    cfg16 = model_config("digits", image_size=16, attn_resolutions=[8])
    net = UNet(cfg16)
    assert net(torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shape_and_near_zero_initial_output(channels):
    torch.manual_seed(0)
    net = UNet(model_config("digits", channels=channels))
    x = torch.randn(3, channels, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 10, 999]))
    assert out.shape == x.shape and out.dtype == torch.float32
    # The authors zero-initialise (scale 1e-10) the output conv: the untrained net predicts ε ≈ 0.
    assert float(out.abs().max()) < 1e-3


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    net = UNet(model_config("digits"))
    net(torch.randn(2, 1, 8, 8), torch.tensor([3, 700])).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    # With the output conv at ~0 only it (and its bias) gets an O(1) gradient at step 0, as in the paper's code.
    assert float(net.conv_out.weight.grad.abs().max()) > 0


def test_timestep_embedding_is_the_transformer_sinusoid():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 128).double().numpy()
    half = 64
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    args = t.numpy()[:, None] * freqs[None, :]
    np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], axis=1), atol=2e-4)


def test_attention_block_matches_explicit_softmax_attention():
    torch.manual_seed(1)
    block = AttnBlock(64, num_heads=2).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 4, 4)
    h = block.norm(x).flatten(2).transpose(1, 2)  # (B, 16, 64)
    q, k, v = block.qkv(h).chunk(3, dim=-1)
    heads = []
    for i in range(2):
        sl = slice(32 * i, 32 * (i + 1))
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(32), dim=-1)
        heads.append(w @ v[..., sl])
    expected = x + block.proj_out(torch.cat(heads, -1)).transpose(1, 2).reshape(2, 64, 4, 4)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_downsampling_pads_like_tensorflow_same():
    # TF "SAME" with stride 2 on an even size pads only right/bottom: output (0, 0) sees input rows/cols 0..2.
    net = UNet(model_config("digits"))
    down = next(b["down"] for b in net.down if "down" in b)
    x = torch.zeros(1, 32, 8, 8)
    x[..., 0, 0] = 1.0
    with torch.no_grad():
        y = down(x) - down(torch.zeros_like(x))
    weight_centre = down.conv.weight[:, :, 0, 0].sum(1)  # the tap at kernel (0, 0) lands on input (0, 0)
    torch.testing.assert_close(y[0, :, 0, 0], weight_centre.detach(), rtol=1e-5, atol=1e-6)
    assert y.shape[-2:] == (4, 4)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(2)
    net = UNet(model_config("digits")).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    ref = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.to(memory_format=torch.channels_last), t), ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_and_configs_fail_clearly():
    net = UNet(model_config("digits"))
    with pytest.raises(ValueError, match=r"built for \(1, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer timesteps"):
        net(torch.zeros(2, 1, 8, 8), torch.tensor([0.5, 1.0]))
    with pytest.raises(KeyError, match="unknown U-Net preset 'cifar100'"):
        model_config("cifar100")
    with pytest.raises(KeyError, match="unknown ModelConfig field"):
        model_config("cifar10", chanels=1)
    with pytest.raises(ConfigError, match="model.num_heads=3 must divide"):
        ModelConfig(image_size=32, num_heads=3)
    with pytest.warns(UserWarning, match=r"model.attn_resolutions=\[16\]: \[16\] is not a resolution"):
        ModelConfig(image_size=8, channel_mult=[1, 2], attn_resolutions=[16])
    with pytest.raises(ValueError, match="UNet needs model.image_size and model.channels"):
        UNet(ModelConfig())  # geometry unset: it comes from the data (pipeline.geometry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in PRESETS:
            model_config(name)
