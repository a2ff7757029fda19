"""The run configuration: typed, frozen, resolved once, written to the run directory first.

Precedence, lowest to highest (each layer only names the keys it changes):

    dataclass defaults
    < the method's defaults (its entry in ``tre_cli.losses.registry``)
    < the task overlay (``tasks/<task>.yaml``: steps, max_new_tokens, eval metric...)
    < the preset (``smoke`` or ``paper``)
    < ``--config FILE`` (YAML, the same nested layout as ``config.yaml`` in a run directory)
    < the ``--task`` / ``--method`` / ``--model`` flags
    < ``--set a.b=c`` (in the order given; the value is read as a YAML scalar)

Task options live under ``task.options`` and are set as ``--set task.options.NAME=VALUE``; they are
free-form here and validated by the task module when the task is built. ``task.NAME`` is an
unknown key (the error suggests ``task.options.NAME``), so an option can never shadow ``task.name``.

Method parameters are flat under ``method`` (``method.alpha``, ``method.k``...). A parameter that
the chosen method does not have is an error naming it, so ``--set method.k=5`` with ``tre-p`` never
silently does nothing.

Every error is one line that names the key (and the file or flag it came from).

    schema.py     the sections (typed, frozen, each checking its values) and the presets
    overrides.py  the layers above, typed against the schema and merged; resolve, from_dict, to_dict
    files.py      YAML files read with one-line errors
    devices.py    'auto' device and memory settings, resolved on the machine that runs the job

Nothing here imports torch (the device check does, when it runs).
"""

from tre_cli.config.devices import resolve_device, resolve_gradient_checkpointing
from tre_cli.config.files import read_yaml_file
from tre_cli.config.overrides import (
    Overrides,
    dump_yaml,
    from_dict,
    load_run_config,
    load_task_overlay,
    parse_override,
    resolve,
    to_dict,
    with_overrides,
)
from tre_cli.config.schema import (
    PRESETS,
    SECTIONS,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    PPOConfig,
    RolloutConfig,
    RunConfig,
    RunSection,
    TaskConfig,
    WandbConfig,
)

__all__ = [
    "PRESETS",
    "SECTIONS",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "Overrides",
    "PPOConfig",
    "RolloutConfig",
    "RunConfig",
    "RunSection",
    "TaskConfig",
    "WandbConfig",
    "dump_yaml",
    "from_dict",
    "load_run_config",
    "load_task_overlay",
    "parse_override",
    "read_yaml_file",
    "resolve",
    "resolve_device",
    "resolve_gradient_checkpointing",
    "to_dict",
    "with_overrides",
]
