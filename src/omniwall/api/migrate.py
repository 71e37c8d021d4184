"""Live migration endpoints (docs/design/migration.md).

- `POST /v1/workloads/{name}/migrate?tenant=` `{"to": HOST, "wait": false, "switchTimeout": 120, ...}`:
  start; 202 with the migration record (200 with the final one when `wait`).
- `GET /v1/workloads/{name}/migration?tenant=`: the current or last migration of the workload.
- `POST /v1/workloads/{name}/migrate/{id}/switched`: the hypervisor says the vNIC has moved.
- `POST /v1/hosts/{host}/commands/{id}`: an agent answers a feed command (agent token of that host).

Who may migrate: whoever may write the workload (`resources.write`, its tenant or the provider).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from omniwall.manager.migration import FAULTS_ENV, Options

from .auth import Perm, Principal, authenticate, check_visible, check_write, manager_of, read_tenant, require
from .errors import ApiError, not_found


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    to: str = Field(min_length=1, description="destination host")
    wait: bool = Field(False, description="answer when the migration has ended")
    prepare_timeout: float = Field(30.0, gt=0, le=600, alias="prepareTimeout")
    command_timeout: float = Field(30.0, gt=0, le=600, alias="commandTimeout")
    switch_timeout: float = Field(120.0, gt=0, le=3600, alias="switchTimeout")
    fail_at: str | None = Field(None, alias="failAt", description=f"tests only ({FAULTS_ENV}=1)")
    second_copy: bool = Field(
        False,
        alias="secondCopy",
        description="copy the entries again after the switch (off: measured no gain)",
    )


class CommandResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    error: str | None = None


def router() -> APIRouter:
    r = APIRouter(tags=["migration"])

    @r.post("/v1/workloads/{name}/migrate", status_code=202, summary="live-migrate a workload to a host")
    async def migrate(
        request: Request,
        name: str,
        body: MigrateRequest,
        tenant: str | None = Query(None),
        p: Principal = Depends(authenticate),
    ) -> Any:
        m = manager_of(request)
        t = read_tenant(p, tenant)
        check_visible(p, m.get("Workload", t, name), m.catalog, f"Workload/{t}/{name}")
        check_write(p, "Workload", t, name)
        opts = Options(
            body.prepare_timeout, body.command_timeout, body.switch_timeout, body.fail_at, body.second_copy
        )
        mig = await asyncio.to_thread(m.migrations.start, t, name, body.to, p.actor, opts)
        if not body.wait:
            return mig.to_json()
        limit = body.prepare_timeout + 4 * body.command_timeout + body.switch_timeout + 30
        done = await asyncio.to_thread(m.migrations.wait, t, name, mig.id, limit)
        return JSONResponse((done or mig).to_json(), status_code=200)

    @r.get("/v1/workloads/{name}/migration", summary="the workload's current or last migration")
    def migration(
        request: Request, name: str, tenant: str | None = Query(None), p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        m = manager_of(request)
        t = read_tenant(p, tenant)
        check_visible(p, m.get("Workload", t, name), m.catalog, f"Workload/{t}/{name}")
        out = m.migrations.status_of(t, name)
        if out is None:
            raise not_found(f"migration of Workload/{t}/{name}")
        return out

    @r.post("/v1/workloads/{name}/migrate/{mid}/switched", summary="the vNIC has moved (hypervisor)")
    def switched(
        request: Request,
        name: str,
        mid: str,
        tenant: str | None = Query(None),
        p: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        m = manager_of(request)
        t = read_tenant(p, tenant)
        check_visible(p, m.get("Workload", t, name), m.catalog, f"Workload/{t}/{name}")
        check_write(p, "Workload", t, name)
        return m.migrations.switched(t, name, mid).to_json()

    @r.post("/v1/hosts/{host}/commands/{cid}", summary="agent: the result of a feed command")
    def command_result(
        request: Request, host: str, cid: str, body: CommandResult, p: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        m = manager_of(request)
        require(p, Perm.STATUS_WRITE)
        if p.host is not None and p.host != host:
            raise ApiError(
                403, f"this token is scoped to host {p.host}, not {host}", permission="hosts.status.write"
            )
        if not m.migrations.commands.resolve(host, cid, body.model_dump()):
            raise not_found(f"command {cid} of host {host}")
        return {"ok": True}

    return r


__all__ = ["router"]
