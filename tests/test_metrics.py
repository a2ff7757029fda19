"""Every metric key another part of tre reads back (tre_cli/metrics.py) is one the trainer's code
writes: the metrics of one step computed on a tiny batch, with no model, for every method."""

from __future__ import annotations

import pytest
import torch

from tre_cli import metrics as M
from tre_cli.losses.actor import ActorObjective, PPOBatch, actor_loss
from tre_cli.losses.registry import METHODS
from tre_cli.losses.selection_groups import selection_groups
from tre_cli.losses.stats import token_stats
from tre_cli.report.mechanism import NEEDED, PANELS
from tre_cli.report.mechanism_table import TABLE_METRICS
from tre_cli.rollout.base import Rollout
from tre_cli.trainer.step import Scored, _step_metrics, _tail_draw_metrics

ROWS, WIDTH, VOCAB = 4, 5, 11


def _step_keys(method: str) -> set[str]:
    """The keys of one step's metrics (trainer/step.py `train_step`'s parts that do not need a
    model) for `method` at its defaults."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, WIDTH, VOCAB, generator=gen)
    tokens = torch.randint(VOCAB, (ROWS, WIDTH), generator=gen)
    mask = torch.ones(ROWS, WIDTH)
    mask[1, 3:] = 0
    advantages = torch.randn(ROWS, WIDTH, generator=gen) * mask
    objective = ActorObjective.of(method, METHODS[method].resolve_params({}), clip=0.2, dual_clip_c=3.0,
                                  loss_agg="token-mean")
    stats = token_stats(logits, tokens, objective.region, tail_k=3)
    selected = None
    if objective.selector is not None:
        groups = selection_groups(ROWS, 2, torch.Generator().manual_seed(1))
        selected = objective.selector.choose(stats.entropy, stats.logprob, advantages, mask, groups)
    old_logprob = stats.logprob.detach() * mask
    batch = PPOBatch(mask=mask, old_logprob=old_logprob, advantages=advantages, old_values=torch.zeros_like(mask),
                     returns=advantages, tokens=float(mask.sum()), seqs=float(ROWS), selected=selected,
                     selected_total=None if selected is None else float(selected.sum()))
    actor = actor_loss(stats, batch, objective)
    rollout = Rollout(torch.zeros(ROWS, 1, dtype=torch.long), torch.ones(ROWS, 1, dtype=torch.long), tokens,
                      mask.long(), old_logprob, torch.arange(ROWS) // 2, torch.ones(ROWS, dtype=torch.bool),
                      [""] * ROWS, 0, 1.0)
    scored = Scored(old_logprob, torch.zeros_like(mask), advantages, advantages)
    timings = {"timing/gen_s": 1.0, "timing/update_s": 1.0, "timing/step_s": 1.0}
    return (set(actor.metrics) | set(_step_metrics(rollout, torch.rand(ROWS), scored, timings))
            | set(_tail_draw_metrics(rollout, scored, 0.05)))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_key_the_report_reads_is_written_by_the_trainer(method):
    # The run records' curves (report/records.py), the mechanism figure's and table's.
    read = set(M.CURVES) | set(PANELS) | set(NEEDED)
    read |= {key for key in TABLE_METRICS if key != M.EVAL_SCORE}  # the eval score comes from eval.jsonl
    written = _step_keys(method)
    assert read <= written, read - written
    entry = METHODS[method]
    # The alpha controller reads the bonus's token mean; the progress line the region size.
    assert (M.REGULARIZER in written) == (entry.bonus is not None)
    assert (M.REGION_SIZE in written) == (entry.region_of is not None)


def test_the_labels_name_every_curve():
    assert set(M.LABELS) == set(M.CURVES)
