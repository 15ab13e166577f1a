"""Tests for mmfeatures.fusion, checked against direct numpy computations."""

import numpy as np
import pytest

from mmfeatures.fusion import Fusion, parse_weights, projection_matrix

DIMS = {"text": 4, "image": 3, "audio": 5}


def vectors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: (rng.standard_normal(d) * 7).astype(np.float32) for m, d in DIMS.items()}


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# -- parse_weights -----------------------------------------------------------------------------


def test_parse_weights_good():
    assert parse_weights("text=0.2,image=0.3") == {"text": 0.2, "image": 0.3}
    assert parse_weights(" text = 1 , audio=0 ,") == {"text": 1.0, "audio": 0.0}
    assert parse_weights("") == {}
    assert parse_weights(None) == {}


@pytest.mark.parametrize("text", ["text", "text:0.2", "text=abc", "text=0.2,image", "text="])
def test_parse_weights_malformed(text):
    with pytest.raises(ValueError):
        parse_weights(text)


@pytest.mark.parametrize("text", ["text=-0.1", "image=-1", "text=nan", "text=inf"])
def test_parse_weights_negative_or_not_finite(text):
    with pytest.raises(ValueError, match="finite number >= 0"):
        parse_weights(text)


# -- concat ------------------------------------------------------------------------------------


def test_concat_all_present():
    fusion = Fusion("concat", DIMS, weights={"text": 2.0, "audio": 0.5})
    v = vectors()
    fused = fusion.fuse(v)
    assert fusion.output_dim == sum(DIMS.values()) == fused.shape[0]
    assert fused.dtype == np.float32
    expected = np.concatenate([unit(v["text"]) * 2.0, unit(v["image"]) * 1.0, unit(v["audio"]) * 0.5])
    np.testing.assert_allclose(fused, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(fused[:4]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fused[4:7]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fused[7:]), 0.5, rtol=1e-6)


def test_concat_missing_modality_is_zero_filled():
    fusion = Fusion("concat", DIMS)
    v = vectors(1)
    fused = fusion.fuse({"text": v["text"], "audio": v["audio"]})
    assert fused.shape == (12,)
    np.testing.assert_allclose(fused[:4], unit(v["text"]), rtol=1e-6)
    assert np.all(fused[4:7] == 0)
    np.testing.assert_allclose(fused[7:], unit(v["audio"]), rtol=1e-6)


def test_concat_zero_vector_stays_zero():
    fusion = Fusion("concat", {"text": 2, "image": 2})
    fused = fusion.fuse({"text": np.zeros(2, np.float32), "image": np.array([3.0, 4.0], np.float32)})
    np.testing.assert_allclose(fused, [0, 0, 0.6, 0.8], rtol=1e-6)
    assert np.all(np.isfinite(fused))


# -- mean and weighted -------------------------------------------------------------------------


@pytest.mark.parametrize("present", [("text",), ("text", "image"), ("image", "audio"), ("text", "image", "audio")])
def test_mean_is_average_of_projected_unit_vectors(present):
    fusion = Fusion("mean", DIMS, projection_dim=16, seed=7)
    v = vectors(2)
    fused = fusion.fuse({m: v[m] for m in present})
    projected = [unit(v[m].astype(np.float64)) @ projection_matrix(7, m, DIMS[m], 16) for m in present]
    expected = np.mean(projected, axis=0)
    assert fused.shape == (16,) and fused.dtype == np.float32
    assert fusion.output_dim == 16
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)


def test_mean_ignores_weights():
    v = vectors(3)
    plain = Fusion("mean", DIMS, projection_dim=8).fuse(v)
    weighted = Fusion("mean", DIMS, weights={"text": 5.0}, projection_dim=8).fuse(v)
    np.testing.assert_allclose(plain, weighted, rtol=1e-6)


def test_weighted_renormalised_over_present_modalities():
    weights = {"text": 1.0, "image": 3.0, "audio": 6.0}
    fusion = Fusion("weighted", DIMS, weights=weights, projection_dim=8, seed=3)
    v = vectors(4)
    proj = {m: unit(v[m].astype(np.float64)) @ projection_matrix(3, m, DIMS[m], 8) for m in DIMS}

    all_three = fusion.fuse(v)
    np.testing.assert_allclose(
        all_three, 0.1 * proj["text"] + 0.3 * proj["image"] + 0.6 * proj["audio"], rtol=1e-5, atol=1e-6
    )

    # audio missing: shares become 1/4 and 3/4, not 0.1 and 0.3
    two = fusion.fuse({"text": v["text"], "image": v["image"]})
    np.testing.assert_allclose(two, 0.25 * proj["text"] + 0.75 * proj["image"], rtol=1e-5, atol=1e-6)

    one = fusion.fuse({"audio": v["audio"]})
    np.testing.assert_allclose(one, proj["audio"], rtol=1e-5, atol=1e-6)


def test_weighted_default_weight_is_one_and_all_zero_weights_fall_back_to_mean():
    v = vectors(5)
    mean = Fusion("mean", DIMS, projection_dim=8).fuse(v)
    np.testing.assert_allclose(Fusion("weighted", DIMS, projection_dim=8).fuse(v), mean, rtol=1e-5, atol=1e-6)
    zero = Fusion("weighted", DIMS, weights={"text": 0.0, "image": 0.0, "audio": 0.0}, projection_dim=8)
    np.testing.assert_allclose(zero.fuse(v), mean, rtol=1e-5, atol=1e-6)


def test_fuse_nothing_is_an_error():
    with pytest.raises(ValueError):
        Fusion("mean", DIMS).fuse({})


# -- projection_matrix -------------------------------------------------------------------------


def test_projection_matrix_is_deterministic_and_distinct():
    a = projection_matrix(0, "text", 6, 10)
    assert a.shape == (6, 10) and a.dtype == np.float32
    np.testing.assert_array_equal(a, projection_matrix(0, "text", 6, 10))
    assert not np.allclose(a, projection_matrix(0, "image", 6, 10))
    assert not np.allclose(a, projection_matrix(1, "text", 6, 10))


def test_projection_matrix_scale_keeps_unit_vectors_near_unit():
    matrix = projection_matrix(0, "text", 64, 4096)
    assert abs(float(matrix.std()) - 1 / np.sqrt(4096)) < 1e-3
    x = unit(np.random.default_rng(0).standard_normal(64))
    assert 0.9 < np.linalg.norm(x @ matrix) < 1.1


def test_projection_is_what_fusion_uses_across_instances():
    v = vectors(6)
    first = Fusion("mean", DIMS, projection_dim=8, seed=11).fuse(v)
    second = Fusion("mean", DIMS, projection_dim=8, seed=11).fuse(v)
    other_seed = Fusion("mean", DIMS, projection_dim=8, seed=12).fuse(v)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other_seed)


# -- construction and describe -----------------------------------------------------------------


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown fusion"):
        Fusion("max", DIMS)


def test_weights_for_unknown_modality():
    with pytest.raises(ValueError, match="video"):
        Fusion("weighted", DIMS, weights={"text": 1.0, "video": 2.0})


def test_describe_concat():
    described = Fusion("concat", DIMS, weights={"image": 0.5}).describe()
    assert described == {
        "method": "concat",
        "order": ["text", "image", "audio"],
        "dimension": 12,
        "weights": {"text": 1.0, "image": 0.5, "audio": 1.0},
        "normalization": "l2 per modality",
    }


def test_describe_weighted_has_projection():
    described = Fusion("weighted", DIMS, weights={"audio": 2.0}, projection_dim=32, seed=9).describe()
    assert described["method"] == "weighted"
    assert described["dimension"] == 32
    assert described["order"] == ["text", "image", "audio"]
    assert described["weights"] == {"text": 1.0, "image": 1.0, "audio": 2.0}
    projection = described["projection"]
    assert projection["seed"] == 9
    assert projection["dimension"] == 32
    assert projection["function"] == "mmfeatures.fusion.projection_matrix"
