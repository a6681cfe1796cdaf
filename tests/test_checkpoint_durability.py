"""COMPLETE is written only after every payload file of the checkpoint, and its folder, reached the disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.checkpoint import folder as checkpoint
from pipeline.checkpoint import manager as ckpt_manager
from pipeline.config import load_config
from pipeline.train.ema import EMA

REPO = Path(__file__).resolve().parents[1]


def test_complete_is_written_after_an_fsync_of_every_file(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from pipeline.train.loop import Progress

    cfg = load_config(REPO / "configs" / "digits.yaml", ["data.shards=unused", f"train.out_dir={tmp_path}"])
    acc = Accelerator(cpu=True)
    lin = acc.prepare(torch.nn.Linear(3, 2))
    manager = ckpt_manager.CheckpointManager(tmp_path, cfg.checkpoint, accelerator=acc, record=cfg,
                                           parts={"meta": Progress(), "ema": EMA(lin, cfg.ema)})
    manager.start()
    synced: list[str] = []  # paths in the order they were fsynced
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = manager.save(3)
    tmp = str(tmp_path / ".tmp-step-00000003")
    rel = [p[len(tmp) + 1:] if p.startswith(tmp + "/") else ("." if p == tmp else None) for p in synced]
    assert "COMPLETE" in rel
    before_complete = set(rel[: rel.index("COMPLETE")])
    files = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()} - {"COMPLETE", "meta.json"}
    assert {"ema.safetensors", "config.yaml", "accelerate/model.safetensors"} <= files
    assert files <= before_complete  # every payload file (and meta.json, sealed with their sha256) came first
    assert "meta.json" in before_complete and "." in rel[rel.index("COMPLETE"):]  # the folder entry after COMPLETE
    assert checkpoint.Checkpoint(final).verify() == []
