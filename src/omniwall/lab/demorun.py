"""A demo's life on a managed lab, shared by `make demo` and `make demo-ha` (demo.py, demo_ha.py): bring
the lab up, show what the demo shows, stay up until Ctrl-C (or SIGTERM) unless `once`, tear everything
down, and turn the outcome into an exit status.

Exit status: 0 when every check of `show` held, 1 when one failed or the lab could not be built, 2 for
resource files that do not validate, 130 when interrupted before the lab was up and shown.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from omniwall.lab.lab import Lab
from omniwall.lab.managed import ControlPlane, ManagedError, managed_lab

Show = Callable[[Lab, ControlPlane], bool]
WhileUp = Callable[[Lab, ControlPlane], AbstractContextManager[Any]]


def run_demo(
    directory: Path,
    show: Show,
    *,
    console: Any,
    once: bool,
    gone: str,
    while_up: WhileUp | None = None,
    **managed: Any,
) -> int:
    """`managed_lab` from the YAML files of `directory` (`managed`: managers=, etcd=), then `show(lab, cp)`
    (True: every check held; it prints through `console`). Unless `once`, `while_up(lab, cp)` is entered
    (e.g. background traffic) while the lab waits for Ctrl-C. `gone` is printed once everything is down."""
    from omniwall.model.errors import ValidationError

    files = sorted(directory.glob("*.yaml")) if directory.is_dir() else [directory]
    started = time.monotonic()
    try:
        with managed_lab([str(f) for f in files], **managed) as (lab, cp):
            plan = lab.plan
            console.print(
                f"lab [bold]{lab.name}[/] up in {time.monotonic() - started:.1f} s: "
                f"{len(plan.hosts)} hosts, {len(plan.workloads)} workloads, namespace prefix {lab.prefix}"
            )
            ok = show(lab, cp)
            if not once:
                with while_up(lab, cp) if while_up else contextlib.nullcontext():
                    console.print("[bold]the lab stays up; Ctrl-C tears it down[/]")
                    wait_for_ctrl_c()
                # A second Ctrl-C must not cut the teardown short (it would leave namespaces behind).
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                console.print("\ntearing down ...")
    except KeyboardInterrupt:
        print("interrupted; the lab was torn down", file=sys.stderr)
        return 130
    except ValidationError as e:
        print(f"error: {directory}: {e}", file=sys.stderr)
        return 2
    except (ManagedError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    console.print(gone)
    return 0 if ok else 1


def wait_for_ctrl_c() -> None:
    """Block until Ctrl-C; SIGTERM too, since the lab (`Lab.__enter__`) turns it into KeyboardInterrupt."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
