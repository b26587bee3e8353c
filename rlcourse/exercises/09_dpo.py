"""Exercises of chapter 9, "DPO": the loss, the implicit reward, IPO and R-DPO's sign."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from rlcourse import losses
from rlcourse.exercises import Case, Exercise, register
from rlcourse.exercises.solutions import dpo_train

CHAPTER = "09_dpo"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


def _four(rng: np.random.Generator, n: int = 8, spread: float = 3.0):
    pc = -rng.uniform(5, 60, n)
    pr = -rng.uniform(5, 60, n)
    return (_t(pc), _t(pr), _t(pc + rng.normal(0, spread, n)), _t(pr + rng.normal(0, spread, n)))


# ---- the DPO loss --------------------------------------------------------------------------------
def _dpo_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, rc, rr = _four(rng)
    far = (_t([-10.0, -3000.0]), _t([-3000.0, -10.0]), _t([-20.0, -20.0]), _t([-20.0, -20.0]))
    return [
        Case((pc, pr, rc, rr, 0.1), label="random log-probs, beta = 0.1"),
        Case((pc, pr, rc, rr, 0.5), label="beta = 0.5"),
        Case((pc, pr, pc.clone(), pr.clone(), 0.1), label="policy = reference: ln 2"),
        Case((*far, 1.0), label="huge margins: use logsigmoid, not log(sigmoid)"),
    ]


def _dpo_ref(pc, pr, rc, rr, beta):
    return losses.dpo_loss(pc, pr, rc, rr, beta=beta)


register(Exercise(
    name="dpo_loss",
    chapter=CHAPTER,
    reference=_dpo_ref,
    cases=_dpo_cases,
    hint="h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); the loss per example "
         "is -log sigma(beta h). torch.nn.functional.logsigmoid stays finite where "
         "log(sigmoid(x)) gives -inf.",
    wrong_answers=[
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid((pc - rc) - (pr - rr)), "forgot beta"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pr - rr) - (pc - rc))),
         "swapped chosen and rejected: the loss should fall as the chosen answer gains"),
        (lambda pc, pr, rc, rr, beta: -torch.sigmoid(beta * ((pc - rc) - (pr - rr))),
         "used sigma instead of log sigma"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)),
         "left out the reference model's log-probs"),
        (lambda pc, pr, rc, rr, beta: -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr)))),
         "log(sigmoid(x)) underflows to -inf for very negative x: use logsigmoid"),
    ],
))


# ---- implicit rewards ------------------------------------------------------------------------
def _reward_cases(rng: np.random.Generator) -> list[Case]:
    pc, _, rc, _ = _four(rng)
    return [
        Case((pc, rc, 0.1), label="beta = 0.1"),
        Case((pc, rc, 2.0), label="beta = 2"),
        Case((rc, rc.clone(), 0.3), label="policy = reference: reward 0"),
    ]


register(Exercise(
    name="dpo_implicit_reward",
    chapter=CHAPTER,
    reference=lambda policy_logps, reference_logps, beta: losses.implicit_rewards(
        policy_logps, reference_logps, beta),
    cases=_reward_cases,
    hint="DPO's reward of an answer is beta times how much more likely the policy makes it "
         "than the reference does, in logs: beta (log pi(y|x) - log ref(y|x)).",
    wrong_answers=[
        (lambda p, r, beta: p - r, "forgot beta"),
        (lambda p, r, beta: beta * (r - p), "sign reversed: reference minus policy"),
        (lambda p, r, beta: beta * p, "left out the reference: log pi alone is not the reward"),
    ],
))


# ---- R-DPO ----------------------------------------------------------------------------------
def _rdpo_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, rc, rr = _four(rng)
    lc = _t(rng.integers(3, 40, 8))
    lr = _t(rng.integers(3, 40, 8))
    return [
        Case((pc, pr, rc, rr, lc, lr, 0.1, 0.05), label="random pairs"),
        Case((pc, pr, rc, rr, lc, lr, 0.5, 0.01), label="beta 0.5, alpha 0.01"),
        Case((pc, pr, pc.clone(), pr.clone(), _t([30.0] * 8), _t([10.0] * 8), 0.1, 0.05),
             label="policy = reference, chosen longer"),
    ]


def _rdpo_minus(pc, pr, rc, rr, lc, lr, beta, alpha):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)) - alpha * (lc - lr))


register(Exercise(
    name="rdpo_loss",
    chapter=CHAPTER,
    reference=lambda pc, pr, rc, rr, lc, lr, beta, alpha: losses.rdpo_loss(
        pc, pr, rc, rr, lc, lr, beta=beta, alpha=alpha),
    cases=_rdpo_cases,
    hint="Start from max E[r - alpha |y|] - beta KL: the optimal policy gives "
         "r = beta log(pi*/ref) + alpha |y| + beta log Z. Put that r into Bradley-Terry, "
         "sigma(r_w - r_l), and see which sign the length term gets.",
    wrong_answers=[
        (_rdpo_minus, "the minus sign of the slides' table: derive it from the objective"),
        (lambda pc, pr, rc, rr, lc, lr, beta, alpha: losses.dpo_loss(pc, pr, rc, rr, beta=beta),
         "left out the length term: that is plain DPO"),
        (lambda pc, pr, rc, rr, lc, lr, beta, alpha:
         -F.logsigmoid(beta * ((pc - rc) - (pr - rr) + alpha * (lc - lr))),
         "multiplied the length term by beta as well"),
    ],
))


# ---- IPO ------------------------------------------------------------------------------------
def _ipo_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, rc, rr = _four(rng, spread=1.0)
    return [
        Case((pc, pr, rc, rr, 0.1), label="tau = 0.1"),
        Case((pc, pr, rc, rr, 0.5), label="tau = 0.5"),
        Case((pc, pr, pc.clone(), pr.clone(), 0.25), label="policy = reference"),
    ]


register(Exercise(
    name="ipo_loss",
    chapter=CHAPTER,
    reference=lambda pc, pr, rc, rr, tau: losses.ipo_loss(pc, pr, rc, rr, tau=tau),
    cases=_ipo_cases,
    hint="IPO regresses the margin h (summed log-ratios here) onto the target 1/(2 tau): "
         "(h - 1/(2 tau))^2.",
    wrong_answers=[
        (lambda pc, pr, rc, rr, tau: ((pc - rc) - (pr - rr) - 1 / tau) ** 2,
         "target 1/tau instead of 1/(2 tau)"),
        (lambda pc, pr, rc, rr, tau: ((pc - rc) - (pr - rr) - 1 / (2 * tau)).abs(),
         "absolute value instead of the square"),
        (lambda pc, pr, rc, rr, tau: ((pc - rc) - (pr - rr) + 1 / (2 * tau)) ** 2,
         "sign of the target: the margin should approach +1/(2 tau)"),
    ],
))


# ---- build it yourself: a DPO training loop on the small GPT -----------------------------------
DPO_TRAIN_PAIRS, DPO_BATCH, DPO_BETA, DPO_LR = 320, 32, 0.5, 5e-4
DPO_HELD_OUT, DPO_PROMPTS = 200, 60
DPO_ACCURACY_BAR, DPO_WIN_BAR = 0.6, 0.4


@functools.lru_cache(maxsize=1)
def _dpo_data():
    """The shipped SFT model, training batches (fixed order) and held-out pairs: loaded once."""
    from rlcourse.config import DATA_DIR
    from rlcourse.data import load_preferences, pad_collate, read_jsonl
    from rlcourse.models import load_model
    from rlcourse.preference import tokenize_pairs

    sft, tokenizer = load_model(DATA_DIR / "checkpoints" / "sft", device="cpu")
    pairs = load_preferences(DATA_DIR / "preferences.jsonl")
    items = tokenize_pairs(tokenizer, pairs[:DPO_TRAIN_PAIRS], truncation="right")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [pad_collate([items[i] for i in order[s:s + DPO_BATCH]])
               for s in range(0, len(order), DPO_BATCH)]
    held = pad_collate(tokenize_pairs(tokenizer, pairs[-DPO_HELD_OUT:], truncation="right"))
    prompts = [r["prompt"] for r in read_jsonl(DATA_DIR / "eval_prompts.jsonl")][:DPO_PROMPTS]
    return sft, tokenizer, batches, held, prompts


def grade_dpo_train(fn) -> tuple[bool, str]:
    """Run ``fn(policy, reference, batches, beta, lr)`` once over 320 shipped pairs (10 batches
    of 32) from the shipped SFT model, then measure two things:

    - the implicit-reward accuracy on 200 held-out pairs: the share with
      ``(log pi - log ref)(y_w) > (log pi - log ref)(y_l)`` (0 at the start: every margin is 0);
    - the win rate against the SFT model on 60 evaluation prompts, judged by the world's
      hidden score (``evaluate_against``), with its bootstrap standard error.

    Passes with accuracy >= 0.6 and a win rate >= 0.4. The solution measures 0.660 and
    0.517 +- 0.054. Neither bar can tell DPO from its near misses: one short epoch from
    policy = reference moves the model little, and there every margin h is 0, where a misplaced
    beta, -sigma(beta h) and a no-grad copy of the policy as the reference all take DPO's first
    step (measured, with no zero_grad and plain SFT on the chosen answers too: accuracy 0.625
    to 0.645, win rate 0.450 to 0.558). Telling them apart is the unit checks' job
    (``dpo_mechanism``), which every one of them fails. The bars catch what the unit checks
    cannot see: a loop that breaks the model, e.g. ten times the learning rate (accuracy
    0.600, win rate 0.067 +- 0.030), or one that does not learn from the pairs.
    """
    import copy

    from rlcourse.evaluation import evaluate_against
    from rlcourse.preference import policy_logps

    sft, tokenizer, batches, held, prompts = _dpo_data()
    torch.manual_seed(0)
    policy, reference = copy.deepcopy(sft), copy.deepcopy(sft).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    fn(policy, reference, batches, DPO_BETA, DPO_LR)
    policy.eval()
    with torch.no_grad():
        pc, pr, _, _ = policy_logps(policy, held)
        rc, rr, _, _ = policy_logps(reference, held)
    accuracy = float((((pc - rc) - (pr - rr)) > 0).float().mean())
    win = evaluate_against(policy, reference, tokenizer, prompts, seed=0).win
    report = (f"implicit-reward accuracy on {DPO_HELD_OUT} held-out pairs {accuracy:.3f} "
              f"(bar {DPO_ACCURACY_BAR}); win rate vs SFT {win.rate:.3f} +- {win.stderr:.3f} "
              f"on {len(prompts)} prompts (bar {DPO_WIN_BAR})")
    return accuracy >= DPO_ACCURACY_BAR and win.rate >= DPO_WIN_BAR, report


# ---- the mechanism: one step's gradient on a fixed case, then a second step -------------------
DPO_PROBE_PAIRS = slice(400, 416)  # 2 batches of 8 shipped pairs, outside the graded 320
DPO_DIRECTION_TOLERANCE = 0.01     # || g/|g| - g_dpo/|g_dpo| ||: rounding gives about 1e-5


@functools.lru_cache(maxsize=1)
def _probe_case():
    """The fixed case of the unit checks: the shipped SFT model as the policy and the shipped
    *pretrained* model as the reference, so that the margins h differ from 0 (from about -4 to
    17 on these pairs; at h = 0, where the graded run starts, every misplaced beta and even
    -sigma(beta h) give the same direction as DPO), and two batches of 8 pairs."""
    from rlcourse.config import DATA_DIR
    from rlcourse.data import load_preferences, pad_collate
    from rlcourse.models import load_model
    from rlcourse.preference import tokenize_pairs

    policy, tokenizer = load_model(DATA_DIR / "checkpoints" / "sft", device="cpu")
    reference, _ = load_model(DATA_DIR / "checkpoints" / "base", device="cpu")
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    pairs = load_preferences(DATA_DIR / "preferences.jsonl")[DPO_PROBE_PAIRS]
    items = tokenize_pairs(tokenizer, pairs, truncation="right")
    return policy, reference, [pad_collate(items[:8]), pad_collate(items[8:])]


def _probe(fn):
    """Run ``fn`` on a copy of the probe's policy, watched by a :class:`GradientProbe`."""
    import copy

    from rlcourse.exercises.probes import GradientProbe

    policy0, reference, batches = _probe_case()
    policy = copy.deepcopy(policy0)
    with GradientProbe(policy.parameters()) as probe:
        fn(policy, reference, [dict(b) for b in batches], DPO_BETA, DPO_LR)
    return probe


@functools.lru_cache(maxsize=1)
def _dpo_direction() -> torch.Tensor:
    """The first step's gradient of the solution on the probe's case."""
    return _probe(dpo_train).first_gradient


def dpo_mechanism(fn):
    """Unit checks of a DPO loop ``fn(policy, reference, batches, beta, lr)`` on a fixed case
    (see ``_probe_case``), before the graded run:

    1. the gradient of the first update points the way DPO's does (any positive scale: a sum
       over the batch passes where the solution takes the mean);
    2. the update is applied (the policy's weights change);
    3. the second batch's backward pass does not find the first batch's gradient still in
       ``.grad`` (``optimizer.zero_grad()``).
    """
    from rlcourse.exercises import Finding
    from rlcourse.exercises.probes import direction_error

    probe = _probe(fn)
    g, target = probe.first_gradient, _dpo_direction()
    if float(g.norm()) == 0.0:
        return Finding("first_step_gradient", "no gradient reached the policy's weights before "
                       "its first update: the loss must come from policy_logps(policy, batch) "
                       "with gradients on, followed by loss.backward().")
    error = direction_error(g, target)
    if error > DPO_DIRECTION_TOLERANCE:
        cos = float(g @ target / (g.norm() * target.norm()))
        return Finding(
            "first_step_gradient",
            f"on a fixed batch of 8 pairs, with the SFT model as the policy and the pretrained "
            f"model as the reference (so the margins h are far from 0), the gradient of your "
            f"first update points elsewhere than the gradient of DPO's "
            f"-mean log sigma(beta h): cosine {cos:.4f} (1 up to rounding; a summed loss "
            f"passes).", (g / g.norm()).float())
    if not probe.moved:
        return Finding("update", "the policy's weights did not change: call optimizer.step() "
                       "after loss.backward(), with an optimizer over policy.parameters().")
    if probe.stale:
        return Finding("zero_grad", "the backward pass of the second batch found the first "
                       "batch's gradient still in .grad after the first update: every step "
                       "then adds up all earlier gradients.")
    return None


def _dpo_evidence_distance(mine, theirs) -> float:
    from rlcourse.exercises.probes import direction_error

    if mine.check == "first_step_gradient" and mine.evidence is not None and (
            theirs.evidence is not None):
        return direction_error(mine.evidence, theirs.evidence) / 0.05
    return 0.0


# ---- wrong answers: each one the mechanism rejects, each one named ------------------------------
def _dpo_loop(loss_of, reference_is_policy: bool = False, zero_grad: bool = True):
    """A DPO loop like the solution's, with the loss ``loss_of(pc, pr, rc, rr, beta)``."""

    def loop(policy, reference, batches, beta=0.5, lr=5e-4):
        from rlcourse.preference import policy_logps

        optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
        for batch in batches:
            pc, pr, _, _ = policy_logps(policy, batch)
            with torch.no_grad():
                rc, rr, _, _ = policy_logps(policy if reference_is_policy else reference, batch)
            loss = loss_of(pc, pr, rc, rr, beta)
            if zero_grad:
                optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return loop


def _h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


register(Exercise(
    name="dpo_train",
    chapter=CHAPTER,
    reference=dpo_train,
    solution=dpo_train,
    cases=lambda rng: [],
    grade=grade_dpo_train,
    mechanism=dpo_mechanism,
    evidence_distance=_dpo_evidence_distance,
    hint="An AdamW optimizer on policy.parameters(); for each batch: policy_logps(policy, batch) "
         "-> summed log-probs of chosen and rejected; the same for the reference under "
         "torch.no_grad(); loss = -logsigmoid(beta * (margin of the log-ratios)).mean(); "
         "zero_grad, backward, step.",
    wrong_answers=[
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pr, pc, rr, rc)).mean()),
         "chosen and rejected swapped: the model learns the annotator's dislikes"),
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)).mean()),
         "left out the reference: the margin of raw log-probs is not DPO's"),
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -(beta * F.logsigmoid(_h(pc, pr, rc, rr))).mean()),
         "beta outside the log-sigmoid, -beta log sigma(h): beta belongs inside, "
         "-log sigma(beta h)"),
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -F.logsigmoid(_h(pc, pr, rc, rr) / beta).mean()),
         "divided by beta, -log sigma(h / beta): the margin is multiplied by beta"),
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -torch.sigmoid(beta * _h(pc, pr, rc, rr)).mean()),
         "-sigma(beta h) in place of -log sigma(beta h): forgot the log"),
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pc, pr, rc, rr)).mean(),
                   reference_is_policy=True),
         "the reference's log-probs came from the policy itself (a no-grad copy): h is always "
         "0, so every pair gets the same weight; use the frozen reference model"),
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pc, pr, rc, rr)).mean(),
                   zero_grad=False),
         "no optimizer.zero_grad(): each step adds up the gradients of all earlier batches"),
        (_dpo_loop(lambda pc, pr, rc, rr, beta: -pc.mean()),
         "plain SFT on the chosen answers: no rejected answer and no reference, so no DPO"),
    ],
))
