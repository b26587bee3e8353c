"""Reductions across processes, run in 2 real gloo processes (``torch.multiprocessing``).

* the engine's logged metrics when processes report different metric keys (KTO logs
  ``rewards/chosen`` only for a batch holding a desirable example): the sums were stacked in
  key order and added position by position, which mixed one metric into another when the key
  sets differed and hung the collective when their sizes differed;
* PPO's and the group methods' per-step metrics (``mean_over_processes``): each process's value
  counts once;
* KTO's reference point z0 over the global batch: every process's mismatched-pair log-ratios,
  gathered, including uneven shares.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlcourse.engine import _reduce_metrics, mean_over_processes
from rlcourse.losses import kto_reference_point
from rlcourse.preference import _gathered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Accelerator(SimpleNamespace):
    def reduce(self, t, op):
        assert op == "sum"
        dist.all_reduce(t)
        return t


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        acc = _Accelerator(num_processes=2, device=torch.device("cpu"))
        # rank 0: two micro-batches, one with a desirable example; rank 1: two without
        sums = ({"loss": [torch.tensor(1.0), torch.tensor(3.0)],
                 "rewards/chosen": [torch.tensor(0.5)]} if rank == 0 else
                {"loss": [torch.tensor(5.0), torch.tensor(7.0)],
                 "rewards/rejected": [torch.tensor(-1.0), torch.tensor(-2.0)]})
        metrics, tokens = _reduce_metrics(acc, sums, tokens=10 + rank)
        # uneven shares of the batch's mismatched-pair log-ratios
        share = torch.tensor([0.4, 1.0, -0.2]) if rank == 0 else torch.tensor([0.9])
        gathered = _gathered(share)
        step_means = mean_over_processes(acc, {"kl": [0.1, 0.5][rank], "score": [1.0, 4.0][rank]})
        results[rank] = (metrics, tokens, gathered.tolist(),
                         float(kto_reference_point(gathered, torch.zeros_like(gathered))),
                         step_means)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_metrics_and_kto_z0_over_two_processes_equal_the_global_batch():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        metrics, tokens, gathered, z0, step_means = results[rank]
        # hand-computed: every micro-batch that reported a metric weighs the same
        assert metrics == pytest.approx({"loss": (1 + 3 + 5 + 7) / 4, "rewards/chosen": 0.5,
                                         "rewards/rejected": -1.5})
        assert tokens == 21
        assert gathered == pytest.approx([0.4, 1.0, -0.2, 0.9])
        assert z0 == pytest.approx((0.4 + 1.0 - 0.2 + 0.9) / 4)  # not rank 0's 0.4 alone
        assert step_means == pytest.approx({"kl": 0.3, "score": 2.5})  # not this rank's own


def test_one_process_is_unchanged():
    acc = _Accelerator(num_processes=1, device=torch.device("cpu"))
    metrics, tokens = _reduce_metrics(acc, {"loss": [torch.tensor(1.0), torch.tensor(2.0)]}, 5)
    assert metrics == {"loss": 1.5} and tokens == 5
    step = {"kl": 0.25, "score": 1.0}
    assert mean_over_processes(acc, step) == step and mean_over_processes(None, step) == step
    t = torch.tensor([1.0, 2.0])
    assert _gathered(t) is t


def test_pooled_metrics_weigh_their_counts_not_their_micro_batches():
    """KTO's rewards/chosen is a mean over a micro-batch's desirable examples: micro-batches
    holding 1 and 3 of them (means 0.5 and -1.5) pool to (0.5 - 3 * 1.5) / 4 = -1.0, what one
    batch holding all four gives; an equal weight per micro-batch would log -0.5."""
    from rlcourse.engine import Pooled, _split_pooled

    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    sums, weights = {}, {}
    for metrics in ({"loss": 1.0, "rewards/chosen": Pooled(0.5, 1)},
                    {"loss": 3.0, "rewards/chosen": Pooled(-1.5, 3)}):
        for k, v in metrics.items():
            value, weight = _split_pooled(v)
            sums.setdefault(k, []).append(torch.tensor(value) * weight)
            weights.setdefault(k, []).append(weight)
    means, _ = _reduce_metrics(acc, sums, 0, weights)
    assert means == {"loss": 2.0, "rewards/chosen": -1.0}


def test_kto_loss_fn_reports_its_label_means_with_their_counts():
    from rlcourse.engine import Pooled
    from rlcourse.models import build_model, build_tokenizer
    from rlcourse.preference import kto_loss_fn, precompute_reference_logps, tokenize_kto

    tok = build_tokenizer(["what is rain ? rain is wet dry ."])
    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    rows = [{"prompt": "what is rain ?", "completion": c, "label": lab}
            for c, lab in (("rain is wet .", True), ("rain is dry .", False),
                           ("rain is wet", True), ("rain is wet .", True))]
    from rlcourse.data import pad_collate

    items = precompute_reference_logps(model, tokenize_kto(tok, rows, 32))
    _, metrics = kto_loss_fn(model, pad_collate(items))
    assert isinstance(metrics["rewards/chosen"], Pooled)
    assert metrics["rewards/chosen"].count == 3 and metrics["rewards/rejected"].count == 1
