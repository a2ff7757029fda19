"""The override engine: every layer of a run config (see tre_cli.config) is a nested mapping or
`--set a.b=c` items, checked against the schema key by key, typed, merged in order and built
into a RunConfig. Every error is one line that names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from tre_cli.config.devices import resolve_device
from tre_cli.config.files import read_yaml_file
from tre_cli.config.schema import PRESETS, MethodConfig, RunConfig, TaskConfig, _key_error
from tre_cli.io import atomic_write_text
from tre_cli.losses.registry import DEFAULT_METHOD, Param, all_params


def _param_type(param: Param) -> Any:
    """A method parameter's config type; null means its default."""
    kind = Literal[param.choices] if param.choices else param.kind
    return kind | None


def _hints(cls: type) -> dict[str, Any]:
    if cls is MethodConfig:
        # Flat under `method`: its name and every parameter any method has (the chosen method's
        # own are checked when the MethodConfig is built).
        return {"name": str, **{name: _param_type(param) for name, param in all_params().items()}}
    return get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        key = prefix + name
        keys.append(key)
        if _is_section(tp):
            keys.extend(_all_keys(tp, key + "."))
    return keys


def _unknown_key(key: str) -> ValueError:
    if key.startswith("task.") and not key.startswith("task.options."):
        return ValueError(f"unknown config key '{key}' (task options are set as 'task.options.{key[5:]}')")
    # 'ppo.lr' -> 'ppo.actor_lr': first a key of the same section whose name contains the typed one.
    section, _, leaf = key.rpartition(".")
    siblings = [k for k in _all_keys() if k.rpartition(".")[0] == section]
    match = [k for k in siblings if leaf and leaf in k.rpartition(".")[2]][:1]
    match = match or difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return ValueError(f"unknown config key '{key}'{hint}")


class _Raw:
    """A value typed on the command line: read as YAML unless the key expects a string."""

    def __init__(self, text: str) -> None:
        self.text = text

    def as_text(self) -> str:
        # YAML quoting still works ('  ' keeps its spaces); 'off' or '123' stay the text typed.
        parsed = self.parsed()
        return parsed if isinstance(parsed, str) else self.text

    def parsed(self) -> Any:
        try:
            return yaml.safe_load(self.text)
        except yaml.YAMLError:
            return self.text


def _is_union(origin: Any) -> bool:
    # `int | None` evaluates to types.UnionType, `bool | Literal["auto"]` to typing.Union.
    return origin is Union or origin is types.UnionType


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(repr(a) for a in choices)
    if _is_union(origin):
        parts = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a) for a in parts)
        return text + (" or null" if len(parts) < len(get_args(tp)) else "")
    if tp is dict or origin is dict:
        return "a mapping"
    if origin is tuple:
        return "a string or a list of strings"
    return {bool: "true or false", int: "an integer", float: "a float", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Mismatch(Exception):
    pass


def _coerce_one(tp: Any, value: Any) -> Any:
    """The value as type tp, or _Mismatch. _Raw values are strings for str/Literal keys, else YAML."""
    origin = get_origin(tp)
    if _is_union(origin):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, _Raw) and value.parsed() is None)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce_one(arg, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        value = value.as_text() if isinstance(value, _Raw) else value
        if isinstance(value, str) and value in get_args(tp):
            return value
        raise _Mismatch
    if tp is str:
        value = value.as_text() if isinstance(value, _Raw) else value
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(value, _Raw):
        value = value.parsed()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        # YAML 1.1 reads '1e-6' (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(number):
            raise _Mismatch
        return number
    if origin is tuple:  # tuple[str, ...]: a list of strings, or one string for a list of one
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _Mismatch
    if tp is dict or get_origin(tp) is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return _plain(value)
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not user input


def _plain(value: Any) -> Any:
    """A deep copy with _Raw leaves read as YAML (task options are free-form)."""
    if isinstance(value, _Raw):
        return value.parsed()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _coerce(key: str, tp: Any, value: Any) -> Any:
    try:
        return _coerce_one(tp, value)
    except _Mismatch:
        shown = value.text if isinstance(value, _Raw) else value
        raise _key_error(key, f"expects {_describe(tp)}, got {shown!r}") from None


# --------------------------------------------------------------------------- layers


Flat = dict[str, Any]


def _flatten(layer: Any, source: str, cls: type = RunConfig, prefix: str = "") -> Flat:
    """A nested mapping checked against the schema -> {dotted key: typed value}."""
    if layer is None:  # `ppo:` with nothing under it
        return {}
    if not isinstance(layer, Mapping):
        where = f"config key '{prefix[:-1]}'" if prefix else "the top level"
        raise ValueError(f"{where} expects a mapping, got {layer!r} ({source})")
    hints = _hints(cls)
    flat: Flat = {}
    for name, value in layer.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            raise ValueError(f"{_unknown_key(str(key))} ({source})")
        tp = hints[name]
        if _is_section(tp):
            if isinstance(value, _Raw):
                example = f"{key}.{next(iter(_hints(tp)))}"
                raise ValueError(f"config key '{key}' is a section: set one of its keys, e.g. '{example}' ({source})")
            flat.update(_flatten(value, source, tp, key + "."))
        else:
            try:
                flat[key] = _coerce(key, tp, value)
            except ValueError as error:
                raise ValueError(f"{error} ({source})") from None
    return flat


def _deep_merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge(layers: Iterable[Flat]) -> Flat:
    merged: Flat = {}
    for flat in layers:
        for key, value in flat.items():
            if key == "task.options" and key in merged:
                merged[key] = _deep_merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def _build(flat: Flat, cls: type = RunConfig, prefix: str = "") -> Any:
    if cls is MethodConfig:
        given = {name: flat[prefix + name] for name in _hints(cls) if name != "name" and prefix + name in flat}
        return MethodConfig.of(flat.get(prefix + "name", DEFAULT_METHOD), given)
    kwargs = {}
    for name, tp in _hints(cls).items():
        key = prefix + name
        if _is_section(tp):
            kwargs[name] = _build(flat, tp, key + ".")
        elif key in flat:
            kwargs[name] = flat[key]
    return cls(**kwargs)


def parse_override(item: str) -> tuple[str, str]:
    """'a.b=c' -> ('a.b', 'c'); the value is typed later, against the key it sets."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set expects KEY=VALUE with a dotted key (e.g. ppo.clip=0.2), got {item!r}")
    return key, text


def _override_layer(key: str, value: Any) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    node = layer
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return layer


Overrides = Mapping[str, Any] | Sequence[str | tuple[str, Any]]


def _overrides_layer(overrides: Overrides, source: str) -> Flat:
    """A {dotted key: value} mapping, or a sequence (applied in order) of --set items (strings,
    typed against their keys) and (dotted key, value) pairs (values as they are: a sweep's grid)."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    pairs: list[tuple[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            key, text = parse_override(item)
            pairs.append((key, _Raw(text)))
        else:
            pairs.append((item[0], item[1]))
    layers = []
    for key, value in pairs:
        if key.startswith("task.options.") or key == "task.options":
            # Options are free-form below task.options, so the generic walk would reject them.
            options = _override_layer(key[len("task.options."):], value) if key != "task.options" else value
            layers.append(_flatten({"task": {"options": options}}, f"{source} {key}"))
        else:
            layers.append(_flatten(_override_layer(key, value), f"{source} {key}"))
    return _merge(layers)


def load_task_overlay(name: str) -> dict[str, Any]:
    """The task's config overlay: {section: {key: value}} (steps, max_new_tokens...)."""
    from tre_cli.tasks import task_overlay

    return dict(task_overlay(name) or {})


def resolve(
    task: str | None = None,
    method: str | None = None,
    model: str | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Overrides = (),
    *,
    task_overlay: None | Mapping[str, Any] | Callable[[str], Mapping[str, Any]] = None,
    check_device: bool = True,
) -> RunConfig:
    """The run config from every layer (see the module docstring for the order).

    task_overlay: the overlay, or a function of the task name returning it, to use instead of the
    task's own (tests; a sweep that carries its own overlays).
    check_device: False where the config is resolved on another machine than the one that runs it
    (a Ray head without a GPU).
    """
    preset_layer: Flat = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        preset_layer = _flatten(PRESETS[preset], f"preset {preset}")
    file_layer: Flat = {}
    if config_file is not None:
        file_layer = _flatten(read_yaml_file(config_file), f"in {config_file}")
    flags = {k: v for k, v in (("task.name", task), ("method.name", method), ("model.name", model)) if v is not None}
    flag_layer = _flatten(
        {s: {k: v} for s, k, v in ((key.split(".")[0], key.split(".")[1], value) for key, value in flags.items())},
        "command-line flag",
    )
    set_layer = _overrides_layer(overrides, "--set")

    # The overlay depends on the task name, which any layer above it may set.
    task_name = _merge([preset_layer, file_layer, flag_layer, set_layer]).get("task.name", TaskConfig.name)
    if task_overlay is None:
        overlay = load_task_overlay(task_name)
    elif callable(task_overlay):
        overlay = dict(task_overlay(task_name))
    else:
        overlay = dict(task_overlay)
    overlay_layer = _flatten(overlay, f"task overlay for {task_name!r}")
    if "task.name" in overlay_layer and overlay_layer["task.name"] != task_name:
        raise ValueError(f"the task overlay for {task_name!r} may not set task.name")

    merged = _merge([overlay_layer, preset_layer, file_layer, flag_layer, set_layer])
    config = _build(_estimator_loss_agg(merged, _merge([file_layer, flag_layer, set_layer])))
    if check_device and config.run.device == "cuda":
        resolve_device("cuda")
    return config


def _estimator_loss_agg(merged: Flat, above_presets: Flat) -> Flat:
    """An estimator's own loss aggregation (Dr. GRPO's) where no layer above the task
    overlay and the presets sets ppo.loss_agg and the method is defined for it."""
    from tre_cli.losses.estimators import OWN_LOSS_AGG
    from tre_cli.losses.registry import METHODS

    own = OWN_LOSS_AGG.get(merged.get("ppo.estimator"))
    method = METHODS.get(merged.get("method.name", DEFAULT_METHOD))
    if own is None or "ppo.loss_agg" in above_presets or method is None or method.loss_agg_problem(own):
        return merged
    return {**merged, "ppo.loss_agg": own}


def from_dict(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from a nested mapping (unspecified keys take their defaults); strict keys and types."""
    return _build(_flatten(data, source))


def to_dict(config: RunConfig) -> dict[str, Any]:
    """A nested plain-data dict; the method's parameters sit flat beside its name."""
    data = dataclasses.asdict(config)
    data["rollout"]["stop"] = list(config.rollout.stop)  # YAML and JSON have lists, not tuples
    data["method"] = {"name": config.method.name, **config.method.params}
    return data


def with_overrides(config: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """A copy with {dotted key: value} applied and validated (e.g. {'run.out': '...'})."""
    return _build(_merge([_flatten(to_dict(config), "config"), _overrides_layer(values, "override")]))


def dump_yaml(config: RunConfig, path: str | Path) -> Path:
    """Write config as YAML atomically (a partial config.yaml never exists)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False))


def load_run_config(path: str | Path) -> RunConfig:
    """The config a run directory recorded (path: the config.yaml or the run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    return from_dict(read_yaml_file(path) or {}, f"in {path}")
