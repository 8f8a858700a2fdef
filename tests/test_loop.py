"""The shared training loop on its own: generic batches, loss composition, accumulation, stop, OOM."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from napari_delightsam.devices import autocast_context, autocast_dtype
from napari_delightsam.training.errors import TrainingError
from napari_delightsam.training.loop.run import BestKeeper, EpochHooks, Loss, Schedule, run_loop
from napari_delightsam.training.loop.runfolder import RunLog, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_problem(seed: int = 0, n: int = 8):
    """A 3->1 linear model and a batch stream of (x (B,3), y (B,1)) tensors — no images at all."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    x = torch.randn(n, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return model, x, y


def run(model, batches, loss_fn, tmp_path: Path, *, schedule: Schedule, lr: float = 0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    saved: list[int] = []
    hooks = kw.pop("hooks", None) or EpochHooks(
        train_mode=model.train, save_last=lambda e, g, row: saved.append(e)
    )
    events: list[dict] = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = RunLog(tmp_path / "metrics.jsonl", events.append)
    outcome = run_loop(
        schedule, batches, loss_fn, opt, sched, list(model.named_parameters()), hooks, log, **kw
    )
    return outcome, events, log, saved


def test_loss_plus_adds_a_weighted_term_and_logs_it():
    w = torch.tensor(2.0, requires_grad=True)
    loss = Loss(w * 3.0, {"dice": 0.5}).plus("l2", w**2, weight=0.1)
    assert loss.total.item() == pytest.approx(6.0 + 0.4)
    assert dict(loss.logged) == {"dice": 0.5, "l2": pytest.approx(4.0)}
    loss.total.backward()
    assert w.grad.item() == pytest.approx(3.0 + 0.1 * 2 * 2.0)  # the term is in the graph


def test_loop_runs_any_batches_and_logs_steps_epochs_and_extra_terms(tmp_path: Path):
    model, x, y = linear_problem()

    def batches(epoch: int):
        return iter([(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])

    def loss_fn(batch) -> Loss:
        xb, yb = batch
        mse = nn.functional.mse_loss(model(xb), yb)
        return Loss(mse).plus("l2", model.weight.pow(2).sum(), weight=0.01)

    outcome, events, log, saved = run(
        model, batches, loss_fn, tmp_path, schedule=Schedule(epochs=2, steps_per_epoch=4, log_every=2)
    )
    assert (outcome.epochs_completed, outcome.stopped, outcome.global_step) == (2, False, 8)
    assert saved == [0, 1]
    kinds = [e["event"] for e in events]
    assert kinds.count("step") == 8 and kinds.count("epoch") == 2
    step = next(e for e in events if e["event"] == "step")
    assert {"epoch", "step", "steps", "global_step", "loss", "l2", "lr", "sec_per_step"} <= set(step)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["type"] for r in rows] == ["step", "step", "epoch", "step", "step", "epoch"]
    assert rows == log.history
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["lr"] for r in epochs] == [0.05, 0.025]  # the scheduler steps once per epoch
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]  # it learns
    assert outcome.last_loss == [e for e in events if e["event"] == "step"][-1]["loss"]


def test_step_details_off_keeps_the_lean_rows(tmp_path: Path):
    model, x, y = linear_problem()
    outcome, events, _, _ = run(
        model,
        lambda epoch: iter([(x, y)]),
        lambda b: Loss(nn.functional.mse_loss(model(b[0]), b[1])),
        tmp_path,
        schedule=Schedule(epochs=1, steps_per_epoch=1),
        step_details=False,
    )
    step, epoch = events[0], events[1]
    assert set(step) == {"event", "epoch", "step", "steps", "global_step", "loss"}
    assert set(epoch) == {"event", "epoch", "global_step", "train_loss", "lr", "epoch_seconds"}


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path):
    model_a, x, y = linear_problem()
    model_b, _, _ = linear_problem()

    def mse(model):
        return lambda b: Loss(nn.functional.mse_loss(model(b[0]), b[1]))

    run(model_a, lambda e: iter([(x, y)]), mse(model_a), tmp_path / "a", schedule=Schedule(1, 1))
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    run(
        model_b,
        lambda e: iter(halves),
        mse(model_b),
        tmp_path / "b",
        schedule=Schedule(1, 1, grad_accum=2),
    )
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_epochs_are_reseeded_so_a_resumed_run_draws_the_same_numbers(tmp_path: Path):
    draws: dict[str, list[float]] = {"straight": [], "resumed": []}

    def loop(key: str, start: int) -> None:
        model, x, y = linear_problem()

        def loss_fn(b):
            draws[key].append(float(torch.rand(())))  # randomness inside the model's step
            return Loss(nn.functional.mse_loss(model(b[0]), b[1]))

        run(
            model,
            lambda e: iter([(x, y)] * 2),
            loss_fn,
            tmp_path / "a",
            schedule=Schedule(3, 2, start, seed=7),
        )

    loop("straight", 0)
    loop("resumed", 2)
    assert draws["resumed"] == draws["straight"][-2:]


def test_stop_validates_the_current_weights_and_keeps_them_only_if_better(tmp_path: Path):
    model, x, y = linear_problem()
    stop = threading.Event()
    kept: list[tuple[dict, int]] = []
    best = BestKeeper("score", lambda summary, epoch: kept.append((summary, epoch)), value=0.5, epoch=3)

    def loss_fn(b):
        stop.set()  # the flag is seen before the next step
        return Loss(nn.functional.mse_loss(model(b[0]), b[1]))

    hooks = EpochHooks(
        train_mode=model.train,
        save_last=lambda *a: pytest.fail("no epoch finished: last must stay as it was"),
        validate=lambda: {"score": 0.9},
        best=best,
    )
    outcome, events, _, _ = run(
        model,
        lambda e: iter([(x, y)] * 3),
        loss_fn,
        tmp_path,
        schedule=Schedule(5, 3, 4),
        stop=stop,
        hooks=hooks,
    )
    assert outcome.stopped and outcome.epochs_completed == 4 and outcome.global_step == 4 * 3 + 1
    assert kept == [({"score": 0.9}, 4)] and (best.value, best.epoch) == (0.9, 4)
    assert [e["event"] for e in events] == ["step"]


def test_best_keeper_and_improved_flag_per_epoch(tmp_path: Path):
    model, x, y = linear_problem()
    scores = iter([0.3, 0.2, 0.4])
    kept: list[int] = []
    hooks = EpochHooks(
        train_mode=model.train,
        save_last=lambda *a: None,
        validate=lambda: {"score": next(scores)},
        best=BestKeeper("score", lambda s, epoch: kept.append(epoch)),
    )
    _, events, _, _ = run(
        model,
        lambda e: iter([(x, y)]),
        lambda b: Loss(nn.functional.mse_loss(model(b[0]), b[1])),
        tmp_path,
        schedule=Schedule(3, 1),
        hooks=hooks,
    )
    ends = [e for e in events if e["event"] == "epoch"]
    assert [e["improved"] for e in ends] == [True, False, True]
    assert [e["best_score"] for e in ends] == [0.3, 0.3, 0.4] and kept == [0, 2]


def test_out_of_memory_becomes_a_training_error_and_other_errors_pass(tmp_path: Path):
    model, x, y = linear_problem()

    def oom(b):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingError, match="try a smaller batch"):
        run(
            model,
            lambda e: iter([(x, y)]),
            oom,
            tmp_path,
            schedule=Schedule(1, 1),
            oom_message=lambda: "out of memory: try a smaller batch",
        )

    def broken(b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(model, lambda e: iter([(x, y)]), broken, tmp_path, schedule=Schedule(1, 1))


def test_autocast_selection_is_one_rule():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert autocast_dtype(cuda) == torch.bfloat16 and autocast_dtype(cuda, enabled=False) is None
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, cpu=True) == torch.bfloat16
    assert autocast_dtype(cpu, enabled=False, cpu=True) is None
    assert autocast_dtype(mps, cpu=True) is None
    a = torch.randn(4, 4)
    with autocast_context(cpu, None):
        assert (a @ a).dtype == torch.float32
    with autocast_context(cpu, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


def test_time_budget_ends_the_run_as_finished_after_a_validated_epoch(tmp_path: Path):
    model, x, y = linear_problem()
    validated: list[int] = []
    hooks = EpochHooks(
        train_mode=model.train,
        save_last=lambda *a: None,
        validate=lambda: validated.append(1) or {"score": 0.5},
        best=BestKeeper("score", lambda s, epoch: None),
    )
    # val_every=2: epoch 0 is past the budget but not validated, so epoch 1 is the last one
    outcome, events, log, _ = run(
        model,
        lambda e: iter([(x, y)] * 2),
        lambda b: Loss(nn.functional.mse_loss(model(b[0]), b[1])),
        tmp_path,
        schedule=Schedule(10, 2, val_every=2, time_budget_s=1e-9),
        hooks=hooks,
    )
    assert not outcome.stopped and outcome.epochs_completed == 2 and outcome.global_step == 4
    assert len(validated) == 1
    budget = [e for e in events if e["event"] == "budget"]
    assert len(budget) == 1 and budget[0]["epoch"] == 1 and budget[0]["budget_s"] == 1e-9
    assert [r["type"] for r in read_metrics(tmp_path / "metrics.jsonl")][-1] == "budget"


def test_time_budget_not_reached_runs_every_epoch(tmp_path: Path):
    model, x, y = linear_problem()
    outcome, events, _, saved = run(
        model,
        lambda e: iter([(x, y)]),
        lambda b: Loss(nn.functional.mse_loss(model(b[0]), b[1])),
        tmp_path,
        schedule=Schedule(3, 1, time_budget_s=3600.0),
    )
    assert outcome.epochs_completed == 3 and saved == [0, 1, 2]
    assert not [e for e in events if e["event"] == "budget"]
