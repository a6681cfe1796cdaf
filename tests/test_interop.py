"""diffusers interop (pipeline/model/interop.py, evaluation/export.py): our U-Net and schedule <-> UNet2DModel and
DDPMScheduler, both directions, with real diffusers classes, real checkpoints and a real training from an import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

from evaluation import export
from pipeline.checkpoint.folder import EMA_FILE, Checkpoint, read_ema
from pipeline.config import DiffusionConfig
from pipeline.model import interop
from pipeline.model.diffusion import Diffusion
from pipeline.model.unet import UNet, count_parameters, model_config, timestep_embedding
from tests.helpers import trainer as h
from tests.helpers.evaluation import prepare_digits, tiny_config, write_checkpoint

diffusers_logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

# google/ddpm-cifar10-32's unet/config.json (the authors' CIFAR-10 network in diffusers). Its up blocks mirror the
# down blocks: up block k runs at the resolution of down block 3-k, so attention at 16x16 is up block 2.
CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, act_fn="silu",
    time_embedding_type="positional", attention_head_dim=None, center_input_sample=False, mid_block_scale_factor=1,
)
PAPER_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                       variance_type="fixed_large", clip_sample=True)


def _perturbed(cfg, seed=0) -> UNet:
    """Our U-Net with every weight moved off its (partly zero) initialisation, so every tensor matters."""
    torch.manual_seed(seed)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _outputs(ours: torch.nn.Module, theirs: UNet2DModel, cfg, t: list[int], dtype=torch.float32):
    x = torch.randn((len(t), cfg.channels, cfg.image_size, cfg.image_size), generator=torch.Generator().manual_seed(1),
                    dtype=dtype)
    tt = torch.tensor(t)
    with torch.no_grad():
        return ours.eval()(x, tt), theirs.eval()(x, tt).sample


# ---------------------------------------------------------------------------------------- the mapping


def test_digits_net_round_trips_through_unet2dmodel_bitwise_with_equal_outputs():
    cfg = model_config("digits")
    ours = _perturbed(cfg)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs = UNet2DModel(**interop.diffusers_unet_config(cfg))
    theirs.load_state_dict(interop.to_diffusers(state, cfg), strict=True)  # every key, every shape
    assert (len(state), len(theirs.state_dict())) == (184, 208)  # qkv is three tensors there
    assert count_parameters(ours) == count_parameters(theirs) == 1_001_729
    back = interop.from_diffusers(theirs.state_dict(), cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert interop.model_config_from_diffusers(dict(theirs.config)) == cfg

    a, b = _outputs(ours, theirs, cfg, [0, 10, 500, 999])
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()  # float32 rounding (measured 2e-6 at 1.4)
    # The one computation that differs is the float32 time embedding (diffusers multiplies by ln(10^4) before
    # dividing); with the same embedding the networks agree to float64 rounding: tensor for tensor the same net.
    ours64, theirs64 = _perturbed(cfg).double(), UNet2DModel(**interop.diffusers_unet_config(cfg)).double()
    theirs64.load_state_dict(interop.to_diffusers(ours64.state_dict(), cfg))
    theirs64.time_proj.forward = lambda ts: timestep_embedding(ts, cfg.base_channels)
    a, b = _outputs(ours64, theirs64, cfg, [0, 999], torch.float64)
    assert (a - b).abs().max().item() < 1e-12


def test_several_heads_map_when_every_attention_block_has_the_same_width_and_are_refused_otherwise():
    cfg = model_config("digits", num_heads=2)  # attention at 4x4 and in the middle: both 64 channels
    config = interop.diffusers_unet_config(cfg)
    assert config["attention_head_dim"] == 32
    ours, theirs = _perturbed(cfg), UNet2DModel(**config)
    theirs.load_state_dict(interop.to_diffusers(ours.state_dict(), cfg))
    a, b = _outputs(ours, theirs, cfg, [3, 700])
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
    assert interop.model_config_from_diffusers(dict(theirs.config)).num_heads == 2
    uneven = model_config("digits", num_heads=2, attn_resolutions=[8, 4])  # 32 and 64 channels
    with pytest.raises(interop.InteropError, match=r"num_heads=2 with attention blocks of widths \[32, 64\]"):
        interop.diffusers_unet_config(uneven)


def test_ddpm_cifar10_32_unet_converts_with_equal_outputs():
    """A randomly initialised UNet2DModel with the released ddpm-cifar10-32 configuration: our cifar10 preset."""
    torch.manual_seed(0)
    with torch.no_grad():
        theirs = UNet2DModel(**CIFAR10_32)
        for p in theirs.parameters():  # diffusers' init leaves some layers at 0 or 1: make every tensor count
            p.add_(0.02 * torch.randn_like(p))
    cfg = interop.model_config_from_diffusers(dict(theirs.config))
    assert cfg == model_config("cifar10", dropout=0.0)  # the released config has no dropout key (diffusers: 0)
    assert interop.diffusers_unet_config(model_config("cifar10"))["up_block_types"] == list(CIFAR10_32["up_block_types"])
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(interop.from_diffusers(theirs.state_dict(), cfg), assign=True)
    assert count_parameters(ours) == count_parameters(theirs) == 35_746_307
    a, b = _outputs(ours, theirs, cfg, [0, 999])  # one forward each, batch 2
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    print(f"ddpm-cifar10-32 layout: max |ours - diffusers| = {diff:.3g} at output scale {scale:.3g} (float32)")
    assert diff < 1e-5 * scale


def test_an_asymmetric_attention_layout_is_refused_naming_both_resolutions():
    # attention at 16x16 going down but at 8x8 coming up: up block 1 runs at 8x8 (built and checked by hooks
    # while writing this test); our U-Net attends at the same resolutions on both paths
    config = {**_defaults(UNet2DModel), **CIFAR10_32, "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D",
                                                                         "UpBlock2D")}
    with pytest.raises(interop.InteropError, match=r"attention at \['16x16'\] going down but at \['8x8'\] coming up"):
        interop.model_config_from_diffusers(config)


def _defaults(cls) -> dict:
    return export._with_defaults(cls, {})


@pytest.mark.parametrize(("key", "value"), [
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("norm_eps", 1e-5), ("downsample_padding", 1), ("act_fn", "gelu"),
    ("resnet_time_scale_shift", "scale_shift"), ("time_embedding_type", "fourier"), ("class_embed_type", "timestep"),
    ("add_attention", False), ("norm_num_groups", 16), ("center_input_sample", True), ("mid_block_scale_factor", 2),
])
def test_a_unet_setting_ours_does_not_have_is_refused_by_name(key, value):
    with pytest.raises(interop.InteropError, match=f"{key}={value!r}"):
        interop.model_config_from_diffusers({**_defaults(UNet2DModel), **CIFAR10_32, key: value})


# --------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("variance", "prediction"), [("fixedlarge", "eps"), ("fixedsmall", "x0"), ("fixedlarge", "v")])
def test_the_scheduler_has_our_schedule_and_maps_back(schedule, variance, prediction):
    ours = DiffusionConfig(schedule=schedule, variance=variance, prediction=prediction)
    scheduler = DDPMScheduler(**interop.scheduler_config(ours))
    d = Diffusion(ours)
    assert interop.check_betas(d.betas, scheduler.betas) < 2e-7  # float32 rounding of the same β_t
    ac = scheduler.alphas_cumprod.double()
    assert ((ac - d.alphas_cumprod).abs() / d.alphas_cumprod).max() < 2e-5  # float32 cumprod over 1000 steps
    assert (ac - d.alphas_cumprod).abs().max() < 1e-6
    back, notes = interop.diffusion_config_from_scheduler(dict(scheduler.config))
    assert back == ours and notes == []


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_our_reverse_step_is_diffusers_for_each_prediction(prediction):
    """diffusers' DDPMScheduler.step turns the network's output into x̂_0 and μ_θ by its own code: ours must agree."""
    ours = DiffusionConfig(schedule="cosine", prediction=prediction)
    d, scheduler = Diffusion(ours), DDPMScheduler(**interop.scheduler_config(ours))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    for t_int in (0, 1, 500, 980, 999):
        out = torch.randn(x.shape, generator=gen)
        t = torch.full((2,), t_int)
        step = scheduler.step(out, t_int, x, generator=torch.Generator().manual_seed(5))
        x0 = d.model_output_to_x0(out.double(), x.double(), t).clamp(-1, 1)
        torch.testing.assert_close(step.pred_original_sample.double(), x0, rtol=0, atol=1e-4)
        if t_int == 0:  # no noise added: the step is the mean
            mean, _, _ = d.q_posterior(x0, x.double(), t)
            torch.testing.assert_close(step.prev_sample.double(), mean, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("change", "message"), [
    ({"beta_schedule": "scaled_linear"}, "beta_schedule='scaled_linear'"),
    ({"prediction_type": "flow"}, "prediction_type='flow'"),
    ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({"trained_betas": [0.01] * 1000}, "trained_betas is set"),
])
def test_a_schedule_ours_does_not_have_is_refused(change, message):
    config = {**dict(DDPMScheduler(**PAPER_SCHEDULER).config), **change}
    with pytest.raises(interop.InteropError, match=message):
        interop.diffusion_config_from_scheduler(config)


def test_a_schedule_that_only_shares_a_name_is_refused_by_its_values():
    ours = Diffusion(DiffusionConfig())
    other = DDPMScheduler(**{**PAPER_SCHEDULER, "beta_end": 0.021})
    with pytest.raises(interop.InteropError, match="β_t differ from ours by up to"):
        interop.check_betas(ours.betas, other.betas)


# ------------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoint(digits, tmp_path_factory) -> Path:
    """A checkpoint of a digits-shaped U-Net (attention at 4x4, cosine schedule), as the trainer writes one."""
    cfg = tiny_config(digits, tmp_path_factory.mktemp("run") / "run",
                      ["model.channel_mult=[1,2]", "model.attn_resolutions=[4]", "diffusion.schedule=cosine",
                       "diffusion.timesteps=50"])
    return write_checkpoint(cfg, 7)


EVAL = ["eval.feature_extractor=digits", "eval.num_samples=12", "eval.steps=5", "eval.batch_size=12",
        "eval.bpd_max_images=4", "eval.bpd_timesteps=2", "eval.kid_subsets=2", "eval.kid_subset_size=4",
        "eval.device=cpu"]


def test_export_then_import_gives_a_pipeline_diffusers_loads_and_a_checkpoint_evaluate_scores(
        checkpoint, digits, tmp_path, capsys):
    from evaluation.evaluate import evaluate

    out = tmp_path / "pipeline"
    assert export.main([str(checkpoint.parent), "--diffusers", str(out)]) == 0  # a run folder: its newest
    assert "outputs agree with ours to" in capsys.readouterr().out
    pipe = DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    weights, meta = read_ema(checkpoint / EMA_FILE)
    cfg = interop.model_config_from_diffusers(dict(pipe.unet.config))
    ours = UNet(cfg)
    ours.load_state_dict(weights)
    a, b = _outputs(ours, pipe.unet, cfg, [0, 7, 25, 49])
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
    d = Diffusion(DiffusionConfig(**meta["diffusion"]))
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    ac = pipe.scheduler.alphas_cumprod.double()
    assert ac.shape == d.alphas_cumprod.shape and (ac - d.alphas_cumprod).abs().max() < 1e-6
    assert json.loads((out / "ddpm_export.json").read_text())["step"] == 7

    imported = tmp_path / "imported"
    assert export.main(["--from-diffusers", str(out), "--out", str(imported), f"data.shards={digits}"]) == 0
    path = imported / "step-00000000"
    ckpt = Checkpoint(path)
    assert ckpt.verify() == [] and ckpt.meta["step"] == 0 and interop.IMPORTED in ckpt.meta
    assert not (path / "accelerate").exists()  # no training state: an import is never resumed
    back, back_meta = read_ema(path / EMA_FILE)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)  # bitwise
    assert back_meta["diffusion"] == meta["diffusion"] and back_meta["model"] == meta["model"]

    # evaluate takes the import as it takes the original, and draws bitwise the same images from it
    original = evaluate(checkpoint, EVAL, save_samples_to=str(tmp_path / "a.npz"), log_to_run=False)
    again = evaluate(path, EVAL, save_samples_to=str(tmp_path / "b.npz"), log_to_run=False)
    assert again.step == 0 and np.isfinite(again.metrics["eval/fid_digits"])
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])
    assert again.metrics["eval/fid_digits"] == original.metrics["eval/fid_digits"]


def test_command_line_refusals_are_one_line_exit_2(checkpoint, tmp_path, capsys):
    def refused(args: list[str], message: str) -> None:
        assert export.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err

    refused([str(tmp_path / "nope"), "--diffusers", str(tmp_path / "o")], "no such folder")
    refused(["--from-diffusers", str(tmp_path), "--out", str(tmp_path / "o")], "neither unet/config.json")
    refused([str(checkpoint), "--diffusers", str(tmp_path / "o"), "--weights", "posthoc"], "--weights posthoc: not one of ema, raw nor an EMA")

    layout = tmp_path / "asymmetric"
    (layout / "unet").mkdir(parents=True)
    (layout / "scheduler").mkdir()
    (layout / "unet" / "config.json").write_text(json.dumps({**CIFAR10_32, "up_block_types": [
        "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}))
    (layout / "scheduler" / "scheduler_config.json").write_text(json.dumps(PAPER_SCHEDULER))
    refused(["--from-diffusers", str(layout), "--out", str(tmp_path / "o")], "not the DDPM layout our U-Net implements")


def test_a_pickled_weights_file_is_refused_unrun(checkpoint, tmp_path, capsys):
    out = tmp_path / "pipeline"
    assert export.main([str(checkpoint), "--diffusers", str(out)]) == 0
    (out / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv_in.weight": Payload()}, out / "unet" / "diffusion_pytorch_model.bin")
    capsys.readouterr()
    assert export.main(["--from-diffusers", str(out), "--out", str(tmp_path / "o")]) == 2
    assert "cannot be read as plain tensors" in capsys.readouterr().err and not marker.exists()


# ------------------------------------------------------------------------------------------ train.init_from


def _tiny_diffusers(folder: Path) -> Path:
    """A DDPMPipeline folder of tests/helpers/trainer.TINY's network (random diffusers init) and schedule."""
    torch.manual_seed(3)
    unet = UNet2DModel(**interop.diffusers_unet_config(model_config(
        "digits", num_res_blocks=1, attn_resolutions=[4])))
    scheduler = DDPMScheduler(**{**PAPER_SCHEDULER, "num_train_timesteps": 100})
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_a_training_starts_from_an_imported_checkpoint_and_never_resumes_one(digits, tmp_path):
    from pipeline.checkpoint.folder import CheckpointError
    from pipeline.config import load_config
    from pipeline.train.loop import init_from

    imported = tmp_path / "imported"
    assert export.main(["--from-diffusers", str(_tiny_diffusers(tmp_path / "hf")), "--out", str(imported)]) == 0
    start = read_ema(imported / "step-00000000" / EMA_FILE)[0]
    run = tmp_path / "run"
    base = [f"data.shards={digits}", f"train.out_dir={run}", f"train.init_from={imported}", "optimizer.lr=1e-9"]
    r = h.run(h.train_cmd([*base, "train.total_steps=1"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised the U-Net from the EMA weights of {imported / 'step-00000000'}" in r.stdout
    ckpt = Checkpoint(run / "step-00000001")
    trained = ckpt.raw_weights(set(start))
    assert ckpt.step == 1  # step 0 -> 1: a new run, not the import's progress
    assert h.max_diff(trained, start) < 1e-6  # one Adam step at lr 1e-9 from the imported weights
    torch.manual_seed(0)  # what the trainer builds before train.init_from replaces it (train.seed=0)
    fresh = UNet(load_config(None, [f"data.shards={digits}", *h.TINY]).model).state_dict()
    assert h.max_diff(trained, fresh) > 1e-2

    r = h.run(h.train_cmd([*base, "train.total_steps=2"]), h.env())  # the run's own checkpoint wins
    assert r.returncode == 0 and "ignored: resuming from this run's own checkpoint" in r.stdout, r.stderr[-3000:]
    assert "resumed from" in r.stdout and h.complete_steps(run) == [1, 2]

    r = h.run(h.train_cmd([f"data.shards={digits}", f"train.out_dir={imported}", "train.total_steps=2"]), h.env())
    assert r.returncode == 2 and "is an imported checkpoint (weights only" in r.stderr, r.stderr[-3000:]
    assert "train.init_from=" in r.stderr

    other = load_config(None, [f"data.shards={digits}", f"train.out_dir={tmp_path / 'other'}", *h.TINY,
                               f"train.init_from={imported}", "model.base_channels=64"])

    class Printer:
        def print(self, *a):
            pass

    with pytest.raises(CheckpointError, match="model.base_channels: checkpoint 32, now 64"):
        init_from(torch.nn.Linear(1, 1), other, Printer())
