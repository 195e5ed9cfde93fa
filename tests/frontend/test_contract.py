"""The studio's client models are pinned to the server's response schemas: every field the client reads exists on
the server with a type the client accepts. A field renamed or retyped on the server fails here, not in a browser."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from app import schemas
from app.routers.keys import KeyOut
from app.routers.sessions import SessionOpened
from frontend import client
from vopd.token_inspection import EvidenceInfo, InspectResult, TokenRecord, TopToken

PAIRS: list[tuple[type[BaseModel], Any]] = [
    (client.Job, schemas.JobOut),
    (client.JobPlan, schemas.JobPlanOut),
    (client.JobPage, schemas.JobPage),
    (client.Metric, schemas.MetricOut),
    (client.MetricPage, schemas.MetricPage),
    (client.LogLine, schemas.LogOut),
    (client.LogPage, schemas.LogPage),
    (client.Artifact, schemas.ArtifactOut),
    (client.Dataset, schemas.DatasetOut),
    (client.Sample, schemas.SampleOut),
    (client.SamplePage, schemas.SamplePage),
    (client.ModelInfo, schemas.ModelOut),
    (client.BenchmarkFolder, schemas.BenchmarkFolderOut),
    (client.BenchmarkFolderList, schemas.BenchmarkFolderList),
    (client.ComponentHealth, schemas.ComponentHealth),
    (client.Health, schemas.HealthOut),
    (client.KeyInfo, KeyOut),
    (client.SessionInfo, SessionOpened),
    (client.TopToken, TopToken),
    (client.TokenRecord, TokenRecord),
    (client.InspectResult, InspectResult),
    (client.Evidence, EvidenceInfo),
]


def _json_types(schema: dict[str, Any], definitions: dict[str, Any]) -> set[str]:
    """The JSON types a property schema admits ("any" for an unconstrained one)."""
    if "$ref" in schema:
        return _json_types(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return set().union(*(_json_types(part, definitions) for part in schema[key]))
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        names = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
        return {names.get(type(value), "any") for value in values}
    kind = schema.get("type")
    if kind is None:
        return {"any"}
    return set(kind) if isinstance(kind, list) else {kind}


def _accepts(client_types: set[str], server_types: set[str]) -> bool:
    if "any" in client_types:
        return True
    widened = client_types | ({"integer"} if "number" in client_types else set())
    return server_types <= widened


@pytest.mark.parametrize(("client_model", "server_model"), PAIRS, ids=[pair[0].__name__ for pair in PAIRS])
def test_every_client_field_exists_on_the_server_with_an_accepted_type(client_model, server_model) -> None:
    client_schema = client_model.model_json_schema(mode="validation")
    server_schema = TypeAdapter(server_model).json_schema(mode="serialization")
    client_definitions = client_schema.get("$defs", {})
    server_definitions = server_schema.get("$defs", {})
    server_properties = server_schema["properties"]
    for name, field_schema in client_schema["properties"].items():
        assert name in server_properties, f"{client_model.__name__}.{name} is not in the server's {server_model}"
        client_types = _json_types(field_schema, client_definitions)
        server_types = _json_types(server_properties[name], server_definitions)
        assert _accepts(client_types, server_types), (name, client_types, server_types)


def test_the_check_catches_a_renamed_field() -> None:
    class Renamed(BaseModel):
        identifier: int

    with pytest.raises(AssertionError, match="identifier"):
        test_every_client_field_exists_on_the_server_with_an_accepted_type(Renamed, schemas.JobOut)

    class Retyped(BaseModel):
        id: str

    with pytest.raises(AssertionError, match="'id'"):
        test_every_client_field_exists_on_the_server_with_an_accepted_type(Retyped, schemas.JobOut)
