"""Starting a sweep: the checks that come before Ray (the output directory, the machine's
resources), the sweep's manifest, the environment Ray's processes inherit, and then the Ray
backend (imported only now, after the environment it reads at import is set)."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tre_cli.io import atomic_write_text
from tre_cli.sweep.grid import SWEEP_FILE, SweepPlan, check_out_dir, concurrency_limit
from tre_cli.sweep.outcome import SweepOutcome, fail_once_from_env
from tre_cli.sweep.spec import Resources


def _private_dirs(out: Path) -> dict[str, Path]:
    base = out / ".ray"
    return {"base": base, "temp": base / "tmp", "token": base / "auth_token", "wandb": base / "wandb"}


def _local_ray_env(out: Path) -> dict[str, str]:
    """Environment for a local Ray cluster started by this driver.

    Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset and
    writes its token to ~/.ray/auth_token. We set the mode ourselves and keep the token under
    <out>/.ray (0600): the cluster stays authenticated, and nothing lands in the home directory.
    A user who sets RAY_AUTH_MODE / RAY_AUTH_TOKEN(_PATH) keeps their own settings.
    """
    dirs = _private_dirs(out)
    # Ray runs workers at niceness 15 to keep its own daemons responsive; here the trials ARE the
    # work, and at 15 they starve behind any other process (a retry took minutes on a busy box).
    env = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}
    if "RAY_AUTH_MODE" not in os.environ:
        env["RAY_AUTH_MODE"] = "token"
    if env.get("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "")).lower() == "token" \
            and "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        token = dirs["token"]
        if not token.is_file():
            token.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    return env


def _common_env(out: Path) -> dict[str, str]:
    """W&B caches and Ray's output engine, for the driver and (inherited) the trials."""
    wandb_dir = _private_dirs(out)["wandb"]
    env = {
        # Our own table replaces Tune's console reporter (verbose=0 in the legacy engine is silent).
        "RAY_AIR_NEW_OUTPUT": "0",
        # Trials keep the driver's working directory, so relative paths in a config (a local
        # task.options.train_source) mean what they mean to `tre run`.
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        # Trials log to W&B themselves (Tracker: explicit steps, finished in a finally block);
        # Ray's WandbLoggerCallback is not used, so a Ctrl-C does not wait on its upload timeout.
        "WANDB_SILENT": "true",
    }
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        if var not in os.environ:
            env[var] = str(wandb_dir / sub)
    return env


# Ray puts its Unix sockets at <temp>/session_<date>_<time>_<pid>/sockets/plasma_store, and a
# socket path may not exceed 107 bytes: that leaves about 40 for <temp>.
_MAX_RAY_TEMP_LEN = 36


def temp_link_path(temp: Path) -> Path:
    """Where the short link to a Ray temp dir goes: the system temp folder, named by the target."""
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / f"tre-ray-{hashlib.sha1(str(temp).encode()).hexdigest()[:10]}"


def _short_temp_link(temp: Path) -> Path | None:
    """A short symlink to `temp` when its path is too long for Ray's sockets, else None.

    Only the link lives in the system temp folder; every file Ray writes stays under `temp`.
    """
    if len(str(temp)) <= _MAX_RAY_TEMP_LEN:
        return None
    link = temp_link_path(temp)
    if link.is_symlink() and Path(os.readlink(link)) == temp:
        return link
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(temp, link, target_is_directory=True)
    return link


def local_cluster(plan: SweepPlan, num_cpus: int | None = None) -> dict[str, float]:
    """The CPUs and GPUs a local Ray cluster started for this sweep will have."""
    gpus = 0
    if plan.resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def check_local_resources(resources: Resources, num_cpus: int | None = None) -> None:
    """A trial that asks for more than this machine has would wait forever in Ray's queue: say so now."""
    cpus = num_cpus or os.cpu_count() or 1
    if resources.cpu > cpus:
        raise ValueError(f"each trial asks for {resources.cpu:g} CPUs but this machine has {cpus}; "
                         "pass --cpus-per-trial (or --preset smoke), or join a cluster with --address")
    if resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if resources.gpu > gpus:
            raise ValueError(f"each trial asks for {resources.gpu:g} GPUs but this machine has {gpus}; "
                             "pass --gpus-per-trial 0 (or --preset smoke), or join a cluster with --address")


def run_sweep(
    plan: SweepPlan,
    *,
    resume: bool = False,
    address: str | None = None,
    storage: str | None = None,
    console: Any = None,
    num_cpus: int | None = None,
) -> SweepOutcome:
    """Run (or with resume=True continue) the planned sweep through Ray Tune."""
    from rich.console import Console

    console = console or Console(stderr=True)
    check_out_dir(plan, resume)
    fail_once = fail_once_from_env()
    if address is None:
        check_local_resources(plan.resources, num_cpus)
        concurrency_limit(plan, local_cluster(plan, num_cpus))  # a trial's workers that cannot fit: say so now
    started = time.monotonic()

    plan.out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(plan.out / SWEEP_FILE, json.dumps(plan.manifest(), indent=2) + "\n")

    env = _common_env(plan.out)
    if address is None:
        env.update(_local_ray_env(plan.out))
    ray_was_imported = "ray" in sys.modules
    os.environ.update(env)  # before ray is imported: a local cluster's workers inherit it

    from tre_cli.sweep import ray_backend

    outcome = SweepOutcome(out=plan.out)
    temp = None if address is not None else _private_dirs(plan.out)["temp"]
    link = None
    if temp is not None:
        temp.mkdir(parents=True, exist_ok=True)
        link = _short_temp_link(temp)
    try:
        ray_backend.drive(plan, outcome, env=env, fail_once=fail_once, resume=resume, address=address,
                          storage=storage, console=console, num_cpus=num_cpus, temp_dir=link or temp,
                          refresh_auth=ray_was_imported and address is None)
    finally:
        if link is not None:
            link.unlink(missing_ok=True)
    outcome.interrupted = outcome.interrupted or bool(outcome.unfinished)
    outcome.wall_s = time.monotonic() - started
    return outcome
