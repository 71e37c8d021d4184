"""REST v1 (FastAPI): resources, apply/dry-run, history/rollback, audit, tokens; authn/authz."""
