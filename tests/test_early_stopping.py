"""Our EarlyStopping against keras.callbacks.EarlyStopping itself, on the same value sequences."""

from __future__ import annotations

import random

import keras
import numpy as np
import pytest

from stages.train.early_stopping import EarlyStopping, ReduceLROnPlateau


def tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    return model


def mark_epoch(model: keras.Model, epoch: int) -> None:
    """Make the weights identify the epoch, so restored weights tell which epoch they came from."""
    model.set_weights([np.full_like(w, float(epoch)) for w in model.get_weights()])


def run_keras(values: list[float], monitor: str, **params) -> tuple[int, int, float | None]:
    model = tiny_model()
    callback = keras.callbacks.EarlyStopping(monitor=monitor, **params)
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    epochs = 0
    for epoch, value in enumerate(values):
        mark_epoch(model, epoch)
        callback.on_epoch_end(epoch, {monitor: value})
        epochs = epoch + 1
        if model.stop_training:
            break
    mark_epoch(model, 999)
    callback.on_train_end()
    restored = float(model.get_weights()[0].flat[0])
    return epochs, callback.best_epoch, (None if restored == 999 else restored)


def run_ours(values: list[float], monitor: str, **params) -> tuple[int, int, float | None]:
    model = tiny_model()
    stopper = EarlyStopping(monitor=monitor, **params)
    stopper.on_train_begin()
    epochs = 0
    for epoch, value in enumerate(values):
        mark_epoch(model, epoch)
        stop = stopper.on_epoch_end(epoch, {monitor: value}, model.get_weights)
        epochs = epoch + 1
        if stop:
            break
    restore = stopper.weights_to_restore()
    restored = None if restore is None else float(restore[0].flat[0])
    return epochs, stopper.best_epoch, restored


CASES = {
    "steady improvement": ([1.0 - 0.05 * i for i in range(15)], "val_loss", {"patience": 2}),
    "plateau": ([1.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], "val_loss", {"patience": 2}),
    "noisy min": ([0.9, 0.7, 0.75, 0.72, 0.69, 0.71, 0.73, 0.74, 0.75], "val_loss", {"patience": 3}),
    "min_delta equal": ([1.0, 0.75, 0.5, 0.25, 0.0], "val_loss", {"patience": 1, "min_delta": 0.25}),
    "min_delta just under": ([1.0, 0.7501, 0.5002, 0.2503, 0.0004], "val_loss", {"patience": 1, "min_delta": 0.25}),
    "min_delta negative is absolute": ([1.0, 0.9, 0.85, 0.84, 0.83], "val_loss", {"patience": 1, "min_delta": -0.05}),
    "baseline never beaten": ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], "val_loss", {"patience": 3, "baseline": 0.1}),
    "baseline beaten late": ([1.0, 0.9, 0.3, 0.2, 0.25, 0.26, 0.27], "val_loss", {"patience": 2, "baseline": 0.5}),
    "start_from_epoch": ([0.5, 0.9, 0.8, 0.85, 0.9, 0.95, 0.97], "val_loss", {"patience": 2, "start_from_epoch": 2}),
    "max mode": ([0.5, 0.6, 0.6, 0.55, 0.7, 0.65, 0.6, 0.6], "val_accuracy", {"patience": 2, "mode": "max"}),
    "max mode baseline": ([0.5, 0.6, 0.62, 0.63], "val_accuracy", {"patience": 2, "mode": "max", "baseline": 0.9}),
    "patience zero": ([1.0, 1.1, 0.5], "val_loss", {"patience": 0}),
    "first epoch only": ([1.0], "val_loss", {"patience": 3}),
}


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_keras(case: str, restore: bool) -> None:
    values, monitor, params = CASES[case]
    params = {**params, "restore_best_weights": restore}
    assert run_ours(values, monitor, **params) == run_keras(values, monitor, **params)


def test_pinned_outcomes() -> None:
    """Independent of Keras: the documented consequences hold."""
    assert run_ours([1.0] * 10, "val_loss", patience=3, restore_best_weights=True) == (4, 0, 0.0)
    # A baseline never beaten: stops after `patience` epochs (not patience + 1).
    assert run_ours([1.0] * 10, "val_loss", patience=3, baseline=0.1, restore_best_weights=True) == (3, 0, 0.0)
    assert run_ours([1.0, 0.75, 0.5], "val_loss", patience=1, min_delta=0.25, restore_best_weights=True)[0] == 2


def test_random_sequences_match_keras() -> None:
    rng = random.Random(7)
    for _ in range(150):
        values = [round(rng.uniform(0, 1), rng.choice([1, 2, 6])) for _ in range(rng.randint(1, 12))]
        mode = rng.choice(["min", "max"])
        params = {
            "patience": rng.randint(0, 4), "mode": mode, "min_delta": rng.choice([0.0, 0.01, 0.1]),
            "baseline": rng.choice([None, 0.3, 0.7]), "restore_best_weights": rng.choice([True, False]),
            "start_from_epoch": rng.choice([0, 0, 2]),
        }
        assert run_ours(values, "val_loss", **params) == run_keras(values, "val_loss", **params), (values, params)


def test_state_round_trip_resumes_identically() -> None:
    values = [0.9, 0.7, 0.75, 0.72, 0.69, 0.71, 0.73, 0.74, 0.75]
    whole = EarlyStopping(patience=3, restore_best_weights=True)
    whole.on_train_begin()
    stops = [whole.on_epoch_end(e, {"val_loss": v}, lambda e=e: [np.array([e])]) for e, v in enumerate(values)]
    first = EarlyStopping(patience=3, restore_best_weights=True)
    first.on_train_begin()
    for e, v in enumerate(values[:4]):
        first.on_epoch_end(e, {"val_loss": v}, lambda e=e: [np.array([e])])
    resumed = EarlyStopping(patience=3, restore_best_weights=True)
    resumed.on_train_begin()
    resumed.load_state(first.state(), first.best_weights)
    rest = [resumed.on_epoch_end(e, {"val_loss": v}, lambda e=e: [np.array([e])]) for e, v in enumerate(values)
            if e >= 4]
    assert stops[4:] == rest
    assert resumed.state() == whole.state()
    assert resumed.best_weights == whole.best_weights


def keras_lr_sequence(values: list[float], **params) -> list[float]:
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    callback = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **params)
    callback.set_model(model)
    callback.on_train_begin()
    rates = []
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"val_loss": value})
        rates.append(float(np.asarray(model.optimizer.learning_rate)))
    return rates


def our_lr_sequence(values: list[float], **params) -> list[float]:
    schedule = ReduceLROnPlateau(monitor="val_loss", **params)
    rate, rates = 1e-3, []
    for value in values:
        rate = schedule.on_epoch_end({"val_loss": value}, rate)
        rates.append(rate)
    return rates


@pytest.mark.parametrize("values", [
    [0.5, 0.4, 0.41, 0.42, 0.43, 0.39, 0.395, 0.4, 0.41, 0.42],
    [1.0] * 8,
    [0.9, 0.8, 0.7, 0.6],
])
@pytest.mark.parametrize("patience", [1, 2])
def test_reduce_lr_on_plateau_matches_keras(values: list[float], patience: int) -> None:
    params = {"factor": 0.5, "patience": patience, "min_lr": 2e-4, "min_delta": 1e-4}
    np.testing.assert_allclose(our_lr_sequence(values, **params), keras_lr_sequence(values, **params), rtol=1e-6)
