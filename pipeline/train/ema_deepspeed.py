"""Where DeepSpeed keeps the fp32 master weights, and how to gather them (or an EMA laid out like them).

Each rank's ZeRO optimizer owns a slice of the fp32 master weights as one flat tensor per parameter
group, which its optimizer step updates in place; ``ZeroLayout`` finds those tensors and DeepSpeed's
own parameter -> slice mapping, so that an EMA can live in tensors shaped like them (one lerp per
group per step, no collective) and be gathered into a U-Net state_dict only when needed:

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``single_partition_of_fp32_groups[g]`` is rank r's slice
  ``[r * n, (r + 1) * n)`` of the group's flat buffer ``bit16_groups_flat[g]``; a parameter's place in that
  buffer is where DeepSpeed made its ``.data`` point (a view of the flat buffer, alignment padding between).
- ZeRO-1 with bf16 (``BF16_Optimizer``): the same with ``fp32_groups_flat_partition[g]`` and
  ``bf16_groups_flat[g]``.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``fp32_partitioned_groups_flat[g]`` concatenates, parameter by
  parameter of ``fp16_groups[g]``, rank r's piece ``[r * p, (r + 1) * p)`` of each flattened parameter
  (``p = param.partition_numel()``, the last piece zero-padded): DeepSpeed's ``grad_position`` layout.

A gather is one collective per group and bucket (``BUCKET_BYTES`` on the receiving rank) into a CPU
buffer; only the receiving rank (global rank 0, the one that writes checkpoints) materialises the full
state, unless ``everywhere`` asks for it on every rank (test digests). torch.distributed is called
directly here: these collectives run on DeepSpeed's own data-parallel groups, with device tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 256 << 20  # per gather, on the receiving rank: bounds the device memory a gather takes


@dataclass(frozen=True)
class _Param:
    name: str  # U-Net state_dict key
    shape: torch.Size
    numel: int
    offset: int  # ZeRO-1/2: in the group's full flat buffer; ZeRO-3: in each rank's partition
    piece: int  # ZeRO-3: elements of the parameter each rank holds (0 under ZeRO-1/2)


@dataclass(frozen=True)
class _Group:
    master: torch.Tensor  # this rank's fp32 master partition (DeepSpeed's tensor, updated in place)
    process_group: Any  # DeepSpeed's data-parallel group for it (None = the default group)
    world: int
    rank: int
    params: tuple[_Param, ...]


class ZeroLayout:
    """The fp32 master partitions of a DeepSpeed engine and the map from them to U-Net parameter names."""

    def __init__(self, engine: Any, net: nn.Module):
        # deepspeed: optional at run time (only under --use_deepspeed), ~3 s of import
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        opt = engine.optimizer
        names = {id(p): n for n, p in net.named_parameters()}
        if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            if getattr(opt, "swap_optimizer", False):
                raise ValueError("the EMA reads DeepSpeed's fp32 master partitions, which ZeRO-3 NVMe optimizer "
                                 "offload keeps on disk: use offload_optimizer.device cpu or none")
            self.stage, groups = 3, self._zero3(opt, names)
        elif isinstance(opt, DeepSpeedZeroOptimizer):
            self.stage = 2 if opt.partition_gradients else 1
            groups = self._flat(opt.bit16_groups, opt.bit16_groups_flat, opt.single_partition_of_fp32_groups,
                                opt.real_dp_process_group, names)
        elif isinstance(opt, BF16_Optimizer):
            self.stage = 1
            groups = self._flat(opt.bf16_groups, opt.bf16_groups_flat, opt.fp32_groups_flat_partition,
                                opt.real_dp_process_group, names)
        else:
            raise ValueError(f"the EMA follows a ZeRO optimizer's fp32 partitions; DeepSpeed made a "
                             f"{type(opt).__name__} here: use a ZeRO stage 1, 2 or 3 config")
        covered = sorted(p.name for g in groups for p in g.params)
        if covered != sorted(names.values()):
            missing = sorted(set(names.values()) ^ set(covered))[:3]
            raise ValueError(f"DeepSpeed's partitions do not cover the U-Net's parameters (e.g. {missing}); the EMA "
                             "needs every parameter trained by the ZeRO optimizer")
        self.groups: tuple[_Group, ...] = tuple(groups)

    @property
    def masters(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions, one flat tensor per group (DeepSpeed's, live)."""
        return [g.master for g in self.groups]

    def real(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the elements of this rank's ``flats`` that hold weights, without the padding (ZeRO-3 leaves
        the padding of the last piece uninitialised: it may hold anything, NaN included)."""
        out = []
        for group, flat in zip(self.groups, flats, strict=True):
            n, r = flat.numel(), group.rank
            for p in group.params:
                if p.piece:
                    lo, hi = p.offset, p.offset + max(0, min(p.piece, p.numel - r * p.piece))
                else:
                    lo, hi = max(p.offset, r * n) - r * n, min(p.offset + p.numel, (r + 1) * n) - r * n
                if lo < hi:
                    out.append(flat[lo:hi])
        return out

    # ---- discovery

    @staticmethod
    def _flat(lp_groups: list[list[nn.Parameter]], lp_flats: list[torch.Tensor], masters: list[torch.Tensor],
              process_groups: list[Any], names: dict[int, str]) -> list[_Group]:
        out = []
        for params, flat, master, pg in zip(lp_groups, lp_flats, masters, process_groups, strict=True):
            world, rank = dist.get_world_size(pg), dist.get_rank(pg)
            if flat.numel() != world * master.numel():
                raise ValueError(f"unexpected ZeRO layout: a flat group of {flat.numel()} elements is not {world} "
                                 f"partitions of {master.numel()}")
            base, size = flat.data_ptr(), flat.element_size()
            entries = []
            for p in params:
                offset = (p.data_ptr() - base) // size
                if not (p.is_contiguous() and offset >= 0 and offset + p.numel() <= flat.numel()):
                    raise ValueError(f"unexpected ZeRO layout: parameter {names.get(id(p), '?')} is not a view of "
                                     "its group's flat buffer")
                entries.append(_Param(names[id(p)], p.shape, p.numel(), offset, 0))
            out.append(_Group(master, pg, world, rank, tuple(entries)))
        return out

    @staticmethod
    def _zero3(opt: Any, names: dict[int, str]) -> list[_Group]:
        out = []
        pgs = getattr(opt, "sub_group_process_groups", None) or [opt.dp_process_group] * len(opt.fp16_groups)
        for params, master, pg in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat, pgs, strict=True):
            world, rank = dist.get_world_size(pg), dist.get_rank(pg)
            entries, offset = [], 0
            for p in params:
                piece = p.partition_numel()
                entries.append(_Param(names[id(p)], p.ds_shape, p.ds_numel, offset, piece))
                offset += piece
            if offset != master.numel():
                raise ValueError(f"unexpected ZeRO-3 layout: {offset} partitioned elements, master partition "
                                 f"{master.numel()}")
            out.append(_Group(master, pg, world, rank, tuple(entries)))
        return out

    # ---- full state <-> partitions

    def gather(self, flats: list[torch.Tensor], *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """U-Net state_dict (fp32, CPU) from partitions laid out like ``masters``: on global rank 0, or on every
        rank with ``everywhere``; None elsewhere. A collective: every rank calls it, in the same order."""
        rows = [_gather_rows(flat.detach().float(), group, everywhere) for group, flat in
                zip(self.groups, flats, strict=True)]  # (world, n) on CPU per group, None off the receiver
        return None if any(r is None for r in rows) else self.assemble(rows)

    def assemble(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """U-Net state_dict from every rank's partitions: ``rows[g][r]`` is rank r's partition of group g."""
        out = {}
        for group, full in zip(self.groups, rows, strict=True):
            for p in group.params:
                if p.piece:  # ZeRO-3: piece r of the parameter sits in row r
                    w = full[:, p.offset:p.offset + p.piece].reshape(-1)[:p.numel]
                else:  # ZeRO-1/2: the rows, concatenated, are the group's flat buffer
                    w = full.reshape(-1)[p.offset:p.offset + p.numel]
                out[p.name] = w.reshape(p.shape).clone()
        return out

    def scatter(self, weights: dict[str, torch.Tensor], flats: list[torch.Tensor]) -> None:
        """Fill this rank's ``flats`` (laid out like ``masters``) with its slices of the full ``weights``; no
        collective (every rank holds the full state, e.g. read from a checkpoint). Padding becomes 0."""
        missing = sorted({p.name for g in self.groups for p in g.params} - set(weights))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for group, flat in zip(self.groups, flats, strict=True):
            n, r = flat.numel(), group.rank
            mine = torch.zeros(n, dtype=flat.dtype)
            for p in group.params:
                w = weights[p.name].detach().reshape(-1).to(torch.float32)
                if p.piece:
                    lo, hi = r * p.piece, min((r + 1) * p.piece, p.numel)
                    if lo < hi:
                        mine[p.offset:p.offset + hi - lo] = w[lo:hi]
                else:
                    lo, hi = max(p.offset, r * n), min(p.offset + p.numel, (r + 1) * n)
                    if lo < hi:
                        mine[lo - r * n:hi - r * n] = w[lo - p.offset:hi - p.offset]
            flat.copy_(mine.to(flat.device))


def _gather_rows(flat: torch.Tensor, group: _Group, everywhere: bool) -> torch.Tensor | None:
    """Every rank's ``flat`` as the rows of a (world, n) CPU tensor, on the receiver(s); bucketed."""
    world, n = group.world, flat.numel()
    if world == 1:
        return flat.view(1, n).cpu()
    receiver = everywhere or dist.get_rank() == 0
    full = torch.empty(world, n, dtype=flat.dtype) if receiver else None
    step = max(1, BUCKET_BYTES // (flat.element_size() * world))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        send = flat[lo:hi].contiguous()
        recv = torch.empty(world, hi - lo, dtype=flat.dtype, device=flat.device) if receiver else None
        if everywhere:
            dist.all_gather(list(recv.unbind(0)), send, group=group.process_group)
        else:
            dist.gather(send, list(recv.unbind(0)) if receiver else None, dst=0, group=group.process_group)
        if full is not None:
            full[:, lo:hi].copy_(recv)
    return full
