"""Configuration files of the daemons: `/etc/omniwall/manager.yaml` and `/etc/omniwall/agent.yaml`.

A file is a YAML mapping of the command's long options (`token-file: /etc/omniwall/agent.token`, dashes
or underscores). A repeatable option takes a list (the agent's `manager: [https://m1:8443, ...]`) or one
value (which may hold several, comma-separated). Precedence, highest first: the command line, the
option's environment variable, the file, the built-in default. The file is `--config PATH`, else
`$OMNIWALL_<DAEMON>_CONFIG`, else `/etc/omniwall/<daemon>.yaml` when it exists (`--config ''` reads
none).

It works by filling click's (typer's) `default_map` from an eager `--config` option, before the other
options are resolved: the file only changes defaults, so every option keeps its own conversion and checks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml

CONFIG_DIR = Path("/etc/omniwall")


class ConfigFileError(typer.BadParameter):
    pass


def config_path(daemon: str, given: str | None, environ: dict[str, str] | None = None) -> Path | None:
    """The file to read for `daemon` (manager/agent), or None."""
    env = os.environ if environ is None else environ
    if given is None:
        given = env.get(f"OMNIWALL_{daemon.upper()}_CONFIG")
    if given is not None:
        return Path(given) if given else None
    default = CONFIG_DIR / f"{daemon}.yaml"
    return default if default.is_file() else None


def read_config(path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The file's settings keyed by parameter name; a clear error naming the file and key otherwise."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigFileError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in options or name == "config":
            known = ", ".join(sorted(n.replace("_", "-") for n in options if n != "config"))
            raise ConfigFileError(f"{path}: unknown option {key!r} (known: {known})")
        if getattr(options[name], "multiple", False):  # a repeatable option (the agent's --manager)
            values = value if isinstance(value, list) else [value]
            if not values or any(isinstance(v, list | dict) or v is None for v in values):
                raise ConfigFileError(f"{path}: {key}: expected a value or a list of values")
            out[name] = [str(v) for v in values]
            continue
        if isinstance(value, list | dict):
            raise ConfigFileError(f"{path}: {key}: expected a single value, got a {type(value).__name__}")
        out[name] = value
    return out


def config_option_callback(daemon: str) -> Callable[[Any, Any, str | None], str | None]:
    """The callback of an eager `--config` option: loads the file into the context's default_map."""

    def callback(ctx: Any, param: Any, value: str | None) -> str | None:
        if ctx.resilient_parsing:  # shell completion
            return value
        path = config_path(daemon, value)
        if path is None:
            return value
        params = ctx.command.params
        options = {p.name: p for p in params if p.name and getattr(p, "param_type_name", "") == "option"}
        settings = read_config(path, options)
        ctx.default_map = {**settings, **(ctx.default_map or {})}
        return str(path)

    return callback
