"""heads.train.schedule: the paper's LR schedule, driven epoch by epoch with planted validation losses.

The model's weight marks the epoch it was set in, so a reload shows which epoch's weights came
back.
"""

import keras
import numpy as np
import pytest

from heads.train.schedule import lr_stages
from heads.train.schedule_callback import StepOrPlateauSchedule


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


def test_a_loss_scaled_optimizer_keeps_its_loss_scale_at_a_change():
    """float16 training wraps Adam in a LossScaleOptimizer: the reset zeroes Adam's state, not
    the loss scale, and training goes on with finite losses after the change."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-4)), "mse")
    x, y = np.ones((8, 2)), np.ones((8, 1))
    model.fit(x, y, epochs=2, verbose=0)
    scale = float(model.optimizer.dynamic_scale.numpy())
    assert scale > 0
    inner = model.optimizer.inner_optimizer
    assert int(inner.iterations.numpy()) == 2
    schedule = StepOrPlateauSchedule(stage_epochs=1)
    schedule.set_model(model)
    schedule.on_train_begin()
    schedule.on_epoch_end(0, {"val_loss": 1.0})
    assert int(inner.iterations.numpy()) == 0
    assert all(np.abs(v.numpy()).sum() == 0 for v in inner.variables if "momentum" in v.path or "velocity" in v.path)
    assert float(model.optimizer.dynamic_scale.numpy()) == scale
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_nan_is_never_an_improvement():
    schedule, rows, final = drive([3.0, np.nan, np.nan, np.nan, np.nan, np.nan, 2.0], stage_epochs=100)
    assert schedule.events[0]["epoch"] == 6 and schedule.events[0]["best_epoch"] == 1
    assert rows[5][2] == 0


# ---- the values a run uses: heads.train.schedule.resolve_schedule, a pure function of the store's size


def test_a_store_of_avas_size_gets_exactly_the_papers_schedule():
    from heads.train.schedule import PAPER, resolve_schedule
    from heads.train.loop import TrainConfig

    assert (PAPER.lr, PAPER.min_lr, PAPER.lr_factor, PAPER.lr_epochs, PAPER.patience, PAPER.batch_size,
            PAPER.steps_per_epoch) == (1e-4, 1e-6, 0.1, 20, 5, 128, None)  # docs/paper.md, "Training"
    # AVA: 235,574 non-test images, 95% of them for training (223,795: 1,749 batches of 128)
    for n_train in (223_795, 235_574, 128_000):
        schedule, why = resolve_schedule(n_train)
        assert schedule == PAPER, n_train
        assert why.startswith("the paper's schedule"), why
        # what `mlsp train` without flags resolves to, through the training config's defaults
        assert TrainConfig(head="single1fc").schedule(n_train)[0] == PAPER
    assert PAPER.max_epochs() == 60 and PAPER.stages == [1e-4, 1e-5, 1e-6]


def test_a_small_store_gets_longer_epochs_and_a_higher_lr():
    from heads.train.schedule import resolve_schedule

    small, why = resolve_schedule(1400)  # 11 batches per pass
    assert (small.steps_per_epoch, small.lr, small.min_lr) == (100, 1e-3, 1e-5)
    assert small.stages == [1e-3, 1e-4, 1e-5]  # three LR stages, as the paper's
    assert "only 11 steps" in why and "1e-4 x 1,000/100" in why and "\n" not in why
    middle, why = resolve_schedule(14_000)  # 110 batches per pass: one pass, LR 1e-4 x 1000/110
    assert (middle.steps_per_epoch, middle.lr, middle.min_lr) == (None, 9.09e-4, 9.09e-6)
    # no jump at the edges: the LR falls steadily with the length of an epoch
    lrs = [resolve_schedule(n)[0].lr for n in range(1000, 140_000, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[0] == 1e-3 and lrs[-1] == 1e-4


def test_every_value_is_overridable():
    from heads.train.schedule import resolve_schedule
    from mlsp.errors import ConfigError

    schedule, why = resolve_schedule(1400, lr=3e-4, min_lr=1e-6, steps_per_epoch=7, lr_epochs=4, patience=2,
                                     batch_size=32, lr_factor=0.5)
    assert (schedule.lr, schedule.min_lr, schedule.steps_per_epoch, schedule.lr_epochs, schedule.patience,
            schedule.batch_size, schedule.lr_factor) == (3e-4, 1e-6, 7, 4, 2, 32, 0.5)
    assert "LR 3e-4 as asked" in why and "7 steps per epoch as asked" in why
    # an LR given alone keeps the paper's ratio to min_lr; an epoch length given alone sets the LR
    assert resolve_schedule(1400, lr=1e-2)[0].min_lr == 1e-4
    assert resolve_schedule(1400, steps_per_epoch=500)[0].lr == 2e-4
    # 0: one pass per epoch, however short; the LR follows that epoch's length
    one_pass = resolve_schedule(1400, steps_per_epoch=0)[0]
    assert one_pass.steps_per_epoch is None and one_pass.lr == 1e-3
    # a store of AVA's size with an explicit LR keeps everything else
    assert resolve_schedule(223_795, lr=1e-3)[0].steps_per_epoch is None
    with pytest.raises(ConfigError, match="min_lr"):
        resolve_schedule(1400, min_lr=1e-2)


def test_the_rule_imports_no_keras():
    import subprocess
    import sys

    code = ("import sys; import heads.train.schedule as s; s.resolve_schedule(100); "
            "print(sorted(m for m in ('keras', 'tensorflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
