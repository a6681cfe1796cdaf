"""Samplers: the paper's ancestral sampler (Algorithm 2, T steps) and DDIM (Song et al. 2021, K steps, η).

Seed derivation: image i uses its own CPU ``torch.Generator`` seeded with ``seeds[i]``; it draws x_T first
and then one noise tensor per stochastic step, in step order. So image i depends only on seeds[i] (and on
the sampler settings), never on the batch size, on which other images share its batch, or on the device
(noise is drawn on the CPU and then moved). Outputs are uint8 images (N, C, H, W).

On a GPU the draws cost the device nothing: a host thread draws each step's noise ahead, two steps at most,
into page-locked buffers, and the copy to the device does not block, so the host never waits for the device
inside the loop (``NoiseStream``). Per-image generators on the device (EDM's stacked generators) would be
cheaper still for the host, but a CUDA generator's stream is not the CPU's: the same seed would give another
image on another device, so they are not used.

Pure torch (docs/architecture.md).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.model.diffusion import Diffusion, _call_net

SPACINGS = ("uniform", "leading", "linspace", "trailing", "quadratic")


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The timesteps DDIM visits, ascending (the sampler walks them backwards), for T = num_timesteps, K = steps.

    - ``uniform``: the DDIM authors' ``range(0, T, T // K)``: K timesteps when K divides T, otherwise more
      (ceil(T / (T // K)): 31 for K = 30, ending at 990), so the walk always starts within T // K of T;
    - ``leading``: the first K of those (diffusers' ``leading``; this project's ``uniform`` before it matched the
      authors): 30 steps end at 957, 300 at 897, far from T;
    - ``linspace``: round(i (T - 1) / (K - 1)), i = 0..K-1 (diffusers' ``linspace``: 0 and T - 1 included);
    - ``trailing``: round((K - i) T / K) - 1, i = 0..K-1 (diffusers' ``trailing``: T - 1 and T / K - 1 included);
    - ``quadratic``: int((linspace(0, sqrt(0.8 T), K))²) (the DDIM authors' CIFAR-10 choice), dense near the data.

    linspace and trailing are computed in exact fractions, rounding halves to even as numpy does: diffusers'
    float version differs where a value is an exact half (T = 1000, K = 48), and its trailing list has K + 1
    entries, the last -1, for some T and K (T = 100, K = 29). Every list holds distinct timesteps in 0..T-1.
    """
    T, K = num_timesteps, steps
    if not 1 <= K <= T:
        raise ValueError(f"steps={K} must lie in 1..T={T} for DDIM")
    if spacing == "uniform":
        seq = list(range(0, T, T // K))
    elif spacing == "leading":
        seq = [i * (T // K) for i in range(K)]
    elif spacing == "linspace":
        seq = [round(Fraction(i * (T - 1), K - 1)) for i in range(K)] if K > 1 else [0]
    elif spacing == "trailing":
        seq = sorted(round(Fraction((K - i) * T, K)) - 1 for i in range(K))
    elif spacing == "quadratic":
        seq = [int(v) for v in np.linspace(0, math.sqrt(T * 0.8), K) ** 2]
        if len(set(seq)) != len(seq):
            raise ValueError(
                f"quadratic spacing with steps={K} repeats timesteps for T={T}; use fewer steps "
                "or spacing='uniform'"
            )
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(map(repr, SPACINGS))}")
    return seq


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    # Bin k of the 256 levels is centred at k/127.5 - 1, so round (not truncate).
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _draw(gens: list[torch.Generator], shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """(B, *shape) standard normals, row i from gens[i] (row.normal_ is torch.randn(shape, generator=g)'s draw)."""
    buf = torch.empty((len(gens), *shape), pin_memory=pin)
    for row, g in zip(buf, gens):
        row.normal_(generator=g)
    return buf


class NoiseStream:
    """The ``count`` noise tensors of one batch, in draw order, on ``device``: each image's from its own CPU
    generator, so an image does not depend on the device.

    ``prefetch`` (the default on a GPU): a host thread draws up to ``depth`` tensors ahead into page-locked
    memory and ``next()`` copies with ``non_blocking``: the host neither draws in the sampling loop nor waits for
    the device (torch's pinned-memory allocator keeps a buffer until its copy is done). Otherwise each draw
    happens in ``next()`` (on the CPU the network needs every core; a thread would only compete).
    """

    def __init__(self, gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device, count: int,
                 prefetch: bool | None = None, depth: int = 2) -> None:
        self.gens, self.shape, self.device, self.count = gens, tuple(shape), torch.device(device), count
        self.pin = self.device.type == "cuda"
        self.prefetch = self.pin if prefetch is None else prefetch
        self.taken = 0
        self._thread: threading.Thread | None = None
        if self.prefetch and count > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, name="sampling-noise", daemon=True)
            self._thread.start()

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless the consumer closed the stream first (then False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for _ in range(self.count):
                if not self._put(_draw(self.gens, self.shape, self.pin)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def next(self) -> torch.Tensor:
        if self.taken >= self.count:
            raise RuntimeError(f"NoiseStream: all {self.count} draws were taken")
        self.taken += 1
        if self._thread is None:
            return _draw(self.gens, self.shape, False).to(self.device)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        """Stop the thread (a loop that ended early leaves draws untaken)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> NoiseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ddim_steps(diffusion: Diffusion, seq: list[int], eta: float) -> list[tuple[int, float, float, float]]:
    """The DDIM loop's steps in its order (from seq[-1] down): (t, ᾱ_t, ᾱ_prev, σ), σ the noise scale of
    x_prev given x_t (ᾱ_prev = 1 after the last step)."""
    ac = diffusion.alphas_cumprod
    out = []
    for i in reversed(range(len(seq))):
        a_t = float(ac[seq[i]])
        a_prev = float(ac[seq[i - 1]]) if i > 0 else 1.0
        out.append((seq[i], a_t, a_prev, eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))))
    return out


@torch.no_grad()
def sample_batch(
    net: Callable,
    diffusion: Diffusion,
    gens: list[torch.Generator],
    shape: tuple[int, int, int],
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    spacing: str = "uniform",
    clip_denoised: bool = True,
    on_step: Callable[[int], None] | None = None,
    prefetch: bool | None = None,
) -> torch.Tensor:
    """One batch, one generator per image; returns float32 images (B, C, H, W) (about [−1, 1]).

    ``on_step(t)`` is called with each timestep the network is evaluated at. ``prefetch``: draw the noise
    ahead on a host thread (``NoiseStream``; default: on a GPU).
    """
    device = torch.device(device)
    B = len(gens)
    if sampler == "ancestral":
        # Algorithm 2: x_{t-1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I) except at the last step; σ_t² by diffusion.variance.
        with NoiseStream(gens, shape, device, diffusion.num_timesteps, prefetch) as noise:
            x = noise.next()
            for t_int in reversed(range(diffusion.num_timesteps)):
                if on_step is not None:
                    on_step(t_int)
                t = torch.full((B,), t_int, device=device, dtype=torch.long)
                mean, _, logvar, _ = diffusion.p_mean_variance(net, x, t, clip_denoised)
                x = mean + (0.5 * logvar).exp() * noise.next() if t_int > 0 else mean
        return x
    if sampler != "ddim":
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddim' or 'ancestral'")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise)")
    seq = ddim_timesteps(diffusion.num_timesteps, steps, spacing)
    plan = ddim_steps(diffusion, seq, eta)
    with NoiseStream(gens, shape, device, 1 + sum(sigma > 0 for *_, sigma in plan), prefetch) as noise:
        x = noise.next()
        for t_int, a_t, a_prev, sigma in plan:
            if on_step is not None:
                on_step(t_int)
            t = torch.full((B,), t_int, device=device, dtype=torch.long)
            out = _call_net(net, x, t).float()
            x0 = diffusion.model_output_to_x0(out, x, t)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            # ε consistent with the (clipped) x_0, so that η = 1 with all T steps is exactly the ancestral step.
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * noise.next()
    return x


def sample(
    net: nn.Module,
    diffusion: Diffusion,
    seeds: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    spacing: str = "uniform",
    progress: bool = False,
    clip_denoised: bool = True,
    image_shape: tuple[int, int, int] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Generate one image per seed; uint8 (N, C, H, W) on the CPU. Image i depends only on seeds[i].

    ``precision="bf16"`` runs the network under bf16 autocast (its convolutions and matmuls; the sampler's
    arithmetic stays fp32): faster on GPUs with bf16 units, and the images move by a few levels (docs/fid.md).

    ``net``: the raw U-Net (pass the EMA copy for evaluation); it runs in eval mode under no_grad and its
    train/eval mode is restored afterwards. ``sampler="ancestral"`` runs all T steps (``steps`` is ignored)
    with σ_t² from ``diffusion.variance``; ``"ddim"`` visits ``ddim_timesteps(T, steps, spacing)`` with noise
    scale ``eta`` (``steps`` of them; with ``uniform``, ceil(T / (T // steps)) when ``steps`` does not divide T).
    ``device`` defaults to the device of the network's parameters.
    """
    seeds = [int(s) for s in seeds]
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: choose 'fp32' or 'bf16'")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if sampler not in ("ddim", "ancestral"):
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddim' or 'ancestral'")
    if sampler == "ddim":
        ddim_timesteps(diffusion.num_timesteps, steps, spacing)  # validate before any work
    if image_shape is None:
        base = getattr(net, "_orig_mod", net)  # a torch.compile wrapper keeps the module here
        try:
            image_shape = (int(base.in_channels), int(base.image_size), int(base.image_size))
        except AttributeError as exc:
            raise ValueError("net has no in_channels/image_size attributes; pass image_shape=(C, H, W)") from exc
    if device is None:
        p = next(net.parameters(), None) if isinstance(net, nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    was_training = isinstance(net, nn.Module) and net.training
    if isinstance(net, nn.Module):
        net.eval()
    bar = None
    if progress:

        bar = tqdm(total=len(seeds), unit="img", desc=f"sampling ({sampler})")
    chunks = []
    try:
        for start in range(0, len(seeds), batch_size):
            gens = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16"):
                x = sample_batch(net, diffusion, gens, image_shape, sampler, steps, eta, device, spacing,
                                 clip_denoised)
            chunks.append(_to_uint8(x).cpu())
            if bar is not None:
                bar.update(len(gens))
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            net.train()
    if not chunks:
        return torch.empty((0, *image_shape), dtype=torch.uint8)
    return torch.cat(chunks)
