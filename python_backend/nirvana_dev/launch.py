"""`nirvana serve` (dev launcher): build (or reuse) the model repository for a checkpoint and run tritonserver on it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from nirvana.config import EngineConfig, load_config
from nirvana.contract.specs import ADAPTERS_MODEL, NIRVANA_MODEL
from nirvana.security.credential import ensure_secret_file, read_secret
from nirvana_dev.install import ServerPorts, find_tritonserver
from nirvana_dev.tritonserver import TritonServer

log = logging.getLogger(__name__)
RESTRICTED_APIS = "model-repository,shared-memory,logging,trace"
ADMIN_KEY_HEADER = "nirvana-admin-key"
ADMIN_KEY_ENV = "NIRVANA_ADMIN_KEY_FILE"


@dataclass(frozen=True)
class ServeOptions:
    cache_dir: Path
    checkpoint: Path | None = None  # default: a tiny random-weight model made under cache_dir
    milvus_uri: str | None = None
    config_file: Path | None = None
    ports: ServerPorts = field(default_factory=ServerPorts)
    host: str = "127.0.0.1"
    repo_dir: Path | None = None  # default: cache_dir/model_repository
    profile: str = "cpu"
    triton_dir: Path | None = None  # an installed tritonserver (e.g. /opt/tritonserver); default: the pytriton wheel's
    ready_timeout_s: float = 300.0
    max_queue_size: int = 64  # requests waiting beyond this are rejected at once (overload → errors, not memory)
    instances: int | None = None  # `nirvana` orchestrator instances; default per profile (8 each)
    queue_delay_us: int | None = None  # UNet dynamic batching delay; default: the repository's (1500 µs)
    log_verbose: int = 0
    cpus: tuple[int, ...] | None = None  # confine the server (and its stubs, milvus-lite) to these cores
    # Where a request's tenant comes from (`SecurityConfig.tenant_source`); default: the config file's, else
    # "client" (development: TENANT as typed)
    tenant_source: str | None = None
    # Hand each request's denoising loop to the `step_scheduler` model (False: each orchestrator runs its own loop,
    # one BLS call of the `unet` model per step: the design before it, kept for comparison)
    step_scheduler: bool = True
    # Key of Triton's restricted APIs (model repository, shared memory, logging, trace); default: generated
    admin_key_file: Path | None = None


def engine_config(options: ServeOptions, checkpoint: Path) -> EngineConfig:
    cache: dict = {"dir": str(options.cache_dir.resolve() / "cache")}
    if options.milvus_uri:
        cache["milvus_uri"] = options.milvus_uri
    data: dict = {"checkpoint": str(checkpoint.resolve()), "cache": cache}
    configured = load_config({"checkpoint": "."}, options.config_file) if options.config_file else None
    named = configured is not None and "tenant_source" in configured.security.model_fields_set
    source = options.tenant_source or (None if named else "client")
    if source is not None:
        data["security"] = {"tenant_source": source}
    config = load_config(data, options.config_file)
    if config.security.tenant_source == "client":
        log.warning("tenant_source='client': TENANT is taken as the client typed it (development only)")
    return config


def prepare(options: ServeOptions) -> tuple[Path, EngineConfig]:
    """Checkpoint → validated engine config → model repository (exported and checked once per checkpoint)."""
    from nirvana_dev.tiny_model import make_tiny_model
    from nirvana_export.repository import write_repository

    checkpoint = options.checkpoint
    if checkpoint is None:
        checkpoint = options.cache_dir / "tiny-model"
        if not (checkpoint / "model_index.json").exists():
            log.warning("no --checkpoint: making a tiny random-weight model in %s", checkpoint)
            make_tiny_model(checkpoint)
    config = engine_config(options, checkpoint)
    repo = options.repo_dir or options.cache_dir / "model_repository"
    write_repository(
        checkpoint,
        repo,
        options.profile,
        config.model_dump(mode="json"),
        max_queue_size=options.max_queue_size,
        instances=options.instances,
        step_scheduler=options.step_scheduler,
        **({} if options.queue_delay_us is None else {"queue_delay_us": options.queue_delay_us}),
    )
    return repo, config


def make_server(options: ServeOptions, repo: Path) -> TritonServer:
    install = find_tritonserver(options.triton_dir) if options.triton_dir else None
    work_dir = options.cache_dir / "triton"
    key_file = options.admin_key_file or ensure_secret_file(work_dir / "admin.key")
    admin_key = read_secret(key_file, "admin key file")
    security = load_config(path=repo / NIRVANA_MODEL / "engine.json").security
    return TritonServer(
        repo,
        options.ports,
        host=options.host,
        work_dir=work_dir,
        env={ADMIN_KEY_ENV: str(Path(key_file).resolve())},  # for a model that must call the restricted APIs
        install=install,
        log_verbose=options.log_verbose,
        ready_timeout_s=options.ready_timeout_s,
        cpus=options.cpus,
        # GPU outputs of python models travel through this pool; without it the backend falls back to a CUDA IPC
        # handle per tensor (slower, and it would distort the overhead the GPU check measures).
        extra_args=(() if options.profile == "cpu" else ("--cuda-memory-pool-byte-size=0:268435456",))
        + model_control_args(repo)
        + security_args(admin_key, security.tenant_header),
    )


def security_args(admin_key: str, tenant_header: str) -> tuple[str, ...]:
    """Triton flags of the security model (docs/security.md): the APIs that change or reveal the server
    (model repository and control, shared memory, logging, trace) answer only requests with the `nirvana-admin-key`
    header (gRPC: `triton-grpc-protocol-nirvana-admin-key`), and the gateway's identity header reaches the models."""
    restricted = f"{RESTRICTED_APIS}:{ADMIN_KEY_HEADER}={admin_key}"
    pattern = f"^{tenant_header}$"
    return (
        f"--grpc-restricted-protocol={restricted}",
        f"--http-restricted-api={restricted}",
        f"--grpc-header-forward-pattern={pattern}",
        f"--http-header-forward-pattern={pattern}",
    )


def model_control_args(repo: Path) -> tuple[str, ...]:
    """The `adapters` model loads a UNet model per LoRA set at run time: that needs explicit model control (every
    model of the repository is still loaded at start). Without it, the repository is fixed (Triton's default).

    Strict readiness counts a set's model that was unloaded (LRU) as a model not ready, and the whole server would
    report not ready for good: with adapters, /v2/health/ready means live and serving (Triton opens its endpoints
    only once every model of the repository has loaded), and a probe that wants more asks /v2/models/nirvana/ready."""
    if not (repo / ADAPTERS_MODEL).is_dir():
        return ()
    return ("--model-control-mode=explicit", "--load-model=*", "--strict-readiness=false")
