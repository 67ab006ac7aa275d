"""heads.schedule: the paper's LR schedule, driven epoch by epoch with planted validation losses.

The model's weight marks the epoch it was set in, so a reload shows which epoch's weights came
back.
"""

import keras
import numpy as np
import pytest

from heads.schedule import StepOrPlateauSchedule, lr_stages


def drive(val_losses, **kwargs):
    """Run the callback over ``val_losses``; per epoch: (lr during it, lr after it, weight after it)."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(keras.optimizers.Adam(1e-4), "mse")
    model.optimizer.build(model.trainable_variables)
    schedule = StepOrPlateauSchedule(**kwargs)
    schedule.set_model(model)
    model.stop_training = False
    schedule.on_train_begin()
    rows = []
    for epoch, loss in enumerate(val_losses):
        model.set_weights([np.full((1, 1), epoch, np.float32)])  # "training" this epoch
        logs = {"loss": 1.0, "val_loss": loss}
        schedule.on_epoch_end(epoch, logs)
        rows.append((logs["lr"], float(model.optimizer.learning_rate.numpy()), float(model.get_weights()[0][0, 0])))
        if model.stop_training:
            break
    schedule.on_train_end()
    return schedule, rows, float(model.get_weights()[0][0, 0])


def test_stages():
    assert lr_stages(1e-4, 0.1, 1e-6) == [1e-4, 1e-5, 1e-6]
    assert lr_stages(1e-3, 0.1, 1e-6) == [1e-3, 1e-4, 1e-5, 1e-6]
    assert lr_stages(1e-4, 0.1, 1e-4) == [1e-4]
    assert lr_stages(1e-4, 0.5, 2e-5) == [1e-4, 5e-5, 2.5e-5]


def test_always_improving_divides_every_20_epochs_and_stops_after_the_last_stage():
    schedule, rows, final = drive(np.linspace(10, 1, 100))
    assert len(rows) == 60  # three stages of 20 epochs
    assert [r[0] for r in rows] == [1e-4] * 20 + [1e-5] * 20 + [1e-6] * 20
    assert [(e["epoch"], e["reason"]) for e in schedule.events] == [(20, "stage"), (40, "stage")]
    # at each change the best weights (here the last epoch's) come back
    assert rows[19][2] == 19 and rows[39][2] == 39
    assert final == 59 and schedule.best_epoch == 59


def test_plateau_divides_after_5_epochs_without_improvement_and_reloads_the_best_weights():
    losses = [5, 4, 3, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0,  # best at epoch 3 (0-based), 5 worse epochs
              2.55, 2.4, 2.45, 2.5, 2.6, 2.7, 2.8,  # new best at 10, then 5 worse
              9, 9, 9, 9, 9, 9, 9]  # last stage: 5 worse epochs, then stop
    schedule, rows, final = drive(losses)
    assert [(e["epoch"], e["reason"], e["best_epoch"]) for e in schedule.events] == [
        (9, "plateau", 4), (16, "plateau", 11)]
    assert [r[0] for r in rows] == [1e-4] * 9 + [1e-5] * 7 + [1e-6] * 5
    assert rows[8][1] == pytest.approx(1e-5) and rows[8][2] == 3  # reloaded the epoch-4 (1-based) weights
    assert rows[15][1] == pytest.approx(1e-6) and rows[15][2] == 10
    assert len(rows) == 21 and schedule.stopped_epoch == 20
    assert final == 10  # the result: the best weights on validation loss


def test_whichever_comes_first():
    # improving for 18 epochs then flat: the 20-epoch stage ends first (2 epochs without
    # improvement); in stage 2 the plateau ends it after 5
    losses = list(np.linspace(10, 2, 18)) + [2.0] * 30
    schedule, rows, _ = drive(losses)
    assert [(e["epoch"], e["reason"]) for e in schedule.events] == [(20, "stage"), (25, "plateau")]
    assert len(rows) == 30


def test_custom_stage_length_patience_and_floor():
    schedule, rows, _ = drive([1.0] * 50, lr=1e-2, stage_epochs=3, patience=2, min_lr=1e-4)
    # the first epoch always improves on infinity; then 2 without improvement end each stage
    assert [r[0] for r in rows] == [1e-2] * 3 + [1e-3] * 2 + [1e-4] * 2


def test_optimizer_state_is_reset_at_each_change():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-4), "mse")
    model.fit(np.ones((8, 2)), np.ones((8, 1)), epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    moments = [v for v in model.optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert any(np.abs(v.numpy()).sum() > 0 for v in moments)
    schedule = StepOrPlateauSchedule(stage_epochs=1)
    schedule.set_model(model)
    schedule.on_train_begin()
    schedule.on_epoch_end(0, {"val_loss": 1.0})
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all(np.abs(v.numpy()).sum() == 0 for v in moments)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-5)


def test_nan_is_never_an_improvement():
    schedule, rows, final = drive([3.0, np.nan, np.nan, np.nan, np.nan, np.nan, 2.0], stage_epochs=100)
    assert schedule.events[0]["epoch"] == 6 and schedule.events[0]["best_epoch"] == 1
    assert rows[5][2] == 0
