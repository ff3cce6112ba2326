"""The budget's two accounts, at the unit level with synthetic costs: a run of long epochs keeps the whole suite (step-0
views, every call, the last words, the per-step sampling) to the pace; a run of short epochs still gets the smallest
step-0 views and last words from the ceiling."""

from __future__ import annotations

from lightning_viz._budget import PACE, Budget

# name: (cadence, knobs, seconds at full scale, seconds at the smallest, cheap, evidence); the members without `cheap`
# defer their step-0 view until the budget knows what the run can afford (as the expensive monitors do)
SUITE = {
    "filters": (1, {}, 0.01, 0.01, True, False),
    "activations": (1, {}, 0.13, 0.13, True, True),
    "saliency": (2, {"probes": (6, 1)}, 1.5, 0.2, False, False),
    "embedding": (3, {}, 0.43, 0.43, False, False),
    "exemplars": (5, {"samples": (2000, 64)}, 1.5, 0.2, False, False),
    "featurevis": (10, {"steps": (64, 8)}, 2.0, 0.2, False, False),
    "dynamics": (1, {}, 0.1, 0.1, True, True),
}
PASS = 1e-3  # seconds per sample pass: a member's estimate before its first call is 0.25 s + its cost (pessimistic)


def _seconds(spec, scale: float) -> float:
    _, knobs, full, smallest, _, _ = spec
    return smallest + scale * (full - smallest) if knobs else full


def _run(epochs: int, epoch_seconds: float, suite=SUITE, sampling: float = 0.0025) -> tuple[Budget, dict]:
    """A fit as the monitors drive the budget: the cheap step-0 views at the start, the others' after the first
    epoch's training (from the initial weights), each epoch's plan, per-step sampling charged as it happens, and the
    last word of every member that has not logged the final epoch. Returns the budget and each member's calls."""
    now = [0.0]
    budget = Budget(0.05, clock=lambda: now[0])
    for name, spec in suite.items():
        cadence, knobs, _, _, cheap, evidence = spec
        budget.join(name, cadence, knobs, units=lambda s, spec=spec: _seconds(spec, s) / (2 * PASS), cheap=cheap)
        budget.members[name].evidence = evidence
    budget.expected_epochs, budget.pass_seconds = epochs, PASS
    calls: dict[str, list[tuple[int, float]]] = {name: [] for name in suite}

    def call(name: str, scale: float, epoch: int) -> None:
        seconds = _seconds(suite[name], scale)
        now[0] += seconds
        budget.charge(name, seconds, scale=scale, epoch=epoch)
        calls[name].append((epoch, scale))

    for name, spec in suite.items():
        if spec[4]:
            call(name, 1.0, 0)
    for epoch in range(epochs):
        budget.epoch_start(epoch)
        now[0] += epoch_seconds
        budget.spent["dynamics"] = budget.spent.get("dynamics", 0.0) + sampling * epoch_seconds  # per-step sampling
        now[0] += sampling * epoch_seconds
        if epoch == 0:
            for name, spec in suite.items():
                scale = None if spec[4] else budget.baseline(name, 0)
                if scale is not None:
                    call(name, scale, 0)
        budget.epoch_end(epoch)
        for name, scale in budget.plan(epoch).items():
            call(name, scale, epoch + 1)
    for name in suite:
        if budget.last_epoch.get(name) != epochs:
            scale = budget.last_word(name, epochs - 1)
            if scale is not None:
                call(name, scale, epochs)
    return budget, calls


def test_a_run_of_long_epochs_keeps_the_whole_suite_to_the_pace():
    # 20 epochs of 100 s: the pace (1 % under the default 5 %) is 1 s an epoch, 20 s in all
    budget, calls = _run(20, 100.0)
    assert budget.long_epochs(19)
    # everything counted: step-0 views, every call, the last words, the per-step sampling, the timed pass
    assert budget.spent_total <= 0.05 * PACE * budget.train_seconds
    assert budget.spent["dynamics"] > 0.0025 * budget.train_seconds  # the sampling was in the account
    # the pace paid for every step-0 view and every last word: nothing was left out
    assert all(calls[name][0][0] == 0 for name in SUITE), calls
    assert all(calls[name][-1][0] == 20 for name in SUITE), calls
    assert not budget.dropped
    # the expensive monitors logged between the two ends too, within the pace
    assert all(len(calls[name]) > 2 for name in ("saliency", "exemplars", "embedding"))


def test_a_few_long_epochs_leave_out_step_0_views_rather_than_the_pace():
    """Three epochs of 100 s cannot pay, within 1 %, for every step-0 view on top of the cheap monitors, the sampling
    and the last words: the step-0 views of the expensive monitors go (said once), the trained network's views stay."""
    budget, calls = _run(3, 100.0)
    assert budget.long_epochs(2)
    assert all(calls[name][-1][0] == 3 for name in SUITE), calls
    left_out = [what for what in budget.dropped if what.startswith("the untrained network's")]
    assert left_out and not [what for what in budget.dropped if what.startswith("the trained network's")]
    # the whole-run pace was kept but for the last words' share that it could not set aside (at most one of them)
    assert budget.spent_total <= 0.05 * PACE * budget.train_seconds + max(s[3] for s in SUITE.values())


def test_a_run_of_short_epochs_still_gets_its_smallest_views_from_the_ceiling():
    # 6 epochs of 6 s: one epoch's pace (0.06 s) pays for no view (0.08 s at the smallest, every epoch); the ceiling
    # (5 %: 1.8 s) pays for the smallest ones, the step-0 views within a quarter of it
    suite = {
        "filters": SUITE["filters"],
        "saliency": (1, {"probes": (6, 1)}, 1.5, 0.08, False, False),
        "exemplars": (1, {"samples": (2000, 64)}, 1.5, 0.08, False, False),
    }
    budget, calls = _run(6, 6.0, suite, sampling=0.0)
    assert not budget.long_epochs(5)
    for name in ("saliency", "exemplars"):
        assert [epoch for epoch, _ in calls[name]] == [0, 6]  # the untrained and the trained network
        assert all(scale == 0.0 for _, scale in calls[name])  # at their smallest
    assert 0.05 * PACE * budget.train_seconds < budget.spent_total <= 0.05 * budget.train_seconds


def test_the_accounts_are_saved_with_the_plans():
    budget, _ = _run(4, 100.0)
    again = Budget(0.05, clock=budget.clock)
    again.members = budget.members
    again.expected_epochs = budget.expected_epochs
    again.load_state_dict(budget.state_dict())
    assert (again.charged, again.step0) == (budget.charged, budget.step0)
    assert again.forced(3) == budget.forced(3) and again.long_epochs(3) == budget.long_epochs(3)
