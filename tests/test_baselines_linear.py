"""The ridge and constant baselines: features, fitting, prediction, run directories, training from a manifest."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest
from scipy import ndimage

from helpers import ellipsoid_session
from demist.baselines.constant import ConstantSynthesizer, fit_constant, train_constant
from demist.baselines.features import FeatureSpec, iter_feature_volumes, smooth_in_mask
from demist.baselines.ridge import RidgeSynthesizer, fit_ridge, train_ridge
from demist.config import load_config
from demist.data.manifest import load_manifest
from demist.data.preprocess import PreparedSession, prepare_images, prepare_session
from demist.errors import DemistError

CONFIG = load_config("tiny")


def prepared(seed: int, key: str | None = None) -> PreparedSession:
    images = ellipsoid_session(shape=(28, 30, 26), seed=seed)
    return prepare_images(images["t1w"], images["flair"], CONFIG.data, brain=images["brain_mask"],
                          psr=images["psr"], key=key or f"sub{seed}/a")


@pytest.fixture(scope="module")
def sessions() -> list[PreparedSession]:
    return [prepared(seed) for seed in range(3)]


def test_smoothing_inside_the_brain_ignores_the_background(sessions):
    session = sessions[0]
    brain = session.brain
    flat = np.where(brain, 0.7, 0.0).astype(np.float32)
    smoothed = smooth_in_mask(flat, brain, sigma_vox=2.0)
    np.testing.assert_allclose(smoothed[brain], 0.7, rtol=1e-5)
    assert np.all(smoothed[~brain] == 0)
    # a plain Gaussian darkens the brain's rim: the property above is not automatic
    assert ndimage.gaussian_filter(flat, 2.0)[brain].min() < 0.5


def test_features_are_named_in_order_and_use_millimetres(sessions):
    spec = FeatureSpec(sigmas_mm=(4.0,), products=True)
    names = [name for name, _ in iter_feature_volumes(sessions[0], spec)]
    assert names == spec.names == ["t1w", "flair", "t1w_s4mm", "flair_s4mm", "t1w^2", "flair^2", "t1w*flair"]
    volumes = dict(iter_feature_volumes(sessions[0], spec))
    by_voxels = smooth_in_mask(sessions[0].t1w, sessions[0].brain, 4.0 / CONFIG.data.spacing)
    np.testing.assert_array_equal(volumes["t1w_s4mm"], by_voxels)
    with pytest.raises(DemistError, match="sigmas"):
        FeatureSpec(sigmas_mm=(0.0,))


def test_ridge_recovers_a_known_linear_map(sessions):
    spec = FeatureSpec(sigmas_mm=(2.0, 4.0), products=True)
    rng = np.random.default_rng(7)
    weights = rng.uniform(-1.0, 1.0, len(spec.names))
    intercept = 0.3
    train = []
    for session in sessions[:2]:
        volumes = iter_feature_volumes(session, spec)
        target = intercept + sum(w * v.astype(np.float64) for w, (_, v) in zip(weights, volumes))
        train.append(dataclasses.replace(session, psr=np.where(session.brain, target, 0.0)))
    model = fit_ridge(train, CONFIG, seed=0, spec=spec, alphas=(1e-12,))
    np.testing.assert_allclose(model.coef, weights, atol=1e-6)
    assert model.intercept == pytest.approx(intercept, abs=1e-6)
    assert model.training["r2_train"] == pytest.approx(1.0, abs=1e-9)
    # the map transfers to an unseen session exactly, and stays zero outside its brain despite the intercept
    test = sessions[2]
    truth = intercept + sum(w * v.astype(np.float64) for w, (_, v) in zip(weights, iter_feature_volumes(test, spec)))
    pred, sd = model.predict(test)
    assert sd is None and pred.dtype == np.float32 and pred.shape == test.brain.shape
    np.testing.assert_allclose(pred[test.brain], truth[test.brain], atol=1e-5)
    assert np.all(pred[~test.brain] == 0)


def test_ridge_beats_the_constant_on_a_held_out_session(sessions):
    ridge = fit_ridge(sessions[:2], CONFIG, seed=0)
    constant = fit_constant(sessions[:2], CONFIG)
    test = sessions[2]
    mse = lambda pred: float(np.mean((pred[test.brain] - test.psr[test.brain]) ** 2))  # noqa: E731
    assert mse(ridge.predict(test)[0]) < 0.2 * mse(constant.predict(test)[0])
    assert ridge.training["r2_train"] > 0.8


def test_ridge_subsample_is_seeded_and_capped(sessions):
    a = fit_ridge(sessions[:2], CONFIG, seed=3, max_voxels=500)
    b = fit_ridge(sessions[:2], CONFIG, seed=3, max_voxels=500)
    c = fit_ridge(sessions[:2], CONFIG, seed=4, max_voxels=500)
    np.testing.assert_array_equal(a.coef, b.coef)
    assert not np.array_equal(a.coef, c.coef)
    assert a.training["voxels"] == 500
    assert a.training["sessions"] == [s.key for s in sessions[:2]]


def test_ridge_round_trip_gives_identical_predictions(sessions, tmp_path):
    model = fit_ridge(sessions[:2], CONFIG, seed=0)
    run = model.save(tmp_path / "ridge")
    assert (run.method, run.stage) == ("ridge", "baseline")
    stored = json.loads((tmp_path / "ridge" / "run.json").read_text())
    assert stored["training"]["features"] == model.spec.names
    loaded = RidgeSynthesizer.load(tmp_path / "ridge")
    assert loaded.spec == model.spec and loaded.config == CONFIG
    np.testing.assert_array_equal(loaded.predict(sessions[2])[0], model.predict(sessions[2])[0])
    with pytest.raises(DemistError, match="expected 'constant'"):
        ConstantSynthesizer.load(tmp_path / "ridge")


def test_constant_predicts_the_training_mean_and_round_trips(sessions, tmp_path):
    model = fit_constant(sessions[:2], CONFIG)
    pooled = np.concatenate([s.psr[s.brain].astype(np.float64) for s in sessions[:2]])
    assert model.value == pytest.approx(pooled.mean(), rel=1e-9)
    test = sessions[2]
    pred, sd = model.predict(test)
    assert sd is None and pred.dtype == np.float32
    assert np.all(pred[test.brain] == np.float32(model.value)) and np.all(pred[~test.brain] == 0)
    model.save(tmp_path / "constant")
    loaded = ConstantSynthesizer.load(tmp_path / "constant")
    assert loaded.value == model.value
    np.testing.assert_array_equal(loaded.predict(test)[0], pred)
    with pytest.raises(DemistError, match="expected 'ridge'"):
        RidgeSynthesizer.load(tmp_path / "constant")


def test_fitting_uses_only_the_given_sessions(sessions):
    shifted = dataclasses.replace(sessions[1], key="sub9/a", psr=sessions[1].psr + np.float32(0.5) * sessions[1].brain)
    alone = fit_constant([sessions[0]], CONFIG)
    assert alone.value == pytest.approx(float(sessions[0].psr[sessions[0].brain].astype(np.float64).mean()))
    assert fit_constant([sessions[0], shifted], CONFIG).value > alone.value + 0.1
    ridge_alone = fit_ridge([sessions[0]], CONFIG, seed=0)
    assert ridge_alone.training["sessions"] == [sessions[0].key]
    assert not np.allclose(fit_ridge([sessions[0], shifted], CONFIG, seed=0).intercept, ridge_alone.intercept)
    no_target = dataclasses.replace(sessions[0], key="sub8/a", psr=None)
    with pytest.raises(DemistError, match="sub8/a"):
        fit_ridge([no_target], CONFIG, seed=0)
    with pytest.raises(DemistError, match="none given"):
        fit_constant([], CONFIG)


def test_training_from_a_manifest_restricts_to_the_given_subjects(small_manifest, tmp_path):
    records = load_manifest(small_manifest)
    s2 = prepare_session(next(r for r in records if r.subject == "s2"), CONFIG.data)
    constant = train_constant(small_manifest, CONFIG, tmp_path / "c", subjects=["s2"], progress=False)
    assert constant.training["sessions"] == ["s2/a"]
    assert constant.value == pytest.approx(float(s2.psr[s2.brain].astype(np.float64).mean()))
    assert ConstantSynthesizer.load(tmp_path / "c").value == constant.value
    ridge = train_ridge(small_manifest, CONFIG, tmp_path / "r", progress=False)
    assert ridge.training["sessions"] == ["s1/a", "s1/b", "s2/a"]
    assert RidgeSynthesizer.load(tmp_path / "r").training["r2_train"] == ridge.training["r2_train"]
    with pytest.raises(DemistError, match="s7"):
        train_ridge(small_manifest, CONFIG, tmp_path / "x", subjects=["s7"], progress=False)
