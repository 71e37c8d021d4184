"""`compile_catalog`: a whole catalog -> one HostDesiredState per Host (docs/semantics.md).

One implementation of the semantics: this is the incremental compiler's initial build. The rules:
- placement (span), order, monitor and default flags: span.py, order.py, rules.py;
- group members and addresses: labelindex.py, membership.py, sets.py;
- per-host assembly (only rules placed on the host's vNICs, only the sets those rules name): hoststate.py.
Output is sorted and deterministic: the same resources in any order give byte-identical JSON.
"""

from __future__ import annotations

from collections.abc import Mapping

from omniwall.compiler.incremental import IncrementalCompiler
from omniwall.compiler.ir import HostDesiredState
from omniwall.model.catalog import Catalog


def compile_catalog(
    catalog: Catalog, revision: int = 0, placements: Mapping[tuple[str, str], str] | None = None
) -> dict[str, HostDesiredState]:
    """Every Host in the catalog -> its desired state at `revision` (hosts without vNICs included);
    `placements`: workload (tenant, name) -> an extra host it is compiled onto (migration)."""
    # one-shot: the compiler is dropped on return, nothing to freeze (see IncrementalCompiler)
    return IncrementalCompiler(catalog, revision, freeze=False, placements=placements).states()
