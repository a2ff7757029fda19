"""Forking-Tokens / KL-Cov select within fixed groups of sequences, independent of the micro-batch
memory knob (issue 11, item 6), with the released code's rounding."""

from __future__ import annotations

import math

import pytest
import torch

from dataclasses import replace

from tre_cli import trainer
from tre_cli.config import resolve
from tre_cli.losses.actor import ActorObjective
from tre_cli.trainer import step as trainer_step
from tre_cli.losses.selection_groups import selection_groups
from tre_cli.losses.selectors import forking_tokens_in_groups, kl_cov_in_groups, top_count

from test_trainer import rounding_floor


def test_released_rounding_goes_up_but_absorbs_float_artefacts():
    assert top_count(11, 0.2, "ceil") == 3 and top_count(11, 0.2) == 2  # 2.2
    assert top_count(14, 0.2, "ceil") == 3 and top_count(14, 0.2, "floor") == 2  # 2.8
    assert top_count(15, 0.2, "ceil") == 3  # 15 * 0.2 = 3.0000000000000004
    assert top_count(3, 0.2, "ceil") == 1 and top_count(0, 0.2, "ceil") == 0
    for n in range(1, 400):  # the released int(n * 0.2 + 0.9999), by definition
        assert top_count(n, 0.2, "ceil") == max(1, int(n * 0.2 + 0.9999))
    with pytest.raises(ValueError, match="unknown count rounding"):
        top_count(10, 0.2, "round")


def test_groups_cover_the_rows_in_a_seeded_shuffle():
    groups = selection_groups(10, 4, torch.Generator().manual_seed(3))
    assert [len(g) for g in groups] == [4, 4, 2]
    assert sorted(torch.cat(groups).tolist()) == list(range(10))
    again = selection_groups(10, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(groups, again))
    assert len(selection_groups(10, None, torch.Generator().manual_seed(3))) == 1
    assert len(selection_groups(10, 16, torch.Generator().manual_seed(3))) == 1
    with pytest.raises(ValueError, match=">= 1"):
        selection_groups(10, 0, torch.Generator())


def _brute_top(scores, mask, rows, count_of):
    """Per group: the `count_of(n_valid)` largest valid scores, ties by the group's row order then
    position, by a plain sort of python tuples."""
    chosen = set()
    candidates = [(-float(scores[r, t]), k, t, int(r)) for k, r in enumerate(rows.tolist())
                  for t in range(scores.shape[1]) if mask[r, t] > 0]
    candidates.sort()
    for _, _, t, r in candidates[:count_of(len(candidates))]:
        chosen.add((r, t))
    return chosen


def test_forking_and_kl_cov_in_groups_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(11, 9, generator=gen, dtype=torch.float64)
    mask = (torch.rand(11, 9, generator=gen) < 0.8).float()
    mask[4] = 0  # a sequence without tokens
    groups = selection_groups(11, 4, torch.Generator().manual_seed(1))
    got = forking_tokens_in_groups(entropy, mask, groups, 0.2, "ceil")
    want = set()
    for rows in groups:
        want |= _brute_top(entropy, mask, rows, lambda n: max(1, int(n * 0.2 + 0.9999)) if n else 0)
    assert {tuple(x) for x in got.nonzero().tolist()} == want

    adv = torch.randn(11, 9, generator=gen, dtype=torch.float64)
    logprob = -torch.rand(11, 9, generator=gen, dtype=torch.float64) * 5
    got = kl_cov_in_groups(adv, logprob, mask, groups, ratio=0.05)
    want = set()
    for rows in groups:
        m = mask[rows]
        n = m.sum()
        a_mean = (adv[rows] * m).sum() / n
        lp_mean = (logprob[rows] * m).sum() / n
        cov = torch.zeros_like(adv)
        cov[rows] = (adv[rows] - a_mean) * (logprob[rows] - lp_mean)
        want |= _brute_top(cov, mask, rows, lambda n: max(1, int(0.05 * n)) if n else 0)
    assert {tuple(x) for x in got.nonzero().tolist()} == want
    with pytest.raises(ValueError, match="every row exactly once"):
        forking_tokens_in_groups(entropy, mask, groups[:-1])


# ------------------------------------------------------------------------------ in the trainer

OVERLAY = {"task": {"options": {"train_size": 32, "test_size": 4}}, "rollout": {"max_new_tokens": 16},
           "eval": {"metric": "pass@1"}}


def _config(model_dir, out, method, micro_batch_tokens, extra=()):
    return resolve(
        task="countdown", method=method, model=str(model_dir), preset="smoke", task_overlay=OVERLAY,
        overrides=[f"run.out={out}", "ppo.prompts_per_step=8", "ppo.rollouts_per_prompt=2", "ppo.mini_batch_prompts=8",
                   f"ppo.micro_batch_tokens={micro_batch_tokens}", "ppo.selection_group_size=4", "run.device=cpu",
                   "run.wandb.mode=disabled", *extra],
    )


def _rollout_and_batch(parts):
    rollout = parts.engine.generate([[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [7, 7]] * 2, n=2,
                                    max_new_tokens=16)
    scored = trainer_step.score_rollout(parts, rollout, torch.linspace(0, 1, rollout.num_samples))
    return rollout, scored


def _full_selection(parts, rollout, scored, budget, method, params):
    cfg = parts.config
    objective = ActorObjective.of(method, params, clip=cfg.ppo.clip, dual_clip_c=cfg.ppo.dual_clip_c,
                                  loss_agg=cfg.ppo.loss_agg)
    parts = replace(parts, objective=objective)
    rows = torch.arange(rollout.num_samples)
    micro = list(trainer_step.micro_batches(rows, rollout.response_lengths, rollout.prompt_ids.shape[1], budget))
    masks = trainer_step._selection(parts, rollout, scored, rows, [(chunk, width, True) for chunk, width in micro],
                                    torch.Generator().manual_seed(5), rollout.response_mask.float())
    full = torch.zeros(rollout.response_ids.shape, dtype=torch.bool)
    for (chunk, r_width), m in zip(micro, masks):
        full[chunk, :r_width] = m
    return full, len(micro)


@pytest.mark.parametrize("method", ["forking-tokens", "kl-cov"])
def test_selection_does_not_depend_on_the_micro_batch_budget(quick_testbed, tmp_path, method):
    torch.manual_seed(0)
    parts = trainer.build(_config(quick_testbed, tmp_path / "run", method, 4096))
    rollout, batch = _rollout_and_batch(parts)
    params = parts.config.method.params
    selector = "forking-tokens" if method == "forking-tokens" else "kl-cov"
    whole, n_whole = _full_selection(parts, rollout, batch, 4096, selector, params)
    split, n_split = _full_selection(parts, rollout, batch, 24, selector, params)
    assert n_whole == 1 and n_split >= 4  # really different micro-batch splits
    assert whole.any() and torch.equal(whole, split)
    # Each group of 4 sequences chose its own top fraction.
    groups = selection_groups(rollout.num_samples, 4, torch.Generator().manual_seed(5))
    mask = rollout.response_mask
    for rows in groups:
        n = int(mask[rows].sum())
        expected = top_count(n, 0.2, "ceil") if method == "forking-tokens" else top_count(n, 0.002)
        assert int(whole[rows].sum()) == expected
    # Global scope: one group, the mini-batch's top fraction.
    glob, _ = _full_selection(parts, rollout, batch, 24, selector, {**params, "scope": "global"})
    n = int(mask.sum())
    assert int(glob.sum()) == (top_count(n, 0.2, "ceil") if method == "forking-tokens" else top_count(n, 0.002))


@pytest.mark.slow
def test_a_forking_tokens_step_is_the_same_for_any_micro_batch_budget(quick_testbed, tmp_path):
    results = []
    for budget in (4096, 24):
        torch.manual_seed(0)
        parts = trainer.build(_config(quick_testbed, tmp_path / f"b{budget}", "forking-tokens", budget))
        metrics = trainer.train_step(parts, 1)
        results.append((metrics, {k: v.clone() for k, v in parts.policy.state_dict().items()}))
    (m1, w1), (m2, w2) = results
    assert math.isclose(m1["actor/forking_kept_frac"], m2["actor/forking_kept_frac"], rel_tol=1e-6)
    for key in ("actor/pg_loss", "actor/entropy", "actor/p_max", "critic/vf_loss"):
        floor = rounding_floor(key, m1, 1e-7)
        assert math.isclose(m1[key], m2[key], rel_tol=1e-4, abs_tol=floor), (key, m1[key], m2[key])
    # Adam's first step moves every weight by about lr x sign(gradient): where a gradient is ~0, the
    # order of the micro-batch sums can flip its sign, so a few weights may differ by up to 2 lr.
    # A different selection would change the gradient everywhere.
    lr = parts.config.ppo.actor_lr
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert float(diffs.max()) <= 2.5 * lr
    assert float((diffs > 1e-6).float().mean()) < 0.01, float((diffs > 1e-6).float().mean())


def test_task_overlays_set_the_released_group_sizes():
    from tre_cli.config import resolve as resolve_config

    sizes = {task: resolve_config(task=task, method="forking-tokens", check_device=False).ppo.selection_group_size
             for task in ("math", "countdown", "hh")}
    assert sizes == {"math": 8, "countdown": 16, "hh": 16}
    # The memory knob and the group are separate keys.
    cfg = resolve_config(task="math", method="kl-cov", overrides=["ppo.micro_batch_tokens=1024"], check_device=False)
    assert (cfg.ppo.micro_batch_tokens, cfg.ppo.selection_group_size, cfg.method.params["scope"]) == (1024, 8, "group")
