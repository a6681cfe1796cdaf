"""EMAs of the U-Net weights: ema-pytorch's schedule, several decays and EDM2's power-function EMAs at once,
updated with no host sync and never from a skipped step.

The EMAs of a run (``pipeline.config.EMAConfig``):

- the **primary** EMA, ``ema.decay`` (``ema.safetensors``, what evaluation and the sample grids use);
- more **classic** EMAs, ``ema.decays`` (``ema-decay<d>.safetensors``), on the same schedule;
- **power-function** EMAs, ``ema.posthoc.sigma_rels`` (``ema-sigma<s>.safetensors``; Karras et al. 2024, EDM2):
  ``beta_t = (1 - 1/t)^(gamma + 1)``, ``t`` = optimizer steps applied so far, gamma from sigma_rel (EDM2 eq. 4),
  with snapshots every ``ema.posthoc.snapshot_every_steps`` written into the checkpoint of that step, from
  which ``pipeline.checkpoint.posthoc`` synthesizes the EMA of any other sigma_rel after training.

The classic schedule is ema-pytorch's (0.8), kept to the bit: after n updates the decay is
``min(decay, 1 - (1 + n - warmup_steps - 1)^-power)`` (0 before that), the first update and every update
up to ``warmup_steps`` copy the weights, and only every ``update_every``-th update averages
(``ema.warmup=none``: the authors' plain EMA, the constant ``decay`` after the copy). How an update runs:

- ``update(ok)`` takes a 0-d device tensor ``ok`` (1 = the optimizer step was applied, 0 = it was skipped
  because the gradients were not finite). Each EMA's lerp weight is ``ok * w`` on the device, so a skipped
  step leaves every EMA bit-for-bit unchanged and the host never reads ``ok``; a power-function EMA's ``t``
  is a device counter that advances by ``ok`` (a skipped step is not on its time axis at all).
- Classic counters are host integers and ``w`` is computed on the host with torch's CPU kernels, exactly as
  ema-pytorch computes it (its rounding included), so the primary EMA equals ema-pytorch's bit for bit
  (tests/test_ema.py). Power weights are computed on the device from ``t`` (float64, then float32).
- All EMAs live as the rows of one fp32 matrix (R EMAs x N weights), so an update is one ``lerp_`` of the
  matrix towards the (broadcast) flat live weights with a column of per-EMA weights: one kernel for any number
  of EMAs, instead of one per tensor and EMA (torch's ``_foreach_lerp_`` with tensor weights runs per tensor
  on CUDA; its fused scalar-list overload would need the host to read ``ok``). Elementwise it is the same
  ``lerp`` as ema-pytorch's, so the bits are the same.

Two layouts:

- ``EMA`` (one process, DDP): the rows hold the U-Net's floating tensors (parameters, then buffers, in memory
  order); the live U-Net's are copied into one flat buffer per update (one kernel) and the rows lerp towards it.
  The primary EMA network's tensors are views of row 0.
- ``PartitionedEMA`` (DeepSpeed ZeRO-1/2/3): each rank keeps R rows per fp32 master partition its ZeRO optimizer
  owns (``pipeline.train.ema_deepspeed.ZeroLayout``), one ``lerp_`` per parameter group and no collective; no rank
  holds a full copy. An EMA is gathered (one collective per group) only for checkpoints (its snapshots
  included), sample grids and the end, and only global rank 0 materialises it.

Each EMA is a checkpoint part (``parts()``): the primary saves ``{"weights", "num_updates", "initted"}`` as
today (older checkpoints resume, other readers keep working); a classic one adds ``decay``; a power one saves
``{"weights", "t", "sigma_rel", "gamma"}`` and writes its snapshots (``write_files``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import dist
from pipeline.checkpoint.folder import PRIMARY, ema_name, part_name
from pipeline.checkpoint.posthoc import link_or_copy, sigma_rel_to_gamma, snapshot_file, write_snapshot
from pipeline.config import EMAConfig
from pipeline.files import JSON_MAX_BYTES, read_json
from pipeline.train.ema_deepspeed import ZeroLayout


class EMASchedule:
    """ema-pytorch's counters and decay warm-up on the host: what the next update does, and its lerp weight."""

    def __init__(self, cfg: EMAConfig, decay: float | None = None):
        self.beta = cfg.decay if decay is None else decay
        self.update_after_step, self.update_every, self.power = cfg.warmup_steps, cfg.update_every, cfg.power
        self.plain = cfg.warmup == "none"
        self.num_updates, self.initted = 0, False
        self._capped: float | None = None  # the weight once the decay has reached its cap (it stays there)

    def next(self) -> tuple[str, float]:
        """Advance one update: ("copy" | "lerp" | "none", lerp weight of an applied step).

        As ema-pytorch's ``EMA.update``: the first call copies; then every ``update_every``-th call copies
        while the count is at most ``warmup_steps``, averages after that. The copy is not masked (a skipped
        step left the weights as they were, and ema-pytorch copies them regardless). Decay 1 (frozen) averages
        with weight 0.
        """
        step = self.num_updates
        self.num_updates += 1
        if not self.initted:
            self.initted = True
            return "copy", 1.0
        if step % self.update_every:
            return "none", 0.0
        if step <= self.update_after_step:
            return "copy", 1.0
        if self.beta == 1.0:  # ema-pytorch's is_frozen
            return "lerp", 0.0
        return "lerp", self.weight(self.num_updates)

    def weight(self, num_updates: int) -> float:
        """The lerp weight after ``num_updates`` updates: ``1 - (1 - (1 - decay) * ok)`` at ok = 1, in float32.

        The same torch ops on the same dtypes as ema-pytorch's ``get_current_decay`` (int64 counter, float32
        decay) and as the mask multiplied into it before, on CPU tensors read through numpy: no device and
        no ``_local_scalar_dense``. Once the decay reaches ``beta`` it stays there and is not recomputed.
        ``ema.warmup=none``: ``1 - decay`` in float32 from the start (the authors' ``1 - decay``).
        """
        if self._capped is not None:
            return self._capped
        one = torch.ones((), dtype=torch.float32, device="cpu")
        if self.plain:
            self._capped = float((one - torch.tensor(self.beta, dtype=torch.float32)).numpy())
            return self._capped
        epoch = (torch.tensor(num_updates, device="cpu") - self.update_after_step - 1).clamp(min=0.0)
        if num_updates - self.update_after_step - 1 <= 0:
            decay = 0.0
        else:
            value = 1 - (1 + epoch / 1.0) ** -self.power  # inv_gamma = 1
            decay = float(value.clamp(min=0.0, max=self.beta).numpy())
        w = float((1.0 - (1.0 - (1.0 - decay) * one)).numpy())
        if decay == float(torch.tensor(self.beta, dtype=torch.float32).numpy()):
            self._capped = w
        return w

    def state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "initted": self.initted}

    def load(self, state: dict[str, Any]) -> None:
        self.num_updates, self.initted = int(state["num_updates"]), bool(state["initted"])


def _float_named(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The floating parameters and buffers ema-pytorch averages, in its order (parameters, then buffers)."""
    return ([(n, p) for n, p in module.named_parameters() if p.is_floating_point()]
            + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()])


def _float_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in _float_named(module)]


def _finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN/inf in any of the tensors (one host sync: checkpoints only)."""
    tensors = [t for t in tensors if t.numel()]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()) if tensors else True


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 CPU copy (never a view of the EMA: a saved state must not change afterwards)."""
    return torch.empty(t.shape, dtype=torch.float32).copy_(t.detach())


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor (contiguous or channels-last) in memory order, as a 1-d view."""
    if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
        raise ValueError(f"the EMA needs dense weights; a tensor of shape {tuple(t.shape)} has strides {t.stride()}")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class _Bank:
    """What the two layouts share: the EMAs' names and schedules, the per-step weight column, the parts."""

    def __init__(self, cfg: EMAConfig, device: torch.device, snapshot_every: int | None):
        self.cfg = cfg
        self.classic = [EMASchedule(cfg)] + [EMASchedule(cfg, d) for d in cfg.decays]
        self.sigma_rels = list(cfg.posthoc.sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names = ([PRIMARY] + [ema_name("decay", d) for d in cfg.decays]
                      + [ema_name("sigma", s) for s in self.sigma_rels])
        self.snapshot_every = cfg.posthoc.snapshot_every_steps if snapshot_every is None else snapshot_every
        self._t = torch.zeros((), dtype=torch.int64, device=device)  # steps applied: the power EMAs' time
        self._exp = torch.tensor([g + 1.0 for g in self.gammas], dtype=torch.float64, device=device)
        self._parts: dict[str, Any] = {}

    @property
    def num_updates(self) -> int:
        return self.classic[0].num_updates

    @property
    def schedule(self) -> EMASchedule:
        """The primary EMA's schedule."""
        return self.classic[0]

    @property
    def num_classic(self) -> int:
        return len(self.classic)

    def _advance(self, ok: torch.Tensor | None, device: torch.device) -> tuple[str, int, torch.Tensor | None]:
        """Advance every schedule one update: (classic phase, first row to lerp, lerp weights (rows, 1) on
        ``device``, or None when no row averages). No host sync."""
        phases = [s.next() for s in self.classic]
        phase = phases[0][0]  # the classic counters move together: one phase for all
        okf = None if ok is None else ok.to(device=device, dtype=torch.float32)
        cols = []
        first = len(self.classic)
        if phase == "lerp":
            first = 0
            ws = [w for _, w in phases]
            # ok * w in float32 on the device: exactly w or 0 (w is a float32 number)
            cols.append(torch.stack([okf * w for w in ws]) if okf is not None
                        else torch.tensor(ws, dtype=torch.float32, device=device))
        if self.sigma_rels:
            self._t += 1 if ok is None else ok.to(device=device, dtype=torch.int64)
            beta = (1.0 - 1.0 / self._t.to(torch.float64).clamp(min=1.0)) ** self._exp  # 0 at t = 1: a copy
            wp = (1.0 - beta).to(torch.float32)
            cols.append(wp * okf if okf is not None else wp)
        if not cols:
            return phase, first, None
        return phase, first, torch.cat(cols).unsqueeze(1)

    def row_state(self, i: int) -> dict[str, Any]:
        """Everything but the weights of EMA ``i`` (what its file's metadata holds). A host read of ``t``:
        checkpoints only."""
        if i < len(self.classic):
            extra = {} if i == 0 else {"decay": self.classic[i].beta}
            return {**self.classic[i].state(), **extra}
        j = i - len(self.classic)
        return {"t": int(self._t), "sigma_rel": self.sigma_rels[j], "gamma": self.gammas[j]}

    def load_row_state(self, i: int, state: dict[str, Any]) -> None:
        if i < len(self.classic):
            self.classic[i].load(state)
            return
        self._t.fill_(int(state["t"]))

    def snapshot_due(self, step: int) -> bool:
        """A power-EMA snapshot belongs to this step (the trainer writes a checkpoint there)."""
        return bool(self.sigma_rels) and self.snapshot_every > 0 and step > 0 and step % self.snapshot_every == 0

    def parts(self) -> dict[str, Any]:
        """The checkpoint parts: ``{"ema": primary, "ema-decay<d>": ..., "ema-sigma<s>": ...}``."""
        if not self._parts:
            self._parts = {"ema": self}
            for i, name in enumerate(self.names[1:], start=1):
                cls = _ClassicPart if i < len(self.classic) else _PowerPart
                self._parts[part_name(name)] = cls(self, i)
        return self._parts

    # the layouts provide these
    def gather_row(self, i: int, *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def load_row(self, i: int, weights: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class _ClassicPart:
    """One more classic EMA of a bank, as a checkpoint part (``ema-decay<d>.safetensors``)."""

    def __init__(self, bank: _Bank, index: int):
        self.bank, self.index, self.name = bank, index, bank.names[index]
        self._gathered: dict[str, torch.Tensor] | None = None

    def prepare_state_dict(self) -> None:
        """Under ZeRO, gather the EMA to rank 0 (every rank calls this: a collective); else nothing."""
        if isinstance(self.bank, PartitionedEMA):
            self._gathered = self.bank.gather_row(self.index)

    def state_dict(self) -> dict[str, Any]:
        weights, self._gathered = self._gathered, None
        if weights is None:
            if isinstance(self.bank, PartitionedEMA) and dist.world_size() > 1:
                raise RuntimeError("an EMA part's state_dict() needs prepare_state_dict() on every rank first")
            weights = self.bank.gather_row(self.index)
        return {"weights": weights, **self.bank.row_state(self.index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_row(self.index, state["weights"])
        self.bank.load_row_state(self.index, state)


class _PowerPart(_ClassicPart):
    """A power-function EMA as a checkpoint part (``ema-sigma<s>.safetensors``) that also keeps its snapshots.

    Snapshot files (``posthoc/sigma<s>-step<NNNNNNNN>.safetensors``, ``ema.posthoc.snapshot_dtype``) are written
    once, into the checkpoint of their step; each later checkpoint holds every snapshot so far as a hard link to
    that file (a copy where the file system has no hard links), so keep-k may delete any folder, and each
    folder's sha256 record and verification cover all its snapshots. A snapshot's sha256 is computed once,
    when it is written, and carried from folder to folder (``attach`` reads it back from meta.json).
    """

    def __init__(self, bank: _Bank, index: int):
        super().__init__(bank, index)
        self._home: Path | None = None  # the newest checkpoint folder holding our snapshots
        self._known: dict[str, str] = {}  # snapshot file (relative) -> sha256, all in _home
        self._last: dict[str, Any] | None = None  # the state just taken, for write_files

    def state_dict(self) -> dict[str, Any]:
        self._last = super().state_dict()
        return self._last

    def write_files(self, folder: Path, step: int) -> dict[str, str]:
        """Rank 0, in a checkpoint being written at ``step``: link the snapshots so far into ``folder`` and write
        this step's when one is due; returns {relative path: sha256} of every snapshot file there."""

        state, self._last = self._last, None
        out = {}
        for rel, digest in sorted(self._known.items()):
            if _snapshot_step(rel) < step and self._home is not None:
                link_or_copy(self._home / rel, folder / rel)
                out[rel] = digest
        if self.bank.snapshot_due(step):
            if state is None:
                raise RuntimeError("write_files() follows state_dict() in the same checkpoint")
            rel = snapshot_file(self.name, step)
            out[rel] = write_snapshot(folder / rel, state, step=step, dtype=self.bank.cfg.posthoc.snapshot_dtype)
        return out

    def attach(self, folder: Path) -> None:
        """Our snapshots are now in ``folder`` (a checkpoint just published, or the one resumed from)."""
        self._home = Path(folder)
        recorded = read_json(self._home / "meta.json", max_bytes=JSON_MAX_BYTES, what="meta.json").get("sha256", {})
        prefix = f"posthoc/{self.name}-step"
        self._known = {rel: digest for rel, digest in recorded.items() if rel.startswith(prefix)}


def _snapshot_step(rel: str) -> int:
    return int(rel.rsplit("-step", 1)[1].split(".")[0])


class EMA(_Bank):
    """The fp32 EMAs of ``source`` (the live U-Net); identical on every rank because every rank sees the same
    weights. ``device``: where the EMAs live (the source's device). ``snapshot_every``: steps between power-EMA
    snapshots (default ``ema.posthoc.snapshot_every_steps``; the trainer resolves 0 to the checkpoint cadence)."""

    def __init__(self, source: nn.Module, cfg: EMAConfig, device: torch.device | str | None = None,
                 snapshot_every: int | None = None):
        self.source = source
        self.model = copy.deepcopy(source).float().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        named = _float_named(self.model)
        dev = named[0][1].device if named else torch.device("cpu")
        super().__init__(cfg, dev, snapshot_every)
        self._layout = [(n, t.shape, t.stride(), t.numel()) for n, t in named]
        offsets = [0]
        for _, _, _, numel in self._layout:
            offsets.append(offsets[-1] + numel)
        self._offsets, total = offsets[:-1], offsets[-1]
        self.rows = torch.empty(len(self.names), total, dtype=torch.float32, device=dev)
        for (_, t), off in zip(named, self._offsets):
            self.rows[:, off:off + t.numel()] = _flat_view(t.detach())
        self._bind(self.model, 0)
        self._src: tuple[list[torch.Tensor], torch.Tensor] | None = None  # source views, flat buffer

    def _row_view(self, i: int, k: int) -> torch.Tensor:
        """Tensor ``k`` of EMA ``i``, a view of the rows with the live tensor's shape and strides."""
        _, shape, stride, _ = self._layout[k]
        return self.rows.as_strided(shape, stride, self.rows.storage_offset() + i * self.rows.shape[1]
                                    + self._offsets[k])

    def _bind(self, module: nn.Module, i: int) -> None:
        """Make ``module``'s floating tensors views of EMA ``i``'s row (they were copied there)."""
        views = {name: self._row_view(i, k) for k, (name, *_) in enumerate(self._layout)}
        for mname, sub in module.named_modules():
            for pname, p in list(sub._parameters.items()):
                full = f"{mname}.{pname}" if mname else pname
                if p is not None and full in views:
                    p.data = views[full]
            for bname, b in list(sub._buffers.items()):
                full = f"{mname}.{bname}" if mname else bname
                if b is not None and full in views:
                    sub._buffers[bname] = views[full]

    def _flat_source(self) -> torch.Tensor:
        # Listed at the first update, when the source has reached its device (moving a module replaces its
        # tensors); the source is only updated in place after that.
        if self._src is None:
            src = _float_tensors(self.source)
            if [(t.shape, t.stride()) for t in src] != [(s, st) for _, s, st, _ in self._layout]:
                raise ValueError("the EMA copy and the live U-Net no longer have the same tensors")
            self._src = [_flat_view(t.detach()) for t in src], torch.empty_like(self.rows[0])
        views, flat = self._src
        torch.cat(views, out=flat)
        return flat

    @torch.no_grad()
    def update(self, ok: torch.Tensor | None = None) -> None:
        """One EMA step of every EMA after one optimizer step; ``ok`` (0-d float tensor on the weights' device)
        masks it."""
        phase, first, col = self._advance(ok, self.rows.device)
        if phase != "copy" and col is None:
            return
        src = self._flat_source()
        if phase == "copy":
            c = self.num_classic
            self.rows[:c].copy_(src.expand(c, -1))
        if col is not None:
            rows = self.rows[first:]
            rows.lerp_(src.expand_as(rows), col)

    def weights(self, name: str = PRIMARY) -> dict[str, torch.Tensor]:
        """An EMA U-Net's state_dict in fp32 on the CPU (what its safetensors file holds)."""
        i = self.names.index(name)
        out = {k: _cpu(v) if v.is_floating_point() else v.detach().cpu().clone()
               for k, v in self.model.state_dict().items()}
        if i:
            out.update({n: _cpu(self._row_view(i, k)) for k, (n, *_) in enumerate(self._layout)})
        return out

    def gather_row(self, i: int, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
        return self.weights(self.names[i])

    def load_row(self, i: int, weights: dict[str, torch.Tensor]) -> None:
        missing = [n for n, *_ in self._layout if n not in weights]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for k, (n, *_) in enumerate(self._layout):
            self._row_view(i, k).copy_(weights[n])

    # the same interface as PartitionedEMA: nothing to gather, every rank has everything
    def gather_weights(self, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
        return self.weights()

    def gather_source(self, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
        """The live weights' state_dict (what the EMA averages)."""
        return self.source.state_dict()

    def gathered_model(self) -> nn.Module:
        """The primary EMA network (no collective here; its train/eval mode is the caller's business)."""
        return self.model

    def source_tensors(self) -> list[torch.Tensor]:
        """The live weights the EMA reads (a test hook poisons one)."""
        return list(self.source.parameters())

    def all_finite(self) -> bool:
        """Live weights and EMAs free of NaN/inf (the same answer on every rank: they hold the same weights)."""
        return _finite(_float_tensors(self.source)) and _finite(list(self.rows.unbind(0)))

    def prepare_state_dict(self) -> None:
        """Nothing to gather (CheckpointManager calls this on every rank before rank 0 saves)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the primary EMA is: its weights (fp32, CPU) and ema-pytorch's warm-up counters."""
        return {"weights": self.weights(), **self.schedule.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.schedule.load(state)


class PartitionedEMA(_Bank):
    """The EMAs of DeepSpeed's fp32 master weights, partitioned like them: rank r averages the slice its ZeRO
    optimizer owns. ``build()`` makes a U-Net (for the gathered EMA network on rank 0, sampled on ``device``)."""

    def __init__(self, engine: Any, net: nn.Module, cfg: EMAConfig, build: Callable[[], nn.Module],
                 device: torch.device | str | None = None, snapshot_every: int | None = None):
        self.layout = ZeroLayout(engine, net)
        self.build, self.device = build, device
        masters = self.layout.masters
        super().__init__(cfg, masters[0].device, snapshot_every)
        # per parameter group: the EMAs' partitions as the rows of one matrix
        self.rows = [m.detach().float().unsqueeze(0).repeat(len(self.names), 1) for m in masters]
        self.flats = [r[0] for r in self.rows]  # the primary EMA's partitions
        self._gathered: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, ok: torch.Tensor | None = None) -> None:
        """One step of every EMA on this rank's partitions; no collective, no host sync."""
        phase, first, col = self._advance(ok, self.rows[0].device)
        c = self.num_classic
        for rows, master in zip(self.rows, self.layout.masters, strict=True):
            if phase == "copy":
                rows[:c].copy_(master.expand(c, -1))
            if col is not None:  # (ZeRO-Offload keeps the master weights on the CPU: there ``ok`` is copied over,
                mine = rows[first:]  # a sync)
                mine.lerp_(master.float().expand_as(mine), col.to(rows.device))

    def gather_row(self, i: int, *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """EMA ``i`` (U-Net state_dict, fp32, CPU) on global rank 0 (every rank with ``everywhere``); None
        elsewhere. A collective: every rank calls it."""
        return self.layout.gather([r[i] for r in self.rows], everywhere=everywhere)

    def load_row(self, i: int, weights: dict[str, torch.Tensor]) -> None:
        """Each rank takes its slices of the full EMA (no collective)."""
        self.layout.scatter(weights, [r[i] for r in self.rows])

    def gather_weights(self, *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """The full primary EMA on global rank 0 (every rank with ``everywhere``); None elsewhere. A collective."""
        return self.gather_row(0, everywhere=everywhere)

    def gather_source(self, *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """DeepSpeed's full fp32 master weights, as gather_weights."""
        return self.layout.gather(self.layout.masters, everywhere=everywhere)

    def gathered_model(self) -> nn.Module | None:
        """The primary EMA network on global rank 0 (built for the occasion, on ``device``), None elsewhere. A
        collective: every rank calls it."""
        weights = self.gather_weights()
        if weights is None:
            return None
        with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the global RNG alone
            net = self.build()
        net.load_state_dict(weights)
        return net.to(self.device or self.flats[0].device).requires_grad_(False)

    def source_tensors(self) -> list[torch.Tensor]:
        """The weights in this rank's fp32 master partitions, per parameter (a test hook poisons one)."""
        return self.layout.real(self.layout.masters)

    def all_finite(self) -> bool:
        """Master weights and EMAs free of NaN/inf on every rank: each checks its partitions, then all agree (a
        host all-reduce: every rank calls this, at checkpoints)."""
        mine = _finite(self.layout.real(self.layout.masters)) and all(
            _finite(self.layout.real([r[i] for r in self.rows])) for i in range(len(self.names)))
        return not dist.any_true(not mine)

    def prepare_state_dict(self) -> None:
        """Gather the full primary EMA to rank 0 (every rank, before rank 0 calls state_dict)."""
        self._gathered = self.gather_weights()

    def state_dict(self) -> dict[str, Any]:
        """As EMA.state_dict, on global rank 0 after prepare_state_dict()."""
        weights, self._gathered = self._gathered, None
        if weights is None:
            if dist.world_size() > 1:
                raise RuntimeError("PartitionedEMA.state_dict() needs prepare_state_dict() on every rank first")
            weights = self.gather_weights()
        return {"weights": weights, **self.schedule.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each rank takes its slices of the full EMA (no collective)."""
        self.load_row(0, state["weights"])
        self.schedule.load(state)
