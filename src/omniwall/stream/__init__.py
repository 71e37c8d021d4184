"""The per-host feed's wire format (`wire`): NDJSON lines and the status report, shared by the manager's
endpoint (`omniwall.api.feed`) and the agent (`omniwall.agent.feed`)."""
