"""Feature extractors: the committed digits net, clean-fid's resize path, the offline Inception error."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from cleanfid.utils import ResizeDataset
from PIL import Image

from evaluation import digits_net
from evaluation.evaluate import _offline_alternative
from evaluation.features import (
    INCEPTION_FILE,
    InceptionWeightsUnavailable,
    _ResizeImages,
    digits_extractor,
    inception_weights_file,
)
from evaluation.fid import load_split_images
from pipeline.data.manifest import read_manifest
from pipeline.data.prepare import resize_center_crop
from tests.helpers.evaluation import prepare_digits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    data = prepare_digits(tmp_path_factory.mktemp("data"))
    manifest = read_manifest(data)
    from pipeline.data.sequential import iter_split

    samples = list(iter_split(manifest, "test"))
    return np.stack([s.image for s in samples]), np.array([s.label for s in samples])


def test_committed_weights_reach_the_recorded_heldout_accuracy(test_split):
    images, labels = test_split
    probs = digits_net.predict_proba(images)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    acc = float((probs.argmax(1) == labels).mean())
    meta = digits_net.weights_metadata()
    assert meta["name"] == digits_net.NAME
    assert int(meta["test_images"]) == len(labels) == 180
    assert acc == pytest.approx(float(meta["heldout_accuracy"]), abs=1e-4)
    assert acc >= 0.95


@pytest.mark.parametrize("size", [16, 32])
def test_digits_net_sees_upsampled_data_like_native(test_split, size):
    # the demo may prepare digits at 16 or 32 px (prepare's Lanczos): the net resizes back to 8x8 itself
    images, labels = test_split
    big = np.stack([resize_center_crop(x[0], size)[None] for x in images])
    acc = float((digits_net.predict_proba(big).argmax(1) == labels).mean())
    assert acc >= 0.95


def test_digits_extractor_provenance_and_grey_rgb_equivalence(test_split):
    images, _ = test_split
    ex = digits_extractor(torch.device("cpu"))
    assert ex.name == "digits-cnn-v1" and ex.weights_sha256 == digits_net.weights_sha256()
    assert len(ex.weights_sha256) == 64
    grey = ex(images[:50])
    rgb = ex(np.repeat(images[:50], 3, axis=1))
    assert grey.shape == (50, digits_net.FEATURE_DIM) and grey.dtype == np.float64
    np.testing.assert_allclose(grey, rgb, rtol=1e-5, atol=1e-5)
    # batch size does not change features
    ex.batch_size = 7
    np.testing.assert_allclose(ex(images[:50]), grey, rtol=1e-5, atol=1e-5)


def test_extractor_rejects_float_images():
    ex = digits_extractor(torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8 images"):
        ex(torch.zeros(2, 1, 8, 8))


def test_class_summary_counts():
    probs = np.array([[0.95, 0.05] + [0] * 8, [0.5, 0.5] + [0] * 8, [0] * 9 + [1.0]])
    s = digits_net.class_summary(probs, threshold=0.9)
    assert s["confident_share"] == pytest.approx(2 / 3)
    assert s["class_histogram"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch", "legacy_tensorflow"])
def test_in_memory_resize_matches_cleanfid_folder_path(tmp_path, mode):
    # our in-memory path must feed Inception exactly what clean-fid's own folder dataset would
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    files = []
    for i, img in enumerate(images):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img[0]).save(files[-1])
    theirs = ResizeDataset(files, mode=mode)
    ours = _ResizeImages(torch.from_numpy(images), mode)
    for i in range(len(images)):
        a, b = ours[i], theirs[i]
        assert a.shape == b.shape == ((3, 8, 8) if mode == "legacy_tensorflow" else (3, 299, 299))
        torch.testing.assert_close(a, b.float(), rtol=0, atol=1e-4)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connecting is refused at once


def test_offline_inception_error_names_file_url_and_fix(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
    with pytest.raises(InceptionWeightsUnavailable) as err:
        inception_weights_file(download_dir=str(tmp_path), url=url)
    msg = str(err.value)
    assert INCEPTION_FILE in msg and url in msg
    assert str(tmp_path / INCEPTION_FILE) in msg and "eval.inception_weights=" in msg
    assert "eval.feature_extractor=digits" in msg
    assert not (tmp_path / INCEPTION_FILE).exists()  # no empty file left to fail later


@pytest.mark.parametrize("digits_data, offered, not_offered", [
    (False, "eval.feature_extractor=none", "eval.feature_extractor=digits (a digits-feature FID"),
    (True, "eval.feature_extractor=digits (a digits-feature FID", "eval.feature_extractor=none"),
])
def test_offline_inception_error_offers_what_fits_the_data(tmp_path, digits_data, offered, not_offered):
    url = f"http://127.0.0.1:{_closed_port()}/{INCEPTION_FILE}"
    with pytest.raises(InceptionWeightsUnavailable) as err:
        inception_weights_file(download_dir=str(tmp_path), url=url, instead=_offline_alternative(digits_data))
    assert offered in str(err.value) and not_offered not in str(err.value)


def test_missing_user_inception_file_is_a_clear_error(tmp_path):
    with pytest.raises(InceptionWeightsUnavailable, match=r"eval.inception_weights=.*does not exist.*download"):
        inception_weights_file(str(tmp_path / "nope.pt"))


def test_truncated_inception_file_is_a_clear_error(tmp_path):
    from evaluation.features import inception_extractor

    bad = tmp_path / INCEPTION_FILE
    bad.write_bytes(b"not torchscript")
    with pytest.raises(InceptionWeightsUnavailable, match="may be truncated"):
        inception_extractor("clean", torch.device("cpu"), weights=str(bad))


def test_split_images_match_manifest_counts(test_split, tmp_path):
    data = prepare_digits(tmp_path)
    imgs = load_split_images(read_manifest(data), "train", max_images=100)
    assert imgs.shape == (100, 1, 8, 8) and imgs.dtype == np.uint8
    assert len(load_split_images(read_manifest(data), "train")) == 1617
