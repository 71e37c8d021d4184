"""Per-host feed: NDJSON wire format (`wire`), manager endpoint (`endpoint`), agent client (`client`)."""
