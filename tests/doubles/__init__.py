"""Test doubles of the feed's two ends, for tests and benchmarks only (not shipped in the package):
`fake_manager.FakeManager` (a manager that speaks only the feed/status wire format) and
`feed_client.FeedClient` (a blocking client of a real manager's feed). Importable as `doubles.*`:
pytest puts `tests/` on sys.path (pyproject.toml `pythonpath`); a benchmark inserts it itself."""
