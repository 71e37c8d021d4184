"""Where a client finds its manager, token and TLS files: the same rules for the CLI, scripts, hooks.

Each setting comes from, first found: the argument, the environment (`OMNIWALL_SERVER`,
`OMNIWALL_TOKEN`, `OMNIWALL_CA`, `OMNIWALL_CERT`, `OMNIWALL_KEY`), the config file's current context
(`~/.config/omniwall/config.yaml` or `$OMNIWALL_CONFIG`; the context `OMNIWALL_CONTEXT` names, else
`current-context`; keys at the top level apply under it), and for the server `http://127.0.0.1:8443`.
A context holds `server`, `token` or `token_file`, `ca`, `cert`, `key` (cli/config_cmd.py edits them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ClientError

DEFAULT_SERVER = "http://127.0.0.1:8443"
CONFIG_PATH = Path("~/.config/omniwall/config.yaml")
SETTINGS = ("server", "token", "token_file", "ca", "cert", "key")


def config_path() -> Path:
    return Path(os.environ.get("OMNIWALL_CONFIG", str(CONFIG_PATH))).expanduser()


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The whole file ({} when there is none); ValueError naming the file when it is not a mapping."""
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping (server/token, or contexts)")
    contexts = data.get("contexts", {})
    if not isinstance(contexts, dict) or not all(isinstance(v, dict) for v in contexts.values()):
        raise ValueError(f"{path}: contexts: expected a mapping of name -> {{server, token, ...}}")
    return data


def effective(data: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The settings a client uses: the top-level keys, overridden by the chosen context's (`name`, else
    OMNIWALL_CONTEXT, else current-context). Naming a context that is not there is an error."""
    chosen = name or os.environ.get("OMNIWALL_CONTEXT") or data.get("current-context")
    base = {k: data[k] for k in SETTINGS if k in data}
    if not chosen:
        return base
    contexts = data.get("contexts") or {}
    if chosen not in contexts:
        known = ", ".join(sorted(contexts)) or "none"
        raise ValueError(f"context {chosen!r} is not in {config_path()} (contexts: {known})")
    return {**base, **{k: v for k, v in contexts[chosen].items() if k in SETTINGS}}


@dataclass(frozen=True)
class Settings:
    """A resolved manager address and credentials. `ca`: the manager's CA (a private PKI); `cert`/`key`:
    a client certificate (mutual TLS; optional for people, required of agents)."""

    server: str
    token: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def resolve(
        cls,
        server: str | None = None,
        token: str | None = None,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        context: str | None = None,
    ) -> Settings:
        """Arguments, then the environment, then the config file (read only when something is still
        missing). Raises ClientError (status None) when there is no token or the file is bad."""
        env = os.environ.get
        server = server or env("OMNIWALL_SERVER")
        token = token or env("OMNIWALL_TOKEN")
        cfg: dict[str, Any] = {}
        if context is not None or not (server and token):
            try:
                cfg = effective(read_config(), context)
            except ValueError as e:
                raise ClientError(str(e)) from None
        tok = token or cfg.get("token")
        if not tok and cfg.get("token_file"):
            try:
                tok = Path(str(cfg["token_file"])).expanduser().read_text().strip()
            except OSError as e:
                raise ClientError(f"token_file: {e}") from None
        if not tok:
            raise ClientError(
                "no token: pass --token, set OMNIWALL_TOKEN, or put token: in ~/.config/omniwall/config.yaml"
            )
        return cls(
            server=str(server or cfg.get("server") or DEFAULT_SERVER).rstrip("/"),
            token=str(tok),
            ca=ca or env("OMNIWALL_CA") or cfg.get("ca"),
            cert=cert or env("OMNIWALL_CERT") or cfg.get("cert"),
            key=key or env("OMNIWALL_KEY") or cfg.get("key"),
        )

    def verify(self) -> Any:
        """What httpx takes as `verify`: an SSL context for a private CA or a client certificate, else
        True (the system's CAs). ClientError when a file cannot be used."""
        if not (self.ca or self.cert or self.key):
            return True
        from omniwall.tls import TlsConfigError, client_context

        try:
            return client_context(self.ca, self.cert, self.key).context
        except TlsConfigError as e:
            raise ClientError(str(e)) from None


__all__ = ["CONFIG_PATH", "DEFAULT_SERVER", "Settings", "config_path", "effective", "read_config"]
