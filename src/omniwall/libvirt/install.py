"""`omniwall libvirt install-hook`: libvirt's QEMU hook script and the hook's host configuration.

    <root>/etc/libvirt/hooks/qemu            a shell script exec'ing `python -m omniwall.libvirt.hook`
    <root>/etc/omniwall/libvirt-hook.json    its configuration (config.py), mode 0600

libvirtd reads its hooks when it starts: restart it after installing. A hook script that is not
Omniwall's is never overwritten (unless `force`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from omniwall.libvirt.config import HookConfig

MARK = "# omniwall libvirt hook"


class InstallError(RuntimeError):
    pass


def hook_script(config_path: Path, python: str) -> str:
    return (
        "#!/bin/sh\n"
        f"{MARK} (omniwall libvirt install-hook): registers domains with the Omniwall manager\n"
        f'exec {shlex.quote(python)} -m omniwall.libvirt.hook --config {shlex.quote(str(config_path))} "$@"\n'
    )


def install(
    cfg: HookConfig, *, root: Path = Path("/"), python: str | None = None, force: bool = False
) -> tuple[Path, Path]:
    """Write the hook and its configuration under `root`; returns (hook path, config path)."""
    hook = root / "etc/libvirt/hooks/qemu"
    conf = root / "etc/omniwall/libvirt-hook.json"
    if hook.exists() and not force and MARK not in hook.read_text(errors="replace"):
        raise InstallError(f"{hook} exists and is not Omniwall's hook (--force replaces it)")
    hook.parent.mkdir(parents=True, exist_ok=True)
    conf.parent.mkdir(parents=True, exist_ok=True)
    tmp = conf.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(cfg.to_json(), indent=2) + "\n")
    os.replace(tmp, conf)
    tmp = hook.with_suffix(".tmp")
    tmp.write_text(hook_script(conf.resolve(), python or sys.executable))
    tmp.chmod(0o755)
    os.replace(tmp, hook)
    return hook, conf


__all__ = ["InstallError", "hook_script", "install"]
