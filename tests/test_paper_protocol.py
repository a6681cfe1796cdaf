"""Reproducing Table 1: configs/cifar10_paper.yaml (the authors' recipe), per-group gradient clipping checked against
a hand computation (in-process, one training process, two gloo processes), eval.protocol=paper (resolved settings,
overrides, refusals, the name in the provenance, the MLflow tags and compare), and the authors' tanh decoder."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from evaluation.errors import EvaluationError
from evaluation.protocol import PAPER, apply_protocol, overridden, recorded_name
from pipeline.config import ConfigError, load_config
from pipeline.train.step import (
    GroupClip,
    OptimizerStep,
    StepNoise,
    batch_split,
    check_group_clip,
    lr_at,
    micro_seed,
    seed_generators,
)
from tests.helpers import trainer as h
from tests.helpers.evaluation import prepare_digits, tiny_config, training_run, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- the recipe


def test_cifar10_paper_config_is_the_authors_recipe():
    from pipeline.train.ema import EMASchedule

    cfg = load_config(REPO / "configs" / "cifar10_paper.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.train.batch_size == 128 and cfg.train.total_steps == 800_000
    assert (cfg.optimizer.grad_clip, cfg.optimizer.grad_clip_per, cfg.optimizer.lr) == (1.0, 16, 2e-4)
    assert cfg.model.dropout == 0.1 and cfg.data.hflip and cfg.diffusion.variance == "fixedlarge"
    # the authors' utils.get_warmed_up_lr: lr * min(step / warmup, 1), step = the global step before the update
    oc = cfg.optimizer
    for step in (0, 1, 2500, 4999, 5000, 10**6):
        assert lr_at(step, oc.lr, oc.warmup_steps, oc.warmup_from_zero) == oc.lr * min(step / 5000, 1.0)
    assert lr_at(0, oc.lr, oc.warmup_steps) == oc.lr / 5000  # our default reaches lr one step earlier
    # tpu_utils.make_ema: a copy, then the constant 0.9999 (no warm-up)
    schedule = EMASchedule(cfg.ema)
    assert cfg.ema.warmup == "none" and schedule.next() == ("copy", 1.0)
    kind, weight = schedule.next()
    assert kind == "lerp" and weight == float(1 - torch.tensor(0.9999, dtype=torch.float32))  # float32, as theirs
    # 8 groups of 16 on 1, 2, 4 or 8 processes
    for world in (1, 2, 4, 8):
        check_group_clip(cfg, deepspeed=False, world=world)
        assert batch_split(128, oc.grad_clip_per, world) == (16, 8 // world)


@pytest.mark.parametrize(("overrides", "deepspeed", "world", "message"), [
    ([], True, 1, "not supported under DeepSpeed"),
    (["train.micro_batch_per_gpu=32"], False, 1, "set train.micro_batch_per_gpu=0 \\(or 16\\), not 32"),
    (["train.batch_size=96"], False, 4, "train.batch_size=96 must be a multiple of 16 images x 4 processes = 64"),
    (["train.grad_comm_dtype=bf16"], False, 2, "set train.grad_comm_dtype=fp32"),
    (["train.mixed_precision=fp16"], False, 1, "fp16 is not supported"),
])
def test_what_per_group_clipping_does_not_support_is_refused(overrides, deepspeed, world, message):
    cfg = load_config(REPO / "configs" / "cifar10_paper.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        check_group_clip(cfg, deepspeed=deepspeed, world=world)


def test_grad_clip_per_needs_a_clip_bound():
    with pytest.raises(ConfigError, match="optimizer.grad_clip_per=16 clips each group's gradient to optimizer.grad_clip"):
        load_config(REPO / "configs" / "cifar10_paper.yaml", ["optimizer.grad_clip=0"])


# ------------------------------------------------------------------------ per-group clipping, in process


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
                               torch.nn.Linear(16, 3))


def _groups(n: int = 4, size: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # groups of different scales, so that some gradients exceed the bound and some do not
    return [(torch.randn(size, 4, generator=g) * (0.3 + i), torch.randn(size, 3, generator=g)) for i in range(n)]


def _loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (net(x) - y).square().mean()


def _by_hand(groups, clip: float) -> tuple[list[torch.Tensor], list[float]]:
    """The average over the groups of each group's gradient clipped to global norm ``clip`` (plain backward per group,
    torch's clip_grad_norm_), and the groups' norms before clipping."""
    net = _small_net()
    total, norms = None, []
    for x, y in groups:
        net.zero_grad(set_to_none=True)
        _loss(net, x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip)))
        grads = [p.grad.clone() for p in net.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [t / len(groups) for t in total], norms


def _prepared(net: torch.nn.Module):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    adam = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    module, wrapped = acc.prepare(net, adam)
    return acc, module, adam, wrapped


def test_group_clip_averages_the_groups_clipped_one_by_one_as_a_hand_computation():
    groups = _groups()
    want, norms = _by_hand(groups, clip=2.0)
    assert min(norms) < 2.0 < max(norms)  # some groups clipped, some not: the rule matters here
    acc, module, adam, wrapped = _prepared(_small_net())
    clip = GroupClip(acc, module, 2.0, groups=len(groups))
    for x, y in groups:
        acc.backward(_loss(module, x, y))
        clip.add()
        assert all(p.grad is None for p in module.parameters())  # each group's gradient is taken on its own
    mean_norm = clip.finish()
    got = [p.grad for p in module.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert float(mean_norm) == pytest.approx(sum(norms) / len(norms), rel=1e-6)
    # clipping the averaged gradient once (optimizer.grad_clip_per=0) gives another gradient
    net = _small_net()
    sum(_loss(net, x, y) for x, y in groups).div(len(groups)).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
    assert max(float((p.grad - w).abs().max()) for p, w in zip(net.parameters(), want)) > 1e-2


def test_one_group_per_step_is_bitwise_the_global_rule_and_a_nan_group_skips_the_step():
    (x, y), = _groups(1, size=12)
    results = []
    for per_group in (False, True):
        acc, module, adam, wrapped = _prepared(_small_net())
        clip = GroupClip(acc, module, 1.0, groups=1) if per_group else None
        step = OptimizerStep(acc, module, adam, wrapped, 1.0, deepspeed=False, group_clip=clip)
        norms = []
        for _ in range(3):
            acc.backward(_loss(module, x, y) * 40.0)  # norm > 1: clipped
            if clip is not None:
                clip.add()
            applied, norm = step.step(1e-2)
            assert bool(applied)
            norms.append(float(norm))
        results.append(({k: v.clone() for k, v in module.state_dict().items()}, norms))
    (plain, plain_norms), (grouped, grouped_norms) = results
    assert plain_norms == grouped_norms and plain_norms[0] > 1.0
    assert all(torch.equal(plain[k], grouped[k]) for k in plain)  # optimizer.grad_clip_per=batch: today's step

    groups = _groups()
    acc, module, adam, wrapped = _prepared(_small_net())
    clip = GroupClip(acc, module, 1.0, groups=len(groups))
    step = OptimizerStep(acc, module, adam, wrapped, 1.0, deepspeed=False, group_clip=clip)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for i, (x, y) in enumerate(groups):
        acc.backward(_loss(module, x * float("nan") if i == 2 else x, y))
        clip.add()
    applied, _ = step.step(1e-2)
    assert not bool(applied)  # one non-finite group: the step is skipped, the weights untouched
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    for x, y in groups:  # the next step starts from fresh sums
        acc.backward(_loss(module, x, y))
        clip.add()
    applied, norm = step.step(1e-2)
    assert bool(applied) and math.isfinite(float(norm))
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())


# ------------------------------------------------------------- per-group clipping in the trainer, by hand

GROUP = 2  # images per group; the tiny runs' batch of 8 is 4 groups


@pytest.fixture(scope="module")
def same_image(tmp_path_factory):
    """Shards of one repeated digit: every micro-batch holds the same images on any rank, in any order."""
    return h.prepare_identical(tmp_path_factory.mktemp("same") / "shards")


def _tiny_cfg(shards: Path, extra: list[str] = ()):
    return load_config(REPO / "configs" / "digits.yaml", [*h.TINY, f"data.shards={shards}", *extra])


def _group_grads(cfg, shards: Path) -> list[list[torch.Tensor]]:
    """Each group's gradient at step 0 as the trainer draws it: the seeded U-Net, the micro-batch's seeded t, noise
    and dropout (micro_seed of its index in the global batch), a plain backward of its mean loss."""
    from pipeline.data.sequential import split_batches
    from pipeline.model.diffusion import DDPMLoss, Diffusion
    from pipeline.model.unet import UNet

    image = next(iter(split_batches(str(shards), "train", 1)))["image"]
    torch.manual_seed(cfg.train.seed)
    with warnings.catch_warnings():  # the tiny runs' T = 100 leaves signal in x_T: irrelevant to one step
        warnings.simplefilter("ignore", UserWarning)
        diffusion = Diffusion(cfg.diffusion)
        loss_fn = DDPMLoss(UNet(cfg.model), diffusion).train()
    noise = StepNoise(cfg.train.seed, diffusion.num_timesteps, torch.device("cpu"))
    out = []
    for m in range(cfg.train.batch_size // GROUP):  # group m: the m-th micro-batch of the step's global batch
        seed_generators(micro_seed(cfg.train.seed, 0, m), torch.device("cpu"))
        t, eps = noise.draw(0, m * GROUP, (GROUP, *image.shape[1:]))
        loss_fn.zero_grad(set_to_none=True)
        loss_ps, _ = loss_fn(image.expand(GROUP, -1, -1, -1).contiguous(), t, eps)
        loss_ps.float().mean().backward()
        out.append([p.grad.clone() for p in loss_fn.net.parameters()])
    return out


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.nn.utils.get_total_norm(grads))


def _clipped(grads: list[torch.Tensor], bound: float) -> list[torch.Tensor]:
    """clip_grad_norm_'s arithmetic: each tensor times min(bound / (global norm + 1e-6), 1)."""
    coef = torch.clamp(bound / (torch.nn.utils.get_total_norm(grads) + 1e-6), max=1.0)
    return [g * coef for g in grads]


def _average(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(g[i] for g in groups) / len(groups) for i in range(len(groups[0]))]


def _weights_after(cfg, grad: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The U-Net after the trainer's first Adam step with this gradient."""
    from pipeline.model.unet import UNet

    torch.manual_seed(cfg.train.seed)
    net = UNet(cfg.model)
    oc = cfg.optimizer
    adam = torch.optim.Adam(net.parameters(), lr=lr_at(0, oc.lr, oc.warmup_steps, oc.warmup_from_zero),
                            betas=(oc.adam_beta1, oc.adam_beta2), eps=oc.adam_eps, fused=True)
    for p, g in zip(net.parameters(), grad):
        p.grad = g.clone()
    adam.step()
    return {k: v.detach() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def by_hand(same_image):
    """The clip bound (between the smallest and largest group norm) and the weights after one step by hand under
    each rule. Adam with eps >> |g| and lr = eps moves each weight by about its gradient (no sign-like first step),
    so the weights show the gradient's size, not only its direction."""
    step_keys = ["optimizer.warmup_steps=0", "optimizer.lr=1e4", "optimizer.adam_eps=1e4", "train.total_steps=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, oversubscribed threads make these small ops far slower
    try:
        grads = _group_grads(_tiny_cfg(same_image, step_keys), same_image)
    finally:
        torch.set_num_threads(threads)
    norms = sorted(_norm(g) for g in grads)
    bound = math.sqrt(norms[0] * norms[-1])
    assert norms[0] < bound < norms[-1]
    cfg = _tiny_cfg(same_image, [*step_keys, f"optimizer.grad_clip={bound!r}"])
    per_group = _average([_clipped(g, bound) for g in grads])
    once = _clipped(_average(grads), bound)
    return step_keys + [f"optimizer.grad_clip={bound!r}"], _weights_after(cfg, per_group), _weights_after(cfg, once)


def _trained(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in h.params(ckpt).items()}


def _assert_matches(trained, want, other):
    assert trained.keys() == want.keys()
    assert max(float((trained[k] - want[k]).abs().max()) for k in want) < 2e-6  # float32 rounding
    assert max(float((other[k] - want[k]).abs().max()) for k in want) > 1e-3  # the other rule: far off


def test_one_process_trains_with_the_hand_computed_per_group_step(same_image, by_hand, tmp_path):
    keys, per_group, once = by_hand
    r = h.run(h.train_cmd([f"data.shards={same_image}", f"train.out_dir={tmp_path}", *keys,
                           f"optimizer.grad_clip_per={GROUP}"]), h.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"micro batch {GROUP}, accumulation 4, each micro-batch's gradient clipped" in r.stdout
    _assert_matches(_trained(tmp_path / "step-00000001"), per_group, once)


@pytest.mark.slow
def test_two_gloo_processes_train_with_the_hand_computed_per_group_step(same_image, by_hand, tmp_path):
    keys, per_group, once = by_hand
    r = h.run(h.train_cmd([f"data.shards={same_image}", f"train.out_dir={tmp_path}", *keys,
                           f"optimizer.grad_clip_per={GROUP}"], nproc=2), h.launch_env(multi=True))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"world 2, micro batch {GROUP}, accumulation 2" in r.stdout
    _assert_matches(_trained(tmp_path / "step-00000001"), per_group, once)


# ----------------------------------------------------------------------------------- eval.protocol=paper


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


def test_paper_protocol_sets_every_key_and_a_given_key_wins_with_a_line(digits, tmp_path):
    cfg = tiny_config(digits, tmp_path / "run")  # eval.*: the digits settings of a training config
    cfg.eval.protocol = "paper"
    resolved, lines = apply_protocol(cfg, ["eval.protocol=paper"])
    assert {k: getattr(resolved.eval, k) for k in PAPER} == PAPER
    assert (resolved.eval.sampler, resolved.eval.num_samples, resolved.eval.fid_mode, resolved.eval.reference,
            resolved.eval.bpd_max_images, resolved.eval.bpd_timesteps) == (
        "ancestral", 50_000, "legacy_tensorflow", "clean-fid:cifar10/train/32", 10_000, 0)
    assert len(lines) == 1 and "eval.sampler=ancestral (config.yaml: ddim)" in lines[0]
    assert recorded_name(resolved) == "paper" and overridden(resolved) == {}

    overrides = ["eval.protocol=paper", "eval.num_samples=8", "eval.reference=train"]
    cfg = tiny_config(digits, tmp_path / "run", overrides)
    resolved, lines = apply_protocol(cfg, overrides)
    assert resolved.eval.num_samples == 8 and resolved.eval.reference == "train" and resolved.eval.sampler == "ancestral"
    assert "eval.num_samples=8 (protocol: 50000)" in lines[-1] and "'paper, modified'" in lines[-1]
    assert recorded_name(resolved) == "paper, modified"
    assert overridden(resolved) == {"num_samples": 8, "reference": "train"}


def test_paper_protocol_refuses_a_checkpoint_without_fixedlarge_and_what_cannot_run(digits, tmp_path, capsys):
    from evaluation.evaluate import main

    cfg = tiny_config(digits, tmp_path / "small", ["diffusion.variance=fixedsmall"])
    ckpt = write_checkpoint(cfg, 10)
    assert main(["--checkpoint", str(ckpt), "eval.protocol=paper", "--no-log"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has diffusion.variance=fixedsmall" in err
    assert "add diffusion.variance=fixedlarge" in err
    with pytest.raises(EvaluationError, match="diffusion.variance=fixedsmall"):
        apply_protocol(load_config(ckpt / "config.yaml", ["eval.protocol=paper"]), ["eval.protocol=paper"])
    # sampling that network with sigma_t^2 = beta_t, asked for in so many words, is the paper's sampler
    asked = ["eval.protocol=paper", "diffusion.variance=fixedlarge"]
    assert apply_protocol(load_config(ckpt / "config.yaml", asked), asked)[0].eval.sampler == "ancestral"
    # the digits extractor given against the protocol's Inception reference cannot run: refused, exit 2
    ckpt = write_checkpoint(tiny_config(digits, tmp_path / "large"), 10)
    assert main(["--checkpoint", str(ckpt), "eval.protocol=paper", "eval.feature_extractor=digits", "--no-log"]) == 2
    assert "needs eval.feature_extractor=inception" in capsys.readouterr().err


def test_paper_protocol_name_is_recorded_in_provenance_tags_and_compare(digits, tmp_path, empty_store, one_thread):
    from mlflow.tracking import MlflowClient

    from evaluation.compare import compare, load_runs
    from evaluation.evaluate import evaluate

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = training_run(uri)
    cfg = tiny_config(digits, tmp_path / "run")
    ckpt = write_checkpoint(cfg, 100, seed=1, run_id=run_id, tracking_uri=uri)
    # Table 1's protocol at CPU scale: digits features against the train shards, 6 samples, 4 test images
    small = ["eval.protocol=paper", "eval.feature_extractor=digits", "eval.reference=train", "eval.num_samples=6",
             "eval.bpd_max_images=4", "eval.kid_subset_size=6", "eval.grid_images=4"]
    r = evaluate(ckpt, small)
    p = r.provenance
    assert p["protocol"] == "paper, modified" and p["sampler"] == "ancestral" and p["sampler_steps"] == 20
    assert p["protocol_overrides"] == {"num_samples": 6, "feature_extractor": "digits", "reference": "train",
                                       "bpd_max_images": 4, "kid_subset_size": 6}
    assert p["variance"] == "fixedlarge" and p["spacing"] == "all" and p["weights"] == "ema"
    assert p["bpd"] == {"split": "test", "num_images": 4, "timesteps_k": "exact (all T)"}
    assert json.loads((Path(r.out_dir) / "provenance.json").read_text())["protocol"] == "paper, modified"
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["fid_protocol.digits.protocol"] == "paper, modified" and tags["fid_protocol.digits.spacing"] == "all"
    assert tags["fid_protocol.digits.sampler"] == "ancestral" and tags["fid_protocol.digits.num_samples"] == "6"

    # a second run evaluated with the config's own settings: compare names both protocols beside their FIDs
    other = training_run(uri, name="other")
    ckpt2 = write_checkpoint(tiny_config(digits, tmp_path / "run2"), 100, seed=1, run_id=other, tracking_uri=uri)
    assert evaluate(ckpt2, ["eval.num_samples=6", "eval.kid_subset_size=6", "eval.bpd_split=''"]).provenance[
        "protocol"] == "custom"
    result = compare(load_runs(uri, "eval-test", 10), experiment="eval-test", out_dir=tmp_path / "cmp")
    rows = {line.split()[0]: line for line in result.table.splitlines()[2:]}
    assert "paper, modified, n=6" in rows["tiny"] and "custom, n=6" in rows["other"]
    (warning,) = result.warnings
    assert "sampler: tiny=ancestral, other=ddim" in warning
    assert "protocol names: tiny=paper, modified, other=custom" in warning


# ------------------------------------------------------------------------------------ the authors' decoder


def test_tanh_decoder_matches_the_authors_formula_and_the_exact_one_within_1e_3():
    from pipeline.model.diffusion import (
        discretized_gaussian_log_likelihood,
        discretized_gaussian_log_likelihood_tanh,
    )

    x = (torch.arange(256, dtype=torch.float32) / 127.5 - 1.0).repeat(3)
    mean = x + torch.linspace(-0.05, 0.05, x.numel())
    log_scale = torch.full_like(x, math.log(0.01))
    approx = discretized_gaussian_log_likelihood_tanh(x, mean, log_scale)
    # the authors' expression evaluated by hand at one interior bin
    z_plus, z_min = (x[100] - mean[100] + 1 / 255) / 0.01, (x[100] - mean[100] - 1 / 255) / 0.01

    def cdf(z: float) -> float:
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    assert float(approx[100]) == pytest.approx(math.log(max(cdf(float(z_plus)) - cdf(float(z_min)), 1e-12)), rel=1e-5)
    exact = discretized_gaussian_log_likelihood(x, mean, log_scale).float()
    probs = approx.exp()
    assert float((probs - exact.exp()).abs().max()) < 1e-3  # the approximation's CDF error is below 3e-4
    assert float((approx - exact).abs().max()) > 0  # and it is an approximation
