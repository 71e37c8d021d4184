"""Makes `tests/` importable for every suite (pytest puts a conftest's directory on sys.path): shared
test helpers that are not part of the package live here, e.g. `labhelpers` (kernel and e2e tests)."""
