"""The Milvus collection behind `index.MilvusIndex`: its fields, how it is created or checked at open, and filter
expressions over it. Apart from the index so that the shape of a row in Milvus (what other tools query) is read in
one place; the rows' meaning is in `records`.
"""

from __future__ import annotations

from pymilvus import DataType, MilvusClient

from nirvana.cache.validation import MAX_PROMPT_BYTES, MAX_TENANT_BYTES

SCALAR_FIELDS = ["id", "prompt", "cache_key", "tenant", "entries", "created"]


def ensure_collection(client: MilvusClient, collection: str, dim: int, uri: str) -> None:
    """Load `collection`, creating it if absent; ValueError if it holds vectors of another dimension."""
    if client.has_collection(collection):
        fields = client.describe_collection(collection)["fields"]
        dims = [f["params"].get("dim") for f in fields if f["name"] == "vector"]
        if dims and int(dims[0]) != dim:
            raise ValueError(
                f"collection {collection!r} at {uri!r} holds {dims[0]}-dim vectors but the embedder "
                f"gives {dim}: use another cache dir/collection or the matching embedder"
            )
        client.load_collection(collection)
        return
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("prompt", DataType.VARCHAR, max_length=MAX_PROMPT_BYTES)
    schema.add_field("cache_key", DataType.VARCHAR, max_length=64)
    schema.add_field("tenant", DataType.VARCHAR, max_length=MAX_TENANT_BYTES)
    schema.add_field("entries", DataType.JSON)  # JSON, not ARRAY: milvus-lite 2.5 fails on empty ARRAY results
    schema.add_field("hits", DataType.INT64)
    schema.add_field("score", DataType.DOUBLE)
    schema.add_field("last_access", DataType.DOUBLE)
    schema.add_field("created", DataType.DOUBLE)
    index = client.prepare_index_params()
    index.add_index(
        "vector", index_type="FLAT", metric_type="IP"
    )  # exact; milvus-lite loses growing raw data with AUTOINDEX
    client.create_collection(collection, schema=schema, index_params=index)


def partition_filter(cache_key: str, tenant: str | None) -> str:
    """The filter expression selecting one cache key's rows (and one tenant partition's, if given)."""
    return f"cache_key == {_quote(cache_key)}" + ("" if tenant is None else f" and tenant == {_quote(tenant)}")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
