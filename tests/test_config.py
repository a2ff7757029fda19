"""The run config: precedence of every layer, strict keys and types, validation, round-trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from tre_cli.config import (
    PRESETS,
    RunConfig,
    dump_yaml,
    from_dict,
    load_run_config,
    parse_override,
    resolve,
    resolve_device,
    resolve_gradient_checkpointing,
    to_dict,
    with_overrides,
)
from tre_cli.losses.registry import METHODS

# The paper's alpha, fixed (issue 21: the controller's parameters at their defaults).
ALPHA_FIXED = {"alpha": 0.001, "alpha_control": "fixed", "target_entropy": None, "alpha_step": 1e-4,
               "alpha_max": 0.01}

# A stand-in overlay so these tests do not depend on the shipped tasks/*.yaml.
OVERLAY = {"ppo": {"steps": 300, "clip": 0.25}, "rollout": {"max_new_tokens": 512}, "eval": {"metric": "pass@1"}}


def _resolve(**kwargs):
    kwargs.setdefault("task_overlay", OVERLAY)
    return resolve(**kwargs)


def _write(tmp_path: Path, content: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_papers_table_2():
    cfg = RunConfig()
    assert (cfg.ppo.actor_lr, cfg.ppo.critic_lr, cfg.ppo.critic_warmup_ratio) == (1e-6, 1e-5, 0.05)
    assert (cfg.ppo.prompts_per_step, cfg.ppo.rollouts_per_prompt, cfg.ppo.mini_batch_prompts) == (512, 8, 64)
    assert (cfg.ppo.clip, cfg.ppo.dual_clip_c, cfg.ppo.gamma, cfg.ppo.lam, cfg.ppo.kl_coef) == (0.2, 3.0, 1.0, 1.0, 0.0)
    assert cfg.ppo.loss_agg == "token-mean" and cfg.ppo.epochs == 1 and cfg.ppo.max_prompt_length == 1024
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
    assert (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p) == (8, 1.0, 0.7)
    assert cfg.run.wandb.mode == "offline"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gets_exactly_its_registry_defaults(name):
    cfg = _resolve(method=name)
    assert cfg.method.params == dict(METHODS[name].defaults)


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ppo.clip = 0.3  # type: ignore[misc]


# --------------------------------------------------------------------------- precedence


def test_overlay_beats_dataclass_defaults():
    cfg = _resolve()
    assert cfg.ppo.steps == 300 and cfg.rollout.max_new_tokens == 512 and cfg.eval.metric == "pass@1"


def test_overlay_beats_method_defaults():
    # A method parameter in a task overlay is unusual, but the layer order must still hold.
    cfg = _resolve(method="ent", task_overlay={"method": {"alpha": 0.01}})
    assert cfg.method.params["alpha"] == 0.01


def test_preset_beats_overlay():
    cfg = _resolve(preset="smoke")
    assert cfg.ppo.steps == PRESETS["smoke"]["ppo"]["steps"] != 300
    assert cfg.rollout.max_new_tokens == 48
    assert cfg.ppo.clip == 0.25  # the preset does not name clip, so the overlay's stays


def test_file_beats_preset(tmp_path):
    path = _write(tmp_path, "ppo:\n  steps: 7\neval:\n  limit: 5\n")
    cfg = _resolve(preset="smoke", config_file=path)
    assert cfg.ppo.steps == 7 and cfg.eval.limit == 5
    assert cfg.ppo.prompts_per_step == PRESETS["smoke"]["ppo"]["prompts_per_step"] != 512  # still the preset's


def test_flags_beat_file(tmp_path):
    path = _write(tmp_path, "method:\n  name: ent\nmodel:\n  name: from-file\ntask:\n  name: math\n")
    cfg = _resolve(config_file=path, method="tre-k", model="from-flag", task="countdown")
    assert (cfg.method.name, cfg.model.name, cfg.task.name) == ("tre-k", "from-flag", "countdown")
    assert _resolve(config_file=path).method.name == "ent"


def test_set_beats_flags_and_file(tmp_path):
    path = _write(tmp_path, "ppo:\n  steps: 7\n")
    cfg = _resolve(config_file=path, method="tre-k", overrides=["ppo.steps=9", "method.name=tre-p"])
    assert cfg.ppo.steps == 9 and cfg.method.name == "tre-p"


def test_later_set_beats_earlier_set():
    assert _resolve(overrides=["ppo.steps=3", "ppo.steps=4"]).ppo.steps == 4


def test_method_params_set_by_file_and_cli():
    cfg = _resolve(method="tre-k", overrides=["method.k=5", "method.alpha=0.01"])
    assert cfg.method.params == {**METHODS["tre-k"].defaults, "alpha": 0.01, "k": 5}


def test_the_overlay_follows_the_final_task_name(tmp_path):
    # The task name may come from any layer above the overlay; the overlay must be that task's.
    steps = {"countdown": 400, "math": 300, "hh": 200}
    overlay_for = lambda name: {"ppo": {"steps": steps[name]}}  # noqa: E731
    path = _write(tmp_path, "task:\n  name: math\n")
    assert resolve(task_overlay=overlay_for).ppo.steps == 400
    assert resolve(config_file=path, task_overlay=overlay_for).ppo.steps == 300
    assert resolve(config_file=path, task="hh", task_overlay=overlay_for).ppo.steps == 200
    assert (
        resolve(config_file=path, task="countdown", overrides=["task.name=hh"], task_overlay=overlay_for).task.name
        == "hh"
    )
    assert (
        resolve(config_file=path, task="countdown", overrides=["task.name=hh"], task_overlay=overlay_for).ppo.steps
        == 200
    )


def test_an_overlay_may_not_rename_its_task():
    with pytest.raises(ValueError, match="may not set task.name"):
        resolve(task="math", task_overlay={"task": {"name": "hh"}})


def test_task_options_merge_key_by_key_across_layers(tmp_path):
    path = _write(tmp_path, "task:\n  options:\n    format_score: 0.1\n    nested: {a: 1, b: 2}\n")
    cfg = _resolve(
        config_file=path,
        task_overlay={"task": {"options": {"source": "generated", "format_score": 0.0}}},
        overrides=["task.options.nested.b=3", "task.options.n_numbers=[3, 4]"],
    )
    assert cfg.task.options == {
        "source": "generated",
        "format_score": 0.1,
        "nested": {"a": 1, "b": 3},
        "n_numbers": [3, 4],
    }


def test_set_values_are_typed_against_their_key():
    cfg = _resolve(
        overrides=[
            "ppo.actor_lr=1e-6",  # YAML 1.1 reads this as a string; a float key accepts it
            "model.name=123",  # a string key keeps the text as typed
            "run.wandb.mode=disabled",
            "run.out=null",
            "eval.limit=null",
            "model.gradient_checkpointing=false",
            "ppo.dual_clip_c=null",
        ]
    )
    assert cfg.ppo.actor_lr == 1e-6 and isinstance(cfg.ppo.actor_lr, float)
    assert cfg.model.name == "123"
    assert cfg.run.wandb.mode == "disabled" and cfg.run.out is None and cfg.eval.limit is None
    assert cfg.model.gradient_checkpointing is False and cfg.ppo.dual_clip_c is None


def test_mapping_overrides_for_programmatic_callers():
    cfg = _resolve(method="tre-p", overrides={"method.p": 0.9, "ppo.steps": 5, "task.options.seed": 3})
    assert cfg.method.params["p"] == 0.9 and cfg.ppo.steps == 5 and cfg.task.options == {"seed": 3}


# --------------------------------------------------------------------------- presets


def test_smoke_preset_is_small():
    cfg = _resolve(preset="smoke")
    assert cfg.model.name == "testbed"
    # A minute on 2 CPU cores (tests/test_learning.py shows it learns): <= 64 samples a step,
    # several mini-batches, <= 30 steps, a baseline evaluation before training.
    assert cfg.ppo.prompts_per_step * cfg.ppo.rollouts_per_prompt <= 64
    assert cfg.ppo.prompts_per_step // cfg.ppo.mini_batch_prompts >= 2
    assert cfg.ppo.steps <= 30 and cfg.rollout.max_new_tokens == 48
    assert cfg.eval.limit * cfg.eval.n_samples <= 256 and cfg.eval.before_train


def test_paper_preset_is_the_paper():
    cfg = _resolve(preset="paper", method="tre-p")
    assert cfg.model.name == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (cfg.ppo.prompts_per_step, cfg.ppo.rollouts_per_prompt, cfg.ppo.mini_batch_prompts) == (512, 8, 64)
    assert (cfg.eval.n_samples, cfg.eval.top_p, cfg.eval.limit) == (8, 0.7, None)
    assert cfg.ppo.steps == 300  # steps stay the task's
    assert cfg.method.params == {**ALPHA_FIXED, "p": 0.99, "released_code_compat": False}


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'tiny'; choose one of: smoke, small, paper"):
        _resolve(preset="tiny")


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "item, message",
    [
        ("ppo.lr=1", "unknown config key 'ppo.lr' (did you mean 'ppo.actor_lr'?)"),
        ("ppoo.clip=1", "unknown config key 'ppoo' (did you mean 'ppo'?)"),
        ("run.wandb.mod=online", "unknown config key 'run.wandb.mod' (did you mean 'run.wandb.mode'?)"),
        ("eval.metrc=x", "unknown config key 'eval.metrc' (did you mean 'eval.metric'?)"),
        ("method.kk=2", "unknown config key 'method.kk' (did you mean 'method.k'?)"),
        (
            "task.format_score=0.1",
            "unknown config key 'task.format_score' (task options are set as 'task.options.format_score')",
        ),
        ("zzz=1", "unknown config key 'zzz'"),
    ],
)
def test_unknown_keys_on_the_command_line(item, message):
    with pytest.raises(ValueError) as error:
        _resolve(overrides=[item])
    assert message in str(error.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = _write(tmp_path, "ppo:\n  critic_lrr: 1e-5\n")
    with pytest.raises(ValueError) as error:
        _resolve(config_file=path)
    assert "unknown config key 'ppo.critic_lrr' (did you mean 'ppo.critic_lr'?)" in str(error.value)
    assert str(path) in str(error.value)


def test_unknown_key_in_an_overlay():
    with pytest.raises(ValueError, match="unknown config key 'rollout.max_tokens'.*task overlay"):
        _resolve(task_overlay={"rollout": {"max_tokens": 5}})


def test_unknown_top_level_section_in_a_file(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'trainer'"):
        _resolve(config_file=_write(tmp_path, "trainer:\n  steps: 3\n"))


def test_a_section_cannot_be_set_as_a_value(tmp_path):
    with pytest.raises(ValueError, match="config key 'ppo' is a section"):
        _resolve(overrides=["ppo=3"])
    with pytest.raises(ValueError, match="config key 'ppo' expects a mapping"):
        _resolve(config_file=_write(tmp_path, "ppo: 3\n"))


def test_malformed_set_item():
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        _resolve(overrides=["ppo.clip"])
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        parse_override("ppo..clip=1")
    assert parse_override("task.options.expr=a=b") == ("task.options.expr", "a=b")


# --------------------------------------------------------------------------- bad types and values


@pytest.mark.parametrize(
    "item, message",
    [
        ("ppo.clip=abc", "config key 'ppo.clip' expects a float, got 'abc'"),
        ("ppo.steps=2.5", "config key 'ppo.steps' expects an integer, got '2.5'"),
        ("ppo.steps=true", "config key 'ppo.steps' expects an integer, got 'true'"),
        ("ppo.actor_lr=nan", "config key 'ppo.actor_lr' expects a float, got 'nan'"),
        ("rollout.engine=sglang", "config key 'rollout.engine' expects one of 'hf', 'vllm', got 'sglang'"),
        ("run.wandb.mode=off", "config key 'run.wandb.mode' expects one of 'offline', 'online', 'disabled', got 'off'"),
        ("model.gradient_checkpointing=maybe", "expects true or false or 'auto', got 'maybe'"),
        ("task.options=3", "config key 'task.options' expects a mapping, got '3'"),
    ],
)
def test_bad_types_name_the_key(item, message):
    with pytest.raises(ValueError) as error:
        _resolve(overrides=[item])
    assert message in str(error.value)


def test_bad_type_in_a_file(tmp_path):
    with pytest.raises(
        ValueError, match=r"config key 'eval.n_samples' expects an integer, got 'eight' \(in .*run.yaml\)"
    ):
        _resolve(config_file=_write(tmp_path, "eval:\n  n_samples: eight\n"))
    with pytest.raises(ValueError, match="config key 'model.name' expects a string, got 1.5"):
        _resolve(config_file=_write(tmp_path, "model:\n  name: 1.5\n"))


@pytest.mark.parametrize(
    "method, item, message",
    [
        ("tre-p", "method.p=0", "config key 'method.p' must be in (0, 1], got 0.0"),
        ("tre-p", "method.p=1.01", "config key 'method.p' must be in (0, 1], got 1.01"),
        ("tre-k", "method.k=0", "config key 'method.k' must be an integer >= 2, got 0"),
        # K = 1 is a one-token region (regularizer 0, a Vanilla run); Min-Ent is its own method.
        ("tre-k", "method.k=1", "config key 'method.k' must be an integer >= 2, got 1 "
                                "(K = 1 is Min-Ent, -log max pi: use method min-ent)"),
        ("tre-k", "method.k=2.5", "config key 'method.k' expects an integer or null, got '2.5'"),
        ("ent", "method.alpha=-0.1", "config key 'method.alpha' must be >= 0, got -0.1"),
        (
            "forking-tokens",
            "method.scope=per-gpu",
            "config key 'method.scope' expects one of 'group', 'global' or null, got 'per-gpu'",
        ),
        # issue 11: the old per-micro-batch scope is gone (the micro-batch is a memory knob).
        (
            "forking-tokens",
            "method.scope=micro-batch",
            "config key 'method.scope' expects one of 'group', 'global' or null, got 'micro-batch'",
        ),
        (
            "forking-tokens",
            "method.count_rounding=round",
            "config key 'method.count_rounding' expects one of 'ceil', 'floor' or null, got 'round'",
        ),
        ("forking-tokens", "method.top_ratio=0", "config key 'method.top_ratio' must be in (0, 1], got 0.0"),
        ("kl-cov", "method.ratio=2", "config key 'method.ratio' must be in (0, 1], got 2.0"),
        ("kl-cov", "method.beta=-1", "config key 'method.beta' must be >= 0, got -1.0"),
    ],
)
def test_invalid_method_params(method, item, message):
    with pytest.raises(ValueError) as error:
        _resolve(method=method, overrides=[item])
    assert message in str(error.value)


def test_p_equal_one_is_allowed():
    assert _resolve(method="tre-p", overrides=["method.p=1"]).method.params["p"] == 1.0


@pytest.mark.parametrize(
    "method, item, message",
    [
        (
            "tre-p",
            "method.k=3",
            "config key 'method.k' is not a parameter of method 'tre-p' "
            "(its parameters: alpha, alpha_control, target_entropy, alpha_step, alpha_max, p, released_code_compat)",
        ),
        (
            "vanilla",
            "method.alpha=0.001",
            "config key 'method.alpha' is not a parameter of method 'vanilla' (its parameters: none)",
        ),
        (
            "kl-cov",
            "method.top_ratio=0.1",
            "config key 'method.top_ratio' is not a parameter of method 'kl-cov' (its parameters: ratio, beta, scope)",
        ),
        (
            "kl-cov",
            "method.count_rounding=floor",
            "config key 'method.count_rounding' is not a parameter of method 'kl-cov' "
            "(its parameters: ratio, beta, scope)",
        ),
    ],
)
def test_params_the_method_does_not_have_are_rejected(method, item, message):
    with pytest.raises(ValueError) as error:
        _resolve(method=method, overrides=[item])
    assert message in str(error.value)


def test_a_param_from_the_file_is_rejected_when_the_flag_switches_method(tmp_path):
    path = _write(tmp_path, "method:\n  name: tre-k\n  k: 5\n")
    assert _resolve(config_file=path).method.params["k"] == 5
    with pytest.raises(ValueError, match="'method.k' is not a parameter of method 'tre-p'"):
        _resolve(config_file=path, method="tre-p")


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'tre-q'; choose one of: vanilla"):
        _resolve(method="tre-q")


@pytest.mark.parametrize(
    "item, message",
    [
        (
            "ppo.mini_batch_prompts=60",
            "config key 'ppo.mini_batch_prompts' (60) must divide ppo.prompts_per_step (512)",
        ),
        ("ppo.actor_lr=0", "config key 'ppo.actor_lr' must be > 0, got 0.0"),
        ("ppo.critic_warmup_ratio=1", "config key 'ppo.critic_warmup_ratio' must be in [0, 1), got 1.0"),
        ("ppo.dual_clip_c=1", "config key 'ppo.dual_clip_c' must be > 1 (or null to disable), got 1.0"),
        ("ppo.gamma=1.5", "config key 'ppo.gamma' must be in [0, 1], got 1.5"),
        ("rollout.top_p=0", "config key 'rollout.top_p' must be in (0, 1], got 0.0"),
        ("eval.every=-1", "config key 'eval.every' must be >= 0, got -1"),
        ("run.keep_last=0", "config key 'run.keep_last' must be >= 1, got 0"),
        ("metrics.tail_k=0", "config key 'metrics.tail_k' must be >= 1, got 0"),
        ("metrics.tail_p=1", "config key 'metrics.tail_p' must be in (0, 1), got 1.0"),
        ("metrics.tail_p=0", "config key 'metrics.tail_p' must be in (0, 1), got 0.0"),
        ("model.name=' '", "config key 'model.name' must not be empty"),
    ],
)
def test_invalid_values(item, message):
    with pytest.raises(ValueError) as error:
        _resolve(overrides=[item])
    assert message in str(error.value)


# --------------------------------------------------------------------------- files


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "ppo:\n  clip: 0.2\n  steps: [1, 2\nrollout:\n  top_p: 1\n")
    with pytest.raises(ValueError) as error:
        _resolve(config_file=path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    line = int(message[len(str(path)) + 1 :].split(":")[0])
    assert line in (3, 4, 5)  # PyYAML reports where it noticed; it is within the broken flow list
    assert "malformed YAML" in message


def test_tab_indentation_is_reported_with_its_line(tmp_path):
    path = _write(tmp_path, "ppo:\n  clip: 0.2\n\tsteps: 3\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: malformed YAML"):
        _resolve(config_file=path)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=f"config file not found: {missing}"):
        _resolve(config_file=missing)


def test_a_file_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="the top level expects a mapping"):
        _resolve(config_file=_write(tmp_path, "- ppo\n- eval\n"))


def test_an_empty_file_and_an_empty_section_change_nothing(tmp_path):
    assert _resolve(config_file=_write(tmp_path, "")) == _resolve()
    assert _resolve(config_file=_write(tmp_path, "ppo:\n", "b.yaml")) == _resolve()


def test_round_trip_dump_and_load(tmp_path):
    cfg = _resolve(
        method="kl-cov",
        preset="smoke",
        overrides=[
            "method.ratio=0.2",
            "task.options.numbers={lo: 1, hi: 99}",
            "run.out=runs/x",
            "model.critic_name=critic",
            "rollout.kv_cache_memory_bytes=1073741824",
            "ppo.actor_lr=3e-7",
        ],
    )
    path = dump_yaml(cfg, tmp_path / "run" / "config.yaml")
    assert load_run_config(path) == cfg
    assert load_run_config(tmp_path / "run") == cfg  # a run directory works too
    assert from_dict(to_dict(cfg)) == cfg
    # The dumped file is itself a valid --config file that reproduces the run.
    assert resolve(config_file=path, task_overlay={}) == cfg
    assert "k" not in yaml.safe_load(path.read_text())["method"]  # no parameters of other methods
    assert list(tmp_path.joinpath("run").iterdir()) == [path]  # no temp file left behind


def test_load_run_config_is_strict(tmp_path):
    path = _write(tmp_path, "ppo:\n  clipp: 0.2\n", "config.yaml")
    with pytest.raises(ValueError, match="unknown config key 'ppo.clipp'"):
        load_run_config(path)


def test_with_overrides_validates():
    cfg = _resolve()
    assert with_overrides(cfg, {"run.out": "runs/a"}).run.out == "runs/a"
    with pytest.raises(ValueError, match="must be in"):
        with_overrides(cfg, {"method.p": 2.0})


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="^--device cuda was requested but no CUDA device is available$"):
        _resolve(overrides=["run.device=cuda"])
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
    # A sweep head without a GPU may resolve configs for GPU workers.
    assert _resolve(overrides=["run.device=cuda"], check_device=False).run.device == "cuda"


def test_dtype_and_checkpointing_auto():
    from tre_cli.models import resolve_dtype

    assert resolve_device("cpu") == "cpu"
    # The config's dtype names go to the models as they are ('auto' resolved there).
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_gradient_checkpointing("auto", "cuda") is True
    assert resolve_gradient_checkpointing("auto", "cpu") is False
    assert resolve_gradient_checkpointing(True, "cpu") is True


def test_shipped_overlays_are_valid_config():
    # Every tasks/<name>.yaml must pass the same strict checks as a --config file.
    from tre_cli import tasks

    shipped = [name for name in tasks.TASKS if _overlay_exists(tasks, name)]
    for name in shipped:
        cfg = resolve(task=name)
        assert cfg.task.name == name
    if not shipped:
        pytest.skip("no task overlays shipped yet")


def _overlay_exists(tasks_module, name: str) -> bool:
    try:
        tasks_module.overlay_path(name)
    except FileNotFoundError:
        return False
    return True


def test_a_method_and_an_aggregation_that_do_not_go_together_fail_at_config_time():
    with pytest.raises(ValueError, match="config key 'ppo.loss_agg' does not go with method 'forking-tokens'"):
        _resolve(method="forking-tokens", overrides=["ppo.loss_agg=seq-mean-token-mean"])
    assert (
        _resolve(method="kl-cov", overrides=["ppo.loss_agg=seq-mean-token-mean"]).ppo.loss_agg == "seq-mean-token-mean"
    )


def test_method_config_is_the_name_and_every_parameter():
    from tre_cli.config import MethodConfig

    assert MethodConfig.of("tre-k", {"k": 4, "alpha": None}).params == {**ALPHA_FIXED, "k": 4}
    assert MethodConfig() == MethodConfig.of("tre-p")
    with pytest.raises(ValueError, match="needs every parameter"):
        MethodConfig("tre-k", {"k": 4})
    with pytest.raises(ValueError, match="config key 'method.beta' is not a parameter of method 'ent'"):
        MethodConfig.of("ent", {"beta": 1.0})


def test_rollout_stop_takes_a_string_or_a_list_and_rejects_the_rest(tmp_path):
    from tre_cli.config import from_dict, to_dict, with_overrides

    assert from_dict({}).rollout.stop == ()
    config = with_overrides(from_dict({}), {"rollout.stop": "</answer>"})
    assert config.rollout.stop == ("</answer>",)
    config = from_dict({"rollout": {"stop": ["</answer>", "\n\n"]}})
    assert config.rollout.stop == ("</answer>", "\n\n")
    assert to_dict(config)["rollout"]["stop"] == ["</answer>", "\n\n"]  # a YAML list
    assert from_dict(to_dict(config)) == config
    with pytest.raises(ValueError, match="rollout.stop"):
        from_dict({"rollout": {"stop": [3]}})
    with pytest.raises(ValueError, match="rollout.stop"):
        from_dict({"rollout": {"stop": [""]}})
