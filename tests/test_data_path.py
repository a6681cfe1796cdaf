"""One data path: evaluation reads the shards through the training loader's reader, decoder and scaling.

The FID reference statistics and the held-out bits/dim batches must see the pixels the model is trained
on, bit for bit, and a corrupt shard costs the same (counted skips) in both reads.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from evaluation.fid import reference_from_shards
from pipeline.config import DataConfig
from pipeline.data.decode import to_unit_range
from pipeline.data.loader import StreamingLoader
from pipeline.data.manifest import ManifestError
from pipeline.data.report import CorruptDataError, CorruptDataWarning, Report
from pipeline.data.sequential import iter_split, split_batches
from tests.helpers.data import copy_folder, cut_file, make_shards, member_spans, to_u8

N, PER_SHARD, B = 37, 8, 4  # 5 shards, the last one short


class RecordingExtractor:
    """A feature extractor that keeps the images the reference statistics are computed from."""

    name, weights_sha256, fid_mode = "recorder", "0" * 64, "clean"

    def __init__(self):
        self.images: np.ndarray | None = None

    def __call__(self, images: np.ndarray, desc: str = "") -> np.ndarray:
        self.images = images
        return images.reshape(len(images), -1)[:, :6].astype(np.float64)


def loader_epoch(folder: str, workers: int) -> dict[int, tuple[torch.Tensor, int]]:
    """index -> (image, label) of one epoch of the trainer's loader, flips off."""
    cfg = DataConfig(shards=folder, hflip=False, shuffle_buffer=16, num_workers=workers)
    loader = StreamingLoader(cfg, batch_size=B)
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch)]
    it.close()
    out = {}
    for b in batches:
        for image, label, index in zip(b["image"], b["label"].tolist(), b["index"].tolist()):
            out.setdefault(index, (image, label))  # the last batch's tail is the next epoch's head
    assert sorted(out) == list(range(N))
    return out


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # bitwise: tells -0.0 from 0.0, unlike torch.equal


@pytest.mark.parametrize(("channels", "encoding", "workers"), [(3, "png", 2), (1, "png", 0), (3, "u8", 0),
                                                               (1, "u8", 2)])
def test_reference_and_bpd_images_are_the_training_tensors(tmp_path, channels, encoding, workers):
    folder, source = make_shards(str(tmp_path), N, per_shard=PER_SHARD, channels=channels, encoding=encoding)
    rec = RecordingExtractor()
    ref = reference_from_shards(folder, "train", rec, cache_dir=str(tmp_path / "stats"))
    assert ref.provenance["count"] == N and rec.images is not None
    assert rec.images.dtype == np.uint8 and rec.images.shape == (N, channels, 8, 8)

    samples = list(iter_split(folder, "train"))
    assert [s.index for s in samples] == list(range(N))  # manifest order: position i is the loader's index i
    np.testing.assert_array_equal(np.stack([s.image for s in samples]), rec.images)
    trained = loader_epoch(folder, workers)
    for s, ref_image in zip(samples, rec.images):
        # the stored pixels: the source image the key names (prepare's key is the source index)
        src = source[int(s.key)]
        np.testing.assert_array_equal(ref_image, src.reshape(8, 8, channels).transpose(2, 0, 1))
        image, label = trained[s.index]
        assert label == s.label == int(s.key) % 10
        np.testing.assert_array_equal(to_u8(image[None])[0].transpose(2, 0, 1), ref_image)
        scaled = torch.from_numpy(to_unit_range(ref_image, np.empty(ref_image.shape, np.float32)))
        assert torch.equal(bits(image), bits(scaled))

    # held-out bits/dim batches: the loader's float tensors, bit for bit, whatever the rank split
    for rank in range(2):
        for b in split_batches(folder, "train", 5, rank=rank, world_size=2):
            assert b["image"].dtype == torch.float32
            for image, label, index in zip(b["image"], b["label"].tolist(), b["index"].tolist()):
                assert torch.equal(bits(image), bits(trained[index][0])) and label == trained[index][1]


def test_a_cut_shard_costs_the_same_counted_skips_as_in_training(tmp_path):
    folder, _ = make_shards(str(tmp_path), N, per_shard=PER_SHARD, name="intact")
    bad = copy_folder(folder, str(tmp_path / "cut"))
    shard = os.path.join(bad, "train-000002.tar")
    _, _, data_at = member_spans(shard)[2 * 3]  # sample 3's png (members: png, cls per sample)
    cut_file(shard, data_at + 10)
    # both reads read the shard to its end to verify its sha256: a shard that cannot be verified is lost whole
    lost = set(range(2 * PER_SHARD, 3 * PER_SHARD))

    report = Report(strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [s.index for s in iter_split(bad, "train", report=report)]
    assert got == [i for i in range(N) if i not in lost]  # positions after the cut keep their indices
    assert (report.skipped_samples, report.skipped_shards) == (len(lost), 1)
    shard_warnings = [w for w in caught if issubclass(w.category, CorruptDataWarning)]
    assert len(shard_warnings) == 1 and "train-000002.tar" in str(shard_warnings[0].message)

    # the training loader over one epoch of the same data: the same samples, the same counts (one batch
    # of the next epoch more, so the stream has passed every position of the first)
    loader = StreamingLoader(DataConfig(shards=bad, num_workers=0, shuffle_buffer=0), batch_size=1)
    it = iter(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        delivered = [int(next(it)["index"]) for _ in range(N - len(lost) + 1)]
    it.close()
    assert sorted(delivered[:-1]) == got
    assert (loader.stats["skipped_samples"], loader.stats["skipped_shards"]) == (len(lost), 1)

    with pytest.raises(CorruptDataError, match="train-000002.tar"):
        list(iter_split(bad, "train", report=Report(strict=True)))
    with pytest.raises(CorruptDataError, match="train-000002.tar"):
        list(split_batches(bad, "train", 4, report=Report(strict=True)))


@pytest.mark.filterwarnings("ignore:data.verify=stream")  # read without a manifest at the end
def test_an_invalid_manifest_beside_the_shards_is_an_error_not_a_fallback(tmp_path):
    folder, _ = make_shards(str(tmp_path), N, per_shard=PER_SHARD)
    pattern = os.path.join(folder, "train-{000000..000004}.tar")
    manifest = os.path.join(folder, "manifest.json")
    with open(manifest, "w") as f:
        f.write('{"format": 1, "splits": ')  # a copy cut short
    for make in (lambda: StreamingLoader(DataConfig(shards=pattern, num_workers=0), batch_size=B),
                 lambda: list(iter_split(pattern, "train"))):
        with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON.*move it away") as err:
            make()
        assert manifest in str(err.value)
    os.remove(manifest)  # no manifest at all: local shards are counted from their headers
    assert StreamingLoader(DataConfig(shards=pattern, num_workers=0), batch_size=B).num_samples == N
    assert [s.index for s in iter_split(pattern, "train")] == list(range(N))
