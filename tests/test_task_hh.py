"""HH: prompts, the reward-model scorer on a tiny Qwen2 model built here, and `tre rm train`."""

from __future__ import annotations

import json

import pytest

from tre_cli.tasks import get_task
from tre_cli.tasks.hh import RewardModelScorer, pair_text, prompt_of

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "how do i cook rice well good bad answer please help me with this question thanks a the is".split()


def tiny_tokenizer():
    """A byte-level BPE like Qwen2's: transformers 5 loads a folder holding a qwen2 config with
    Qwen2Tokenizer, which rebuilds the tokenizer from vocab and merges with Qwen2's byte-level
    pre-tokenizer, so only a byte-level BPE survives the save/load round trip unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([" ".join(WORDS), "user assistant system\n"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_reward_model(folder):
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_prompt_of_accepts_the_common_layouts():
    assert prompt_of({"prompt": "hi"}) == "hi"
    assert prompt_of({"prompt": [{"role": "user", "content": "hi"}]}) == "hi"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert prompt_of({"chosen": conversation, "rejected": conversation}) == "q"
    with pytest.raises(ValueError, match="prompt"):
        prompt_of({"question": "x"})


def test_task_loads_prompts_and_renders_the_chat_template(tmp_path):
    path = tmp_path / "uf.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"question {i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(5))
    )
    task = get_task("hh", test_source=str(path), test_size=3)
    examples = task.load("test")
    assert examples == [{"prompt": "question 0"}, {"prompt": "question 1"}, {"prompt": "question 2"}]
    assert (
        task.render(examples[0], tiny_tokenizer()) == "<|im_start|>user\nquestion 0<|im_end|>\n<|im_start|>assistant\n"
    )
    assert get_task("hh", template="raw").render(examples[0], None) == "User: question 0\nAssistant:"
    with pytest.raises(ValueError, match="reward_model"):
        task.rewards(["x"], examples[:1])


def test_scorer_is_batch_invariant_and_truncates(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = tiny_reward_model(tmp_path / "rm")
    prompts = ["how do i cook rice", "help me", "a", "please help me with this question"]
    responses = ["good answer", "bad", "the answer is good well " * 20, ""]
    batched = RewardModelScorer(folder, batch_size=3).score(prompts, responses)
    single = [RewardModelScorer(folder, batch_size=1).score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert all(isinstance(v, float) for v in batched)
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(v, 6) for v in batched)) > 1

    # The score of an over-long pair is the score of its first max_length tokens.
    scorer = RewardModelScorer(folder, max_length=16)
    long_score = scorer.score(["how do i cook rice"], ["good " * 100])[0]
    tokenizer = scorer._tokenizer
    ids = tokenizer(pair_text(tokenizer, "how do i cook rice", "good " * 100), add_special_tokens=False)["input_ids"][
        :16
    ]
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert long_score == pytest.approx(direct, abs=1e-4)

    task = get_task("hh", reward_model=folder, rm_batch_size=2)
    assert task.rewards(responses, [{"prompt": p} for p in prompts]) == pytest.approx(batched, abs=1e-4)
    assert task.reward(responses[0], {"prompt": prompts[0]}) == pytest.approx(batched[0], abs=1e-4)


def test_missing_reward_model_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="task.options.reward_model=PATH"):
        get_task("hh", reward_model=str(tmp_path / "absent")).rewards(["x"], [{"prompt": "p"}])


SMALL, LARGE = "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct"


def test_each_policy_model_gets_its_reward_model(tmp_path):
    from tre_cli.tasks import task_for_run

    small_rm, large_rm = tmp_path / "rm-small", tmp_path / "rm-large"
    small_rm.mkdir(), large_rm.mkdir()
    options = {"reward_models": {SMALL: str(small_rm), LARGE: str(large_rm)}}
    assert task_for_run("hh", options, SMALL)._scorer.model_name == str(small_rm)
    assert task_for_run("hh", options, LARGE)._scorer.model_name == str(large_rm)
    # The single reward_model serves any policy model the mapping does not name...
    assert (
        task_for_run("hh", {**options, "reward_model": "org/any-rm"}, "other/model")._scorer.model_name == "org/any-rm"
    )
    # ...and agreeing with the mapping is fine; disagreeing is one line naming both.
    assert task_for_run("hh", {**options, "reward_model": str(small_rm)}, SMALL)._scorer.model_name == str(small_rm)
    with pytest.raises(ValueError, match="disagree"):
        task_for_run("hh", {**options, "reward_model": str(large_rm)}, SMALL)
    # Other tasks do not depend on the policy model.
    assert task_for_run("countdown", {}, SMALL).name == "countdown"


def test_an_hh_run_without_a_reward_model_fails_before_loading_anything(tmp_path):
    from tre_cli.tasks import task_for_run

    with pytest.raises(ValueError, match=f"no reward model for policy model '{SMALL}'.*task.options.reward_model=PATH"):
        task_for_run("hh", {"reward_models": {LARGE: "org/rm-7b", SMALL: None}}, SMALL)
    with pytest.raises(ValueError, match="does not exist"):
        task_for_run("hh", {"reward_models": {SMALL: str(tmp_path / "absent")}}, SMALL)
    with pytest.raises(ValueError, match="reward_models must map policy models to reward models"):
        get_task("hh", reward_models=["org/rm"])


def _main_sweep_with(tmp_path, reward_models):
    """sweeps/main.yaml with its HH reward models filled in, as a user would."""
    import yaml

    from tre_cli import sweep

    content = yaml.safe_load(sweep.sweep_path("main").read_text())
    content["task_set"]["hh"]["task.options.reward_models"] = reward_models
    path = tmp_path / "main.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_sweep_plan_fails_for_an_hh_trial_without_its_reward_model(tmp_path):
    from tre_cli import sweep

    # As shipped, sweeps/main.yaml names the two backbones with no reward model yet.
    with pytest.raises(
        ValueError,
        match=f"trial hh-Qwen2.5-1.5B-Instruct-base-s0: task 'hh' has no reward model for policy model '{SMALL}'",
    ):
        sweep.plan_sweep("main", ["hh"], out=tmp_path / "a")
    small_rm = tmp_path / "rm-small"
    small_rm.mkdir()
    with pytest.raises(ValueError, match=f"no reward model for policy model '{LARGE}'"):
        sweep.plan_sweep(_main_sweep_with(tmp_path, {SMALL: str(small_rm)}), ["hh"], out=tmp_path / "b")
    # Math and Countdown trials never need one.
    assert len(sweep.plan_sweep("main", ["math", "countdown"], out=tmp_path / "c").trials) == 2 * 2 * 7


def test_sweep_plan_gives_each_hh_trial_its_models_reward_model(tmp_path):
    from tre_cli import sweep
    from tre_cli.tasks import task_for_run

    rms = {SMALL: tmp_path / "rm-small", LARGE: tmp_path / "rm-large"}
    for folder in rms.values():
        folder.mkdir()
    plan = sweep.plan_sweep(_main_sweep_with(tmp_path, {k: str(v) for k, v in rms.items()}), out=tmp_path / "p")
    hh = [p for p in plan.trials if p.trial.task == "hh"]
    assert len(hh) == 2 * 7
    for planned in hh:
        config = planned.config
        task = task_for_run(config.task.name, config.task.options, config.model.name)
        assert task._scorer.model_name == str(rms[config.model.name])
    others = [p for p in plan.trials if p.trial.task != "hh"]
    assert others and all("reward_models" not in p.config.task.options for p in others)


def test_sweep_without_reward_models_is_one_line_and_its_dry_run_names_every_trial(tmp_path):
    from typer.testing import CliRunner

    from tre_cli.cli import app

    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["sweep", "main", "--task", "hh", "--out", str(out)])
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "no reward model for policy model" in lines[0], result.output
    assert not out.exists()
    dry = CliRunner().invoke(app, ["sweep", "main", "--task", "hh", "--dry-run", "--out", str(out)])
    assert dry.exit_code == 1
    errors = [line for line in dry.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 14 and all("no reward model for policy model" in line for line in errors), dry.output
    assert "14 of 14 trials cannot start" in dry.output


def test_task_set_names_known_tasks(tmp_path):
    import yaml

    from tre_cli import sweep

    content = yaml.safe_load(sweep.sweep_path("main").read_text())
    content["task_set"] = {"hhh": {"ppo.steps": 1}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match="'task_set' names an unknown task 'hhh'"):
        sweep.load_sweep(path)


@pytest.mark.slow
def test_rm_train_learns_preferences_and_the_scorer_loads_it(tmp_path):
    pytest.importorskip("trl")
    from typer.testing import CliRunner

    from tre_cli.tasks.cli import rm_app

    base = tiny_reward_model(tmp_path / "base")
    prompts = ["how do i cook rice", "help me", "please help me with this question", "how is the rice"]
    rows = [
        {
            "prompt": prompts[i % 4],
            "chosen": "good answer thanks " * (1 + i % 3),
            "rejected": "bad answer " * (1 + i % 2),
        }
        for i in range(16)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    args = ["train", "--model", base, "--data", str(data), "--out", str(out), "--lr", "3e-3",
            "--batch-size", "4", "--per-device-batch-size", "2", "--max-length", "64", "--epochs", "6"]
    result = CliRunner().invoke(rm_app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "tre_reward_model.json").read_text())
    assert summary["pairs"] == 16 and summary["config"]["center_rewards_coefficient"] == 0.01

    task = get_task("hh", reward_model=str(out))
    examples = [{"prompt": r["prompt"]} for r in rows]
    chosen = task.rewards([r["chosen"] for r in rows], examples)
    rejected = task.rewards([r["rejected"] for r in rows], examples)
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 14

    again = CliRunner().invoke(rm_app, args)
    assert again.exit_code != 0 and "not empty" in again.output
