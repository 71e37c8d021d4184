"""What a lab is built from: a Catalog, resource objects, or resource files (YAML), validated as a whole."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omniwall.model.catalog import Catalog
from omniwall.model.loader import load_files, load_text
from omniwall.model.resources import dump
from omniwall.model.validate import validate

Source = Catalog | str | Path | Iterable[Any]


def load_catalog(source: Source) -> tuple[Catalog, list[str]]:
    """(validated catalog, files read). `source`: a Catalog (taken as is), one path or YAML text, or an
    iterable of paths or of resource objects. Raises `omniwall.model.errors.ValidationError`."""
    if isinstance(source, Catalog):
        return source, []
    if isinstance(source, str) and "\n" in source:
        return validate(load_text(source, "<lab>")), []
    items = [source] if isinstance(source, str | Path) else list(source)
    if all(isinstance(i, str | Path) for i in items):
        files = [str(i) for i in items]
        return validate(load_files(files)), files
    return validate(items), []


def dump_catalog(catalog: Catalog) -> list[dict[str, Any]]:
    return [dump(r) for r in catalog]


def catalog_from_dump(data: list[dict[str, Any]]) -> Catalog:
    from pydantic import TypeAdapter

    from omniwall.model.resources import Resource

    adapter: TypeAdapter[Any] = TypeAdapter(Resource)
    return Catalog.of(adapter.validate_python(d) for d in data)
