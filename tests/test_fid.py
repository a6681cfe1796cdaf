"""FID/KID against independent computations; reference statistics from shards and their cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from evaluation.features import digits_extractor
from evaluation.fid import (
    ReferenceStats,
    ReferenceStatsError,
    fid,
    kid,
    load_reference,
    load_split_images,
    reference_from_shards,
    stats_of,
)
from pipeline.data.manifest import read_manifest
from pipeline.data.prepare import prepare
from tests.helpers.evaluation import prepare_digits

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(seed: int, n: int = 400, d: int = 12, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)  # correlated dimensions
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def _independent_fid(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||² + tr(Sa) + tr(Sb) - 2 tr((Sa^½ Sb Sa^½)^½), with symmetric eigendecompositions only."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    sb = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    w, v = linalg.eigh(sa)
    sa_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = linalg.eigvalsh(sa_half @ sb @ sa_half)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _ref(feats: np.ndarray) -> ReferenceStats:
    mu, sigma = stats_of(feats)
    return ReferenceStats(mu, sigma, feats)


def test_fid_equals_independent_computation():
    a, b = _features(0), _features(1, n=500, shift=0.7, scale=1.3)
    expected = _independent_fid(a, b)
    assert expected > 1.0
    assert fid(a, _ref(b)) == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero():
    a = _features(2)
    scale = np.trace(np.cov(a, rowvar=False))
    assert abs(fid(a, _ref(a))) < 1e-8 * scale


def test_fid_of_pure_mean_shift_is_squared_distance():
    # same covariance, means apart by delta: FID = ||delta||² exactly
    a = _features(3)
    delta = np.linspace(-1, 1, a.shape[1])
    assert fid(a + delta, _ref(a)) == pytest.approx(float((delta**2).sum()), rel=1e-7)


def test_fid_rejects_features_of_another_dimension():
    with pytest.raises(ValueError, match="another feature extractor"):
        fid(_features(0, d=8), _ref(_features(1, d=12)))


def _independent_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³ over all pairs, written out directly."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    off = lambda k: k.sum() - np.trace(k)  # noqa: E731
    return float(off(kxx) / (m * (m - 1)) + off(kyy) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def test_kid_equals_direct_unbiased_estimator():
    # With subsets as large as the sets, every subset is a permutation of all of them: the estimate
    # must equal the all-pairs unbiased MMD² whatever the random draws.
    x, y = _features(4, n=150), _features(5, n=150, shift=0.3)
    expected = _independent_kid(x, y)
    assert kid(x, y, num_subsets=3, max_subset_size=1000) == pytest.approx(expected, rel=1e-9)


def test_kid_is_reproducible_and_leaves_numpy_rng_alone():
    x, y = _features(6, n=300), _features(7, n=300, shift=0.2)
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    k1 = kid(x, y, num_subsets=5, max_subset_size=100, seed=9)
    after = np.random.random()
    assert before == after
    assert kid(x, y, num_subsets=5, max_subset_size=100, seed=9) == k1
    both = _features(8, n=600)  # two halves of one sample: the same distribution
    same = kid(both[:300], both[300:], num_subsets=20, max_subset_size=300)
    assert abs(same) < 0.05 * kid(both[:300] + 1.0, both[300:], num_subsets=20, max_subset_size=300)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return prepare_digits(tmp_path_factory.mktemp("data"))


def test_reference_from_shards_is_the_statistics_of_the_split(digits, tmp_path):
    extractor = digits_extractor(torch.device("cpu"))
    ref = reference_from_shards(digits, "train", extractor, cache_dir=str(tmp_path))
    images = load_split_images(read_manifest(digits), "train")
    assert ref.provenance["count"] == len(images) == 1617
    mu, sigma = stats_of(extractor(images))
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-12)
    assert not ref.from_cache


def test_reference_cache_is_reused_and_keyed_by_the_manifest(tmp_path):
    data = str(tmp_path / "d")
    prepare("digits", data, test_fraction=0.1, seed=0, samples_per_shard=500, workers=1, progress=False)
    extractor = digits_extractor(torch.device("cpu"))
    first = load_reference("train", data, extractor)  # default cache: <shards>/fid_stats
    assert not first.from_cache and first.cache_path.startswith(f"{data}/fid_stats/")
    again = load_reference("train", data, extractor)
    assert again.from_cache and again.cache_path == first.cache_path
    assert again.stats_sha256 == first.stats_sha256
    # other shards (another split seed: other images in train) -> a new key, statistics recomputed
    prepare("digits", data, test_fraction=0.1, seed=1, samples_per_shard=500, workers=1, progress=False,
            overwrite=True)
    changed = load_reference("train", data, extractor)
    assert not changed.from_cache and changed.cache_path != first.cache_path
    assert changed.stats_sha256 != first.stats_sha256
    # another split is another key too
    test = load_reference("test", data, extractor)
    assert not test.from_cache and test.provenance["count"] == 180


def test_reference_errors_are_clear(digits):
    extractor = digits_extractor(torch.device("cpu"))
    with pytest.raises(Exception, match=r"split 'valid' is not in the manifest.*\['test', 'train'\]"):
        load_reference("valid", digits, extractor)
    with pytest.raises(ReferenceStatsError, match="cannot be compared with digits-cnn-v1"):
        load_reference("clean-fid:cifar10/train/32", digits, extractor)
    with pytest.raises(ReferenceStatsError, match="clean-fid:<dataset>/<split>/<resolution>"):
        load_reference("clean-fid:cifar10", digits, extractor)
