"""A small ctypes binding to libnftables' JSON API (`libnftables.so.1`), one context per network namespace.

Why ctypes and not Debian's `python3-nftables`: that module only imports under /usr/bin/python3, not
from our venv; the C API we need is six functions. Why in process and not the `nft` command: adding one
element to a 100k-element set takes ~0.05 ms here versus ~2 ms for a fork/exec of `nft`.

Namespace: libnftables opens its netlink socket when the context is created (nft_ctx_new ->
nft_mnl_socket_open), and mnl sockets belong to the namespace current for the creating *thread*. We go
further and create *and use* the context only on a `NetnsThread` that has setns()'d into the target
namespace, so a socket can never be (re)opened in the wrong namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Sequence
from typing import Any

import msgspec

from omniwall.dataplane.netns import NetnsThread, assert_not_initial
from omniwall.dataplane.nft.names import FAMILY, TABLE
from omniwall.dataplane.nft.nlbatch import BatchError, ElemSocket, KeyType, Op, load_ops, op_msgs
from omniwall.dataplane.nft.nlrules import Cache, SetInfo, Unsupported, encode_commands, note_sets, set_info

log = logging.getLogger(__name__)

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_TERSE = 1 << 11  # listings without set elements

_LIB_NAMES = ("libnftables.so.1", ctypes.util.find_library("nftables") or "libnftables.so")
_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class NftError(RuntimeError):
    """A command libnftables refused; `message` is its error text (names the offending element)."""

    def __init__(self, message: str, commands: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.commands = commands


def _load() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        last: OSError | None = None
        for name in _LIB_NAMES:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as e:
                last = e
        else:
            raise NftError(f"cannot load libnftables: {last}")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).restype = ctypes.c_int
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _lib = lib
        return lib


class _RawContext:
    """One nft_ctx; not thread-safe, lives on its namespace thread."""

    def __init__(self) -> None:
        self.lib = _load()
        self.ctx = self.lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not self.ctx:
            raise NftError("nft_ctx_new failed")
        self.lib.nft_ctx_output_set_flags(self.ctx, NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE)
        self.lib.nft_ctx_buffer_output(self.ctx)
        self.lib.nft_ctx_buffer_error(self.ctx)

    def run(self, text: str | bytes, terse: bool = False) -> tuple[int, str, str]:
        flags = NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE | (NFT_CTX_OUTPUT_TERSE if terse else 0)
        self.lib.nft_ctx_output_set_flags(self.ctx, flags)
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, text if isinstance(text, bytes) else text.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        return rc, out, err

    def free(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


def _table_of(commands: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(family, table) of the first command's object."""
    try:
        (obj,) = commands[0].values()
        ((kind, body),) = obj.items()
        if kind == "table":
            return body["family"], body["name"]
        return body["family"], body["table"]
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None


class Nft:
    """libnftables in one namespace (None: the namespace this thread is in).

    `transact(commands)` sends one JSON batch = one kernel transaction (all or nothing).
    `elements(family, table, ops)` sends set-element changes as one transaction without libnftables.
    `load_elements(family, table, set, keytype, elements)` bulk-loads one set that way (any size).
    `list_table(family, name)` returns the JSON listing, or None when the table does not exist.
    Writes refuse the initial namespace unless `allow_initial_netns` (a real agent on a real host).
    """

    def __init__(
        self, netns: str | None, *, allow_initial_netns: bool = False, raw_rules: bool = True
    ) -> None:
        self.netns = netns
        self.allow_initial_netns = allow_initial_netns
        self.thread = NetnsThread(netns, name="nft")
        self.writes = 0  # transactions sent (tests assert "no write" on a converged resync)
        self.last_batch: list[dict[str, Any]] = []  # the last transaction's commands
        self.element_writes = 0  # of `writes`, those sent as raw element batches (no libnftables)
        self.raw_writes = 0  # of `writes`, transactions of rules etc. sent as raw batches (nlrules.py)
        # `transact` encodes raw nfnetlink when it can (False: always libnftables, the reference)
        self.raw_rules = raw_rules
        self._known: dict[str, SetInfo] = {}  # sets of the table so far: name -> key type (nlrules.py)
        self._expr_cache: Cache = {}  # encoded expressions, reused by later batches (nlrules.py)
        self._cache_table: tuple[str, str] | None = None
        self._elem_sock: ElemSocket | None = None
        try:
            self._raw: _RawContext = self.thread.call(_RawContext)
        except BaseException:
            self.thread.close()
            raise

    def _run(self, text: str | bytes, terse: bool = False) -> tuple[int, str, str]:
        return self._raw.run(text, terse)

    def transact(self, commands: list[dict[str, Any]], ops: Sequence[Op] = ()) -> None:
        """One transaction: `commands` (libnftables JSON), then `ops` (set elements, the revision).
        Encoded as raw nfnetlink (nlrules.py) when every command is of a form it knows, else through
        libnftables (then `ops` follow as a second, raw element batch). A raw batch the kernel refuses
        is retried through libnftables, whose refusal (and error text) is the one raised."""
        if not commands and not ops:
            return
        if self.raw_rules and commands:
            table = _table_of(commands)
            enc = None
            if table is not None:
                try:
                    if table != self._cache_table:  # cached bytes name this table
                        self._expr_cache, self._cache_table = {}, table
                    msgs, enc = encode_commands(table[0], table[1], commands, self._known, self._expr_cache)
                    msgs += op_msgs(table[1], list(ops))
                except (Unsupported, ValueError) as e:
                    log.debug("raw encoding not possible (%s): libnftables", e)
                    enc = None
            if enc is not None and table is not None:
                try:
                    self._sock().commit_msgs(table[0], msgs)
                except BatchError as e:
                    log.warning("raw nf_tables batch refused (%s); retrying through libnftables", e)
                else:
                    enc.commit_known()
                    self._known = enc.known
                    self.writes += 1
                    self.raw_writes += 1
                    self.last_batch = commands + [op.as_json(*table) for op in ops if op.sends]
                    return
        if commands:
            self._transact_json(commands)
        if ops:
            fam_table = _table_of(commands) if commands else None
            family, table_name = fam_table if fam_table is not None else (FAMILY, TABLE)
            self.elements(family, table_name, list(ops))

    def learn_sets(self, listing: list[dict[str, Any]], family: str, table: str) -> None:
        """Note the sets and maps of a table listing (their key types), so raw batches can name them
        after an adoption (sets the raw encoder does not know send a batch through libnftables)."""
        known: dict[str, SetInfo] = {}
        for obj in listing:
            body = obj.get("set") or obj.get("map")
            if not isinstance(body, dict) or body.get("family") != family or body.get("table") != table:
                continue
            info = set_info(body)
            if info is not None:
                known[body["name"]] = info
        self._known = known

    def _transact_json(self, commands: list[dict[str, Any]]) -> None:
        # msgspec: the same bytes as json.dumps(separators=(",", ":")), ~6x faster (a full table's
        # 15 MB batch: 0.12 s instead of 0.68 s of CPU)
        payload = msgspec.json.encode({"nftables": commands})

        def go() -> tuple[int, str, str]:
            if not self.allow_initial_netns:
                assert_not_initial("nft transaction")
            return self._run(payload)

        rc, _out, err = self.thread.call(go)
        self.writes += 1
        self.last_batch = commands
        if rc != 0:
            raise NftError(f"nft transaction failed: {err.strip() or 'rc=' + str(rc)}", commands)
        note_sets(self._known, commands)

    def _sock(self) -> ElemSocket:
        if self._elem_sock is None:

            def open_sock() -> ElemSocket:
                if not self.allow_initial_netns:  # the socket is bound to this namespace for good
                    assert_not_initial("nft element batch")
                return ElemSocket()

            self._elem_sock = self.thread.call(open_sock)
        return self._elem_sock

    def rule_handles(self, family: str, table: str, chain: str) -> list[tuple[int, str | None]] | None:
        """The rules of one chain, in order, as (handle, comment); None when the kernel refuses."""
        try:
            return self._sock().dump_rules(family, table, chain)
        except BatchError as e:
            log.debug("rule dump of %s refused: %s", chain, e)
            return None

    def elements(self, family: str, table: str, ops: list[Op]) -> None:
        """Set-element changes (and the revision quota) as one transaction, bypassing libnftables
        (nlbatch.py). A bad key or a refused batch raises NftError; nothing is applied then."""
        sock = self._sock()
        try:
            sent = sock.commit(family, table, ops)
        except ValueError as e:  # a key that is not an address/ifname: nothing was sent
            raise NftError(f"nft element batch: {e}", [op.as_json(family, table) for op in ops]) from e
        except BatchError as e:
            self.writes += 1
            self.last_batch = [op.as_json(family, table) for op in ops]
            raise NftError(f"nft element batch failed: {e}", self.last_batch) from e
        if sent:
            self.writes += 1
            self.element_writes += 1
            self.last_batch = [op.as_json(family, table) for op in ops if op.sends]

    def load_elements(
        self,
        family: str,
        table: str,
        set_name: str,
        keytype: KeyType,
        elements: list[str],
        *,
        replace: bool = False,
    ) -> None:
        """Load `elements` (any number: 1M addresses take ~1 s) into an existing set in ONE transaction,
        as a raw nfnetlink batch (no JSON, no parser); `replace`: flush the set first, same transaction."""
        self.elements(family, table, load_ops(set_name, keytype, elements, replace=replace))

    def list_table(self, family: str, name: str, *, terse: bool = False) -> list[dict[str, Any]] | None:
        """`nft -j list table` as a list of objects (metainfo dropped); terse: without set elements."""
        rc, out, err = self.thread.call(self._run, f"list table {family} {name}", terse)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(f"nft list table failed: {err.strip()}")
        data = msgspec.json.decode(out) if out.strip() else {"nftables": []}
        return [o for o in data.get("nftables", []) if "metainfo" not in o]

    def run_text(self, text: str) -> str:
        """Run a command in nft syntax (read-only listings in tests/diagnostics); returns its output."""
        rc, out, err = self.thread.call(self._run, text)
        if rc != 0:
            raise NftError(f"nft {text!r} failed: {err.strip()}")
        return out

    def close(self) -> None:
        if getattr(self, "_elem_sock", None) is not None:
            self._elem_sock.close()  # type: ignore[union-attr]
            self._elem_sock = None
        raw = getattr(self, "_raw", None)
        if raw is not None and raw.ctx:
            self.thread.call(raw.free)
        self.thread.close()


__all__ = ["Nft", "NftError"]
