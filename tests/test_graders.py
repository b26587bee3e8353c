"""The build-it-yourself graders test the mechanism, not only an outcome.

Every registered wrong answer of a graded exercise fails a unit check that runs before the
experiment, and the message names it; the slides' own variants of a PPO iteration and other
correct ways to write a DPO loop pass; a reader's mistake written differently from the
registered one is still named. The correct variants and the readers' mistakes are written out
here, not taken from the registry.
"""

import pytest
import torch
import torch.nn.functional as F

from rlcourse import exercises, rl
from rlcourse.exercises import Case, Exercise, Finding, run_check
from rlcourse.exercises.probes import GradientProbe, direction_error
from rlcourse.exercises.solutions import build_reward_model
from rlcourse.preference import policy_logps

GRADED = ["build_reward_model", "dpo_train", "ppo_iteration"]


def _wrong(name):
    return [(name, i, why) for i, (_, why) in enumerate(exercises.get(name).wrong_answers)]


WRONG = [w for name in GRADED for w in _wrong(name)]


@pytest.mark.parametrize("name,index,why", WRONG,
                         ids=[f"{n}-{i}" for n, i, _ in WRONG])
def test_every_wrong_answer_fails_a_unit_check_that_names_it(name, index, why):
    wrong = exercises.get(name).wrong_answers[index][0]
    result = run_check(name, wrong)
    assert result.status == "failed"
    assert "failed the unit check" in result.message  # caught before the experiment
    assert f"likely mistake: {why}" in result.message


def test_the_mistakes_of_the_issue_are_registered():
    whys = {name: " ".join(why for _, why in exercises.get(name).wrong_answers)
            for name in GRADED}
    for words in ("beta outside", "divided by beta", "-sigma(beta h)", "from the policy itself",
                  "zero_grad", "plain SFT"):
        assert words in whys["dpo_train"], words
    for words in ("KL coefficient's sign", "critic's loss enters with a minus", "zero_grad",
                  "minimised +A rho", "first response token", "rewards as advantages"):
        assert words in whys["ppo_iteration"], words
    assert "inverted" in whys["build_reward_model"]


# ---- chapter 8: the slides' own forms of a PPO iteration pass ----------------------------------
def _logprobs(logits, ids):
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _slides_iteration(lam_override=None, epochs_override=None, per_response=False,
                      clip=True):
    """A PPO iteration as the slides write it: ``lam_override=0`` is their advantage
    R_t + V_{t+1} - V_t, ``per_response`` one update after each finished response, ``clip=False``
    their unclipped losses."""

    def iteration(policy, reference, optimizer, world, generator, batch_size=64, kl_coef=0.02,
                  clip_eps=0.2, lam=0.95, epochs=4):
        lam = lam if lam_override is None else lam_override
        epochs = epochs if epochs_override is None else epochs_override
        batch = world.rollout(policy, batch_size, generator)
        ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].float()
        with torch.no_grad():
            logits, values = policy(ids)
            old, values = _logprobs(logits, ids), values[:, :-1]
            kl = old - _logprobs(reference(ids)[0], ids)
            rewards = -kl_coef * kl * mask
            last = (mask * torch.arange(mask.shape[1])).argmax(-1)
            rewards[torch.arange(len(ids)), last] += batch["rewards"]
            advantages, returns = rl.gae(rewards, values, 1.0, lam, mask)
            advantages = rl.masked_whiten(advantages, mask)
        rows = [[b] for b in range(len(ids))] if per_response else [list(range(len(ids)))]
        for _ in range(epochs):
            for r in rows:
                logits, v = policy(ids[r])
                ratio = torch.exp(_logprobs(logits, ids[r]) - old[r])
                pg = -advantages[r] * ratio
                if clip:
                    pg = torch.maximum(pg, -advantages[r] * ratio.clamp(1 - clip_eps,
                                                                          1 + clip_eps))
                vf = 0.5 * (v[:, :-1] - returns[r]) ** 2
                loss = ((pg + 0.5 * vf) * mask[r]).sum() / mask[r].sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return float(batch["rewards"].mean())

    return iteration


FAST_SLIDES = {
    "lambda=0": _slides_iteration(lam_override=0.0),
    "one update per batch": _slides_iteration(epochs_override=1),
    "no clipping": _slides_iteration(clip=False),
}


@pytest.mark.parametrize("variant", sorted(FAST_SLIDES))
def test_slides_variants_of_a_ppo_iteration_pass(variant):
    result = run_check("ppo_iteration", FAST_SLIDES[variant])
    assert result.passed, result.message


@pytest.mark.slow
@pytest.mark.parametrize("lam", [0.95, 0.0], ids=["lambda=0.95", "lambda=0"])
def test_one_update_per_finished_response_passes(lam):
    # 64 optimizer steps per call: about 4 s on a quiet CPU (unit checks and three graded runs)
    iteration = _slides_iteration(lam_override=lam, epochs_override=1, per_response=True,
                                  clip=lam != 0.0)
    result = run_check("ppo_iteration", iteration)
    assert result.passed, result.message


def test_a_kl_bonus_written_differently_is_named():
    def kl_bonus(policy, reference, optimizer, world, generator, batch_size=64, kl_coef=0.02,
                 clip_eps=0.2, lam=0.95, epochs=4):
        return _slides_iteration()(policy, reference, optimizer, world, generator, batch_size,
                                   -kl_coef, clip_eps, lam, epochs)

    result = run_check("ppo_iteration", kl_bonus)
    assert result.status == "failed" and 'unit check "kl_sign"' in result.message
    assert "likely mistake: the KL coefficient's sign flipped" in result.message


# ---- chapter 9: other correct DPO loops pass the unit checks; mistakes are named ---------------
def _dpo_variant(loss_of, separate_steps=False, precompute=True):
    def loop(policy, reference, batches, beta, lr):
        optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
        refs = []
        if precompute:
            with torch.no_grad():
                refs = [policy_logps(reference, b)[:2] for b in batches]
        for i, batch in enumerate(batches):
            pc, pr, _, _ = policy_logps(policy, batch)
            if precompute:
                rc, rr = refs[i]
            else:
                with torch.no_grad():
                    rc, rr, _, _ = policy_logps(reference, batch)
            losses = loss_of((pc - rc) - (pr - rr), beta)
            if separate_steps:  # gradient accumulation: two backward passes, one step
                losses[: len(losses) // 2].sum().backward(retain_graph=True)
                losses[len(losses) // 2:].sum().backward()
            else:
                losses.sum().backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
            optimizer.step()
            optimizer.zero_grad()  # after the step: the next backward starts clean

    return loop


def test_other_correct_dpo_loops_pass_the_unit_checks():
    mechanism = exercises.get("dpo_train").mechanism
    softplus = _dpo_variant(lambda h, beta: F.softplus(-beta * h))
    accumulated = _dpo_variant(lambda h, beta: -F.logsigmoid(beta * h), separate_steps=True,
                               precompute=False)
    assert mechanism(softplus) is None
    assert mechanism(accumulated) is None


@pytest.mark.parametrize("loss_of,words", [
    (lambda h, beta: beta * F.softplus(-h), "beta outside the log-sigmoid"),
    (lambda h, beta: F.softplus(-h / beta), "divided by beta"),
    (lambda h, beta: 1 - torch.sigmoid(beta * h), "forgot the log"),
], ids=["beta outside", "beta divides", "sigma"])
def test_a_dpo_mistake_written_differently_is_named(loss_of, words):
    result = run_check("dpo_train", _dpo_variant(loss_of))
    assert result.status == "failed" and 'unit check "first_step_gradient"' in result.message
    assert words in result.message.split("likely mistake:")[1]


# ---- chapter 7: an inverted ranking is called inverted -----------------------------------------
def test_a_negated_reward_model_is_told_its_ranking_is_inverted():
    def negated(pairs):
        score = build_reward_model(pairs)
        return lambda prompt, response: -score(prompt, response)

    result = run_check("build_reward_model", negated)
    assert result.status == "failed"
    assert "below 0.5" in result.message and "ranking is inverted" in result.message
    assert "likely mistake: its ranking is inverted" in result.message


def test_the_outcome_report_calls_an_accuracy_below_one_half_inverted():
    exercise = exercises.get("build_reward_model")
    reversed_model = exercise.wrong_answers[0][0]
    passed, report = exercise.grade(reversed_model)  # the experiment alone, past the unit check
    assert not passed and "below 0.5" in report and "inverted" in report


# ---- the framework: the mechanism runs first and names the matching wrong answer --------------
@pytest.fixture
def toy_graded():
    """A graded exercise whose mechanism looks at fn(3): it must be 9."""

    def mechanism(fn):
        value = fn(3)
        if value == 9:
            return None
        return Finding("square", f"fn(3) = {value}, not 9", value)

    calls = []

    def grade(fn):
        calls.append(fn)
        return fn(4) == 16, "fn(4) checked"

    ex = Exercise(
        name="_toy_graded", chapter="_toy", reference=lambda x: x * x,
        cases=lambda rng: [], hint="square it", grade=grade, mechanism=mechanism,
        evidence_distance=lambda mine, theirs: abs(mine.evidence - theirs.evidence),
        wrong_answers=[(lambda x: x + x, "doubled"), (lambda x: x ** 3, "cubed")],
    )
    exercises.register(ex)
    yield ex, calls
    exercises.REGISTRY.pop(ex.name)
    exercises._WRONG_FINDINGS.pop(ex.name, None)


def test_graded_mechanism_failure_names_the_closest_wrong_answer(toy_graded):
    _, calls = toy_graded
    result = run_check("_toy_graded", lambda x: x ** 3)
    assert result.status == "failed" and "likely mistake: cubed" in result.message
    assert "fn(3) = 27, not 9" in result.message and "hint:" in result.message
    assert calls == []  # the experiment did not run
    unknown = run_check("_toy_graded", lambda x: x - 100)
    assert unknown.status == "failed" and "likely mistake" not in unknown.message


def test_graded_passes_through_mechanism_and_experiment(toy_graded):
    _, calls = toy_graded
    assert run_check("_toy_graded", lambda x: x * x).passed and len(calls) == 1


def test_graded_stub_and_crash_inside_the_mechanism(toy_graded):
    def stub(x):
        raise NotImplementedError

    assert run_check("_toy_graded", stub).status == "not_attempted"
    result = run_check("_toy_graded", lambda x: 1 / 0)
    assert result.status == "error" and "ZeroDivisionError" in result.message


def test_a_plain_exercise_is_unchanged_by_graded_machinery():
    ex = Exercise(name="_plain", chapter="_toy", reference=abs,
                  cases=lambda rng: [Case((-2,))], hint="")
    assert ex.mechanism is None and ex.grade is None


# ---- the probe that watches a model's gradients -------------------------------------------------
def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, [torch.randn(4, 3) for _ in range(3)]


def _manual_first_gradient(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.parametrize("order", ["zero_grad first", "zero_grad last", "none"])
def test_gradient_probe_sees_a_missing_zero_grad_only(order):
    model, data = _model_and_data()
    expected = _manual_first_gradient(model, data[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientProbe(model.parameters()) as probe:
        for x in data:
            if order == "zero_grad first":
                optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
            if order == "zero_grad last":
                optimizer.zero_grad()
    assert probe.moved and probe.backwards == 3
    assert probe.stale == (order == "none")
    assert torch.allclose(probe.first_gradient, expected, rtol=1e-6, atol=1e-9)


def test_gradient_probe_sums_backward_passes_before_one_step():
    model, data = _model_and_data()
    expected = _manual_first_gradient(model, data[0]) + _manual_first_gradient(model, data[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientProbe(model.parameters()) as probe:
        model(data[0]).pow(2).mean().backward()
        model(data[1]).pow(2).mean().backward()  # accumulation, then one step: not stale
        optimizer.step()
        optimizer.zero_grad()
        model(data[2]).pow(2).mean().backward()
        optimizer.step()
    assert not probe.stale
    assert torch.allclose(probe.first_gradient, expected, rtol=1e-6, atol=1e-9)
    # the hooks are gone afterwards
    model(data[0]).sum().backward()
    assert probe.backwards == 3


def test_direction_error_ignores_scale_only():
    g = torch.tensor([1.0, 2.0, -1.0])
    assert direction_error(3 * g, g) < 1e-12
    assert abs(direction_error(-g, g) - 2.0) < 1e-12
    assert direction_error(g + torch.tensor([0.0, 0.0, 0.5]), g) > 0.1
