"""Typed configuration, parsed once at the edge (CLI, Triton model config) and validated with clear errors.

Nothing below this module reads environment variables or argv: the engine receives these objects.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nirvana.k_choice import DEFAULT_THRESHOLDS, KSelector

GiB = 1024**3


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectionConfig(_Strict):
    """Similarity → K thresholds, stated at `reference_steps` and scaled for other step counts."""

    thresholds: tuple[tuple[float, int], ...] = DEFAULT_THRESHOLDS
    reference_steps: int = Field(50, ge=2)

    @model_validator(mode="after")
    def _valid_table(self) -> SelectionConfig:
        self.selector()  # KSelector validates the table and names the bad pair
        return self

    def selector(self) -> KSelector:
        return KSelector(thresholds=tuple(self.thresholds), reference_steps=self.reference_steps)


class SearchConfig(_Strict):
    """How the request path finds the nearest cached prompt.

    `mirror`: an in-process copy of the vectors, partitioned by (cache key, tenant): exact search for
    partitions up to `exact_max_rows`, faiss IVF above it (Milvus stays the store of record).
    `milvus`: search Milvus directly (for a Milvus server with its own ANN index); it sees admissions only once
    they are flushed (up to `flush_interval_s` later) and costs a round trip per request.
    """

    backend: Literal["mirror", "milvus"] = "mirror"
    exact_max_rows: int = Field(8192, ge=1)
    nprobe: int = Field(48, ge=1)
    tail_max_rows: int = Field(4096, ge=1)


class PredictorConfig(_Strict):
    """One-class SVM that lets clearly novel prompts skip retrieval (NIRVANA §4).

    Off by default: with the in-process search mirror a search costs about as much as a prediction (≈ 0.7 ms vs
    ≈ 0.5 ms at 100k prompts), so skipping saves nothing, while every false skip loses a hit — measured in the
    concurrency test: 24 of 134 exact repeats of cached prompts were predicted novel once 140 unrelated prompts
    had been admitted. Worth enabling only when search is expensive (e.g. a remote Milvus).
    """

    enabled: bool = False
    min_samples: int = Field(64, ge=2)
    refit_growth: float = Field(0.25, gt=0)
    nu: float = Field(0.05, gt=0, le=1)
    max_fit_samples: int = Field(4096, ge=2)
    shadow_rate: float = Field(0.05, ge=0, le=1)


class CacheConfig(_Strict):
    """Approximate cache: Milvus index (store of record), latent blobs, eviction budget."""

    dir: Path = Path(".nirvana-cache")
    milvus_uri: str | None = None  # default: a milvus-lite file under `dir`; or http://host:19530
    # A Milvus server with authentication on: a file holding "user:password" (or a token), e.g. a mounted Secret
    milvus_token_file: Path | None = None
    collection: str = Field("nirvana_cache", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    max_entries: int | None = Field(200_000, ge=1)
    max_bytes: int | None = Field(16 * GiB, ge=1)
    min_entries_per_prompt: int = Field(1, ge=0)
    # How latents are stored (`nirvana.cache.latent_codec`): "q6" quantises them to a third of float16's bytes
    latent_dtype: Literal["float16", "float32", "q6"] = "float16"
    flush_interval_s: float = Field(1.0, gt=0, le=3600)
    # Milvus server only: how often the in-process mirror picks up what other replicas admitted, hit and evicted
    # (0: never; a milvus-lite file has no other writer)
    refresh_interval_s: float = Field(5.0, ge=0, le=3600)
    # Names this process's hit counts in Milvus (one count per replica); default: host name and process id
    replica_id: str | None = Field(None, min_length=1, max_length=128)
    reconnect_interval_s: float = Field(10.0, gt=0, le=3600)  # retry period while Milvus is unreachable
    rpc_timeout_s: float = Field(30.0, gt=0, le=600)  # per Milvus call: a hung Milvus must not hang a flush
    tenant_isolation: bool = True
    # Per-tenant budget (tenant isolation on; None: no cap): an admission over it evicts inside that tenant first,
    # so one tenant's traffic cannot evict the others'. Default: a quarter of the global default budget.
    max_entries_per_tenant: int | None = Field(50_000, ge=1)
    max_bytes_per_tenant: int | None = Field(4 * GiB, ge=1)
    # > 0: pick at random among the best `near_equal_candidates` matches within this margin of the best similarity
    # (on by default: which cached prompt serves a request is then not a deterministic function of the query)
    near_equal_margin: float = Field(0.005, ge=0, le=1)
    near_equal_candidates: int = Field(4, ge=2, le=64)
    resume_history: Literal["reset", "carry"] = "reset"
    # Admissions the `cache` model queues to write after answering (`cache.write_behind`); 0: write before answering
    admission_queue: int = Field(256, ge=0)
    # Reconciliation at open deletes latents no Milvus row refers to; when that would be most of them (Milvus looks
    # empty or foreign: a wrong URI/collection, a fresh server) it refuses and logs an error unless this is set.
    reconcile_allow_mass_delete: bool = False
    # A restart with a snapshot of at least this many prompts is ready once the snapshot fills the mirror and Milvus
    # answers; it then catches up with Milvus (rows written since the snapshot, missing latents, orphans) in the
    # background. Smaller caches catch up before the open returns (a second or so).
    catch_up_in_background_from: int = Field(50_000, ge=0)
    # Hit counts of a replica (replica_id) that counted nothing for this long are folded into one anonymous count
    replica_retire_s: float = Field(7 * 86400.0, gt=0)
    selection: SelectionConfig = SelectionConfig()
    search: SearchConfig = SearchConfig()
    predictor: PredictorConfig = PredictorConfig()

    @field_validator("milvus_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None or value.startswith(("http://", "https://", "tcp://")) or value.endswith(".db"):
            return value
        raise ValueError(f"must be http(s)://host:port for a Milvus server or a path ending in .db, got {value!r}")

    @model_validator(mode="after")
    def _budget_fits_one_request(self) -> CacheConfig:
        admitted = len(self.selection.thresholds)  # latents one generated request may admit
        for name in ("max_entries", "max_entries_per_tenant"):
            value = getattr(self, name)
            if value is not None and value < admitted:
                raise ValueError(f"{name}={value} is smaller than the {admitted} latents one request admits")
        return self

    @property
    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str(self.dir / "milvus.db")

    @property
    def latent_dir(self) -> Path:
        return self.dir / "latents"


class LimitsConfig(_Strict):
    """Request limits enforced before any work is done."""

    max_prompt_chars: int = Field(2000, ge=1)
    max_steps: int = Field(200, ge=1)
    max_guidance: float = Field(50.0, gt=0)
    max_tenant_chars: int = Field(128, ge=1)


class AdaptersConfig(_Strict):
    """LoRA adapters a request may name (`nirvana.addons.lora`): their folder, and how many merged sets stay loaded.

    Every distinct set is a UNet to fuse and load, so what a stream of new sets may cost is bounded: scales are
    rounded to `scale_step` (a multiple of 0.05, so a set's canonical text reads back as itself on every side); at
    most `max_pending_loads` distinct sets wait for or undergo a load (a request for one more is refused at once,
    UNAVAILABLE, naming the limit); a request waits at most `load_wait_s` for its set (then UNAVAILABLE; the load
    goes on and the set serves the next request). A set asked for once is unloaded before sets in steady use, so
    `max_loaded` one above the sets in steady use keeps them loaded through a stream of one-off scales."""

    dir: Path | None = None
    max_loaded: int = Field(2, ge=1)
    scale_step: float = Field(0.05, ge=0.05, le=1.0)
    max_pending_loads: int = Field(4, ge=1)
    load_wait_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _step_on_grid(self) -> AdaptersConfig:
        if abs(self.scale_step / 0.05 - round(self.scale_step / 0.05)) > 1e-9:
            raise ValueError(f"adapters.scale_step={self.scale_step}: must be a multiple of 0.05")
        return self


class ControlNetsConfig(_Strict):
    """ControlNet models a request may name (`nirvana.addons.controlnet`): the folder of their diffusers folders."""

    dir: Path | None = None


TenantSource = Literal["client", "header", "token"]


class SecurityConfig(_Strict):
    """Who may call what (docs/security.md).

    `internal_secret_file`: the deployment's internal credential. Every internal model (`cache`, the sub-models)
    refuses a request that does not carry it; the orchestrators send it with each BLS request. `nirvana export` /
    `nirvana serve` create one beside the repository when none is configured (a Kubernetes Secret in production).

    `tenant_source`: where a request's tenant comes from. "header": the identity header an authenticating gateway
    set (`tenant_header`, forwarded by Triton's `--grpc-header-forward-pattern`/`--http-header-forward-pattern`);
    "token": a signed token `<tenant>.<hex HMAC-SHA256(tenant_token_secret, tenant)>` in that header or in
    `TENANT`; "client": the `TENANT` input as the client typed it (development only: anyone can name any tenant).
    """

    internal_secret_file: Path | None = None
    tenant_source: TenantSource = "header"
    tenant_header: str = Field("x-nirvana-tenant", pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    tenant_token_secret_file: Path | None = None
    # What a miss reports as SIMILARITY: nothing (NaN), so no client can climb toward a cached prompt
    similarity_on_miss: bool = False
    # Per-tenant token bucket on cache lookups (probing defence): sustained rate and burst; 0 turns it off
    tenant_lookups_per_s: float = Field(20.0, ge=0)
    tenant_lookup_burst: int = Field(40, ge=1)

    @model_validator(mode="after")
    def _token_needs_secret(self) -> SecurityConfig:
        if self.tenant_source == "token" and self.tenant_token_secret_file is None:
            raise ValueError("tenant_source='token' needs tenant_token_secret_file")
        return self


class EngineConfig(_Strict):
    """Everything the in-process pipeline needs."""

    checkpoint: Path
    scheduler: str = "auto"
    # "auto": the checkpoint's own text encoder, unless its nirvana.json names another (nirvana.embed)
    embedder: Literal["auto", "minilm", "clip"] = "auto"
    default_steps: int = Field(50, ge=1)
    default_guidance: float = Field(7.5, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    adapters: AdaptersConfig = AdaptersConfig()
    controlnets: ControlNetsConfig = ControlNetsConfig()
    security: SecurityConfig = SecurityConfig()


def load_config(data: dict[str, Any] | None = None, path: str | Path | None = None) -> EngineConfig:
    """Build an EngineConfig from a dict, a JSON/TOML file, or both (dict values win over the file).

    Raises ConfigError whose message lists each bad field with its value.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        merged = _read_file(Path(path))
    if data:
        merged = _deep_merge(merged, data)
    try:
        return EngineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'json'}: {err}"
        ) from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _describe(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        parts.append(f"{field}={item.get('input')!r}: {item['msg']}")
    return "invalid configuration: " + "; ".join(parts)
