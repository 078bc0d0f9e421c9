"""A hostile client against a server configured as a deployment is (tenant from the gateway's header, restricted
APIs, the internal credential): every case is refused or harmless, the server stays ready and serving after each,
and nothing of one tenant reaches another. Over gRPC and HTTP.

The test plays the authenticating gateway where a case needs one: it sets `x-nirvana-tenant` on each request."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import requests
from tritonclient.utils import InferenceServerException

from nirvana.security.credential import INTERNAL_PARAMETER

pytestmark = pytest.mark.integration

HEADER = "x-nirvana-tenant"
ADMIN_HEADER = {"grpc": "triton-grpc-protocol-nirvana-admin-key", "http": "nirvana-admin-key"}
INTERNAL = ("cache", "unet", "text_encoder", "vae_decoder")
RATE, BURST = 1.0, 4  # lookups per second per tenant: small, so the probe meets the limit within a few requests
VICTIM_PROMPT = "a portrait of the chief executive of acme holding a red umbrella"


@pytest.fixture(scope="module")
def deployment(tiny_checkpoint_dir, tmp_path_factory, start_server):
    cache_dir = tmp_path_factory.mktemp("hostile")
    config = cache_dir / "engine.json"
    security = {"tenant_source": "header", "tenant_lookups_per_s": RATE, "tenant_lookup_burst": BURST}
    config.write_text(json.dumps({"checkpoint": ".", "security": security}))
    state = start_server(tiny_checkpoint_dir, cache_dir, config_file=config)
    state["admin_key"] = (cache_dir / "triton" / "admin.key").read_text().strip()
    yield state
    state["server"].stop()


@pytest.fixture
def client(deployment):
    """(protocol → tritonclient module, client); closed at teardown, after checking the server still serves."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    urls = deployment["server"].urls
    made = {"grpc": (grpcclient, grpcclient.InferenceServerClient(urls.grpc))}
    made["http"] = (httpclient, httpclient.InferenceServerClient(urls.http))
    yield made
    _, triton = made["grpc"]
    assert triton.is_server_ready() and all(triton.is_model_ready(m) for m in ("nirvana", *INTERNAL))
    for _, triton in made.values():
        triton.close()


def _inputs(tc, values: dict[str, tuple[np.ndarray, str]]) -> list:
    tensors = []
    for name, (array, datatype) in values.items():
        tensors.append(tc.InferInput(name, list(array.shape), datatype))
        tensors[-1].set_data_from_numpy(array)
    return tensors


def _generate(client, protocol: str, prompt: str, tenant: str | None, **extra):
    """One `nirvana` request as the gateway passes it on: `HEADER: tenant` (None: no header), 6 steps."""
    tc, triton = client[protocol]
    values = {
        "PROMPT": (np.array([prompt.encode()], np.object_), "BYTES"),
        "NUM_INFERENCE_STEPS": (np.array([6], np.int32), "INT32"),
        "SEED": (np.array([extra.pop("seed", 1)], np.int64), "INT64"),
    }
    for name, value in extra.pop("inputs", {}).items():
        values[name] = value
    headers = None if tenant is None else {HEADER: tenant}
    return triton.infer("nirvana", _inputs(tc, values), headers=headers, **extra)


def _refused(call, *needles: str) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    message = err.value.message()
    for needle in needles:
        assert needle in message, message
    return message


def _metric(deployment, name: str) -> float:
    text = requests.get(deployment["server"].urls.metrics, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# -- 1. internal models refuse outside callers ------------------------------------------------------------
def _zeros_for(tc, triton, model: str) -> list:
    """Well-formed inputs of `model` (from its metadata), so that only the credential can be what refuses it."""
    metadata = triton.get_model_metadata(model)
    declared = (
        metadata["inputs"]
        if isinstance(metadata, dict)
        else [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.inputs]
    )
    values = {}
    for tensor in declared:
        shape = [1 if int(d) < 0 else int(d) for d in tensor["shape"]]
        if tensor["datatype"] == "BYTES":
            values[tensor["name"]] = (np.full(shape, b"{}", np.object_), "BYTES")
        else:
            dtype = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32}[tensor["datatype"]]
            values[tensor["name"]] = (np.zeros(shape, dtype), tensor["datatype"])
    if model == "cache":  # a forged lookup that would read any tenant's nearest row, were it served
        forged = {"op": "lookup", "cache_key": "0" * 32, "tenant": "victim", "num_steps": 6}
        values["REQUEST"] = (np.array([json.dumps(forged).encode()], np.object_), "BYTES")
        values["VECTOR"] = (np.full([values["VECTOR"][0].size or 1], 1000.0, np.float32), "FP32")
    return _inputs(tc, values)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", INTERNAL)
@pytest.mark.parametrize("credential", [None, "0123456789abcdef0123456789abcdef"], ids=["none", "guessed"])
def test_internal_models_refuse_direct_calls(deployment, client, protocol, model, credential) -> None:
    tc, triton = client[protocol]
    parameters = None if credential is None else {INTERNAL_PARAMETER: credential}
    message = _refused(lambda: triton.infer(model, _zeros_for(tc, triton, model), parameters=parameters))
    assert "not served to clients" in message and "nirvana" in message


# -- 2. the tenant is the gateway's identity, never what the client typed ---------------------------------
SPOOFS = [
    ("no-header", None, {}, [HEADER, "missing"]),
    ("empty-header", "", {}, [HEADER]),
    ("reserved-header", "*", {}, [HEADER, "reserved"]),
    ("typed-other-tenant", "mallory", {"TENANT": (np.array([b"victim"], np.object_), "BYTES")}, ["TENANT='victim'"]),
    ("parameter-shadows-header", "mallory", {"parameters": {HEADER: "victim"}}, [HEADER, "more than once"]),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("tenant", "extra", "needles"), [s[1:] for s in SPOOFS], ids=[s[0] for s in SPOOFS])
def test_tenant_spoofing_is_refused(client, protocol, tenant, extra, needles) -> None:
    extra = dict(extra)
    inputs = {k: extra.pop(k) for k in [k for k in extra if k.isupper()]}
    _refused(lambda: _generate(client, protocol, "a lighthouse at dusk", tenant, inputs=inputs, **extra), *needles)


def test_the_identity_header_and_a_matching_tenant_input_are_served(client) -> None:
    same = {"TENANT": (np.array([b"carol"], np.object_), "BYTES")}
    image = _generate(client, "grpc", "a lighthouse at dusk", "carol", inputs=same).as_numpy("IMAGE")
    assert image.shape == (64, 64, 3) and image.std() > 0


# -- 3. Triton's APIs that change or reveal the server need the admin key --------------------------------
RESTRICTED = {
    "repository-index": lambda t: t.get_model_repository_index(),
    "load-model": lambda t: t.load_model("unet"),
    "unload-model": lambda t: t.unload_model("unet"),
    "log-settings": lambda t: t.get_log_settings(),
    "update-log-settings": lambda t: t.update_log_settings({"log_verbose_level": 3}),
    "trace-settings": lambda t: t.get_trace_settings(),
    "shared-memory-status": lambda t: t.get_system_shared_memory_status(),
    "register-shared-memory": lambda t: t.register_system_shared_memory("steal", "/nirvana-shm", 1024),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("call", RESTRICTED.values(), ids=RESTRICTED.keys())
def test_restricted_apis_refuse_without_the_admin_key(client, protocol, call) -> None:
    _, triton = client[protocol]
    message = _refused(lambda: call(triton))
    assert "restricted" in message
    assert all(triton.is_model_ready(m) for m in ("nirvana", "unet"))  # nothing was unloaded


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_admin_key_opens_the_repository_api(deployment, client, protocol) -> None:
    _, triton = client[protocol]
    index = triton.get_model_repository_index(headers={ADMIN_HEADER[protocol]: deployment["admin_key"]})
    names = {m["name"] for m in index} if isinstance(index, list) else {m.name for m in index.models}
    assert {"nirvana", "cache", "unet"} <= names


# -- 4. isolation, side channels and the prompt-stealing probe -------------------------------------------
PROBE = [
    VICTIM_PROMPT,  # the exact prompt first: a cross-tenant exact repeat
    "a portrait of the chief executive of acme holding an umbrella",
    VICTIM_PROMPT.replace("red", "blue"),
    "a portrait of the chief executive holding a red umbrella",
    *[VICTIM_PROMPT] * 6,  # past the burst: the rate limit answers
]


def _probe(client, tenant: str) -> tuple[list[tuple], list[str]]:
    """The probe's answers as the attacker reads them (hit, skipped steps, similarity, image), and the refusals."""
    answered, limited = [], []
    for query in PROBE:
        try:
            result = _generate(client, "http", query, tenant, seed=9)
        except InferenceServerException as err:
            limited.append(err.message())
            continue
        similarity = float(result.as_numpy("SIMILARITY")[0])
        hit, skipped = bool(result.as_numpy("CACHE_HIT")[0]), int(result.as_numpy("SKIPPED_STEPS")[0])
        answered.append((hit, skipped, None if math.isnan(similarity) else similarity, result.as_numpy("IMAGE")))
    return answered, limited


def test_prompt_stealing_probe_learns_nothing_across_tenants_and_is_rate_limited(deployment, client) -> None:
    """The USENIX Security '26 probe: an attacker tenant climbs toward a victim's cached prompt through near
    queries, reading CACHE_HIT, SKIPPED_STEPS, SIMILARITY and the image. Differential: a control tenant runs the same
    probe before the victim's prompt is cached, the attacker after; if the attacker learnt anything of the victim,
    some answer would differ. Both are told to slow down after their burst."""
    control, control_limited = _probe(client, "control")
    victim = _generate(client, "grpc", VICTIM_PROMPT, "victim", seed=7)
    assert not victim.as_numpy("CACHE_HIT")[0]
    time.sleep(2.0)  # the admission is written behind the response
    again = _generate(client, "grpc", VICTIM_PROMPT, "victim", seed=7)
    assert again.as_numpy("CACHE_HIT")[0], "the victim's own repeat must hit (else the probe proves nothing)"
    attacker, limited = _probe(client, "mallory")
    assert not attacker[0][0] and attacker[0][2] is None  # the exact prompt: a miss, and no similarity on a miss
    assert len(attacker) >= BURST - 1 and limited and control_limited, (len(attacker), limited)
    for seen, baseline in zip(attacker, control, strict=False):
        assert seen[:3] == baseline[:3]
        np.testing.assert_array_equal(seen[3], baseline[3])
    assert all("retry in" in message for message in limited)
    assert _metric(deployment, "nirvana_rate_limited_total") >= len(limited) + len(control_limited)
    victim_again = _generate(client, "grpc", VICTIM_PROMPT, "victim", seed=7)  # other tenants are not limited
    assert victim_again.as_numpy("CACHE_HIT")[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_miss_reports_no_similarity(client, protocol) -> None:
    result = _generate(client, protocol, f"a quiet harbour seen over {protocol}", f"dora-{protocol}")
    assert not result.as_numpy("CACHE_HIT")[0] and math.isnan(float(result.as_numpy("SIMILARITY")[0]))


# -- 5. oversized, malformed and non-finite input to the front door --------------------------------------
FLOAT_INPUTS = [("GUIDANCE_SCALE", v) for v in (np.nan, np.inf)] + [("CONTROLNET_SCALE", v) for v in (np.nan, -np.inf)]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("name", "value"), FLOAT_INPUTS, ids=[f"{n}-{v}" for n, v in FLOAT_INPUTS])
def test_non_finite_floats_are_refused_by_name(client, protocol, name, value) -> None:
    inputs = {name: (np.array([value], np.float32), "FP32")}
    _refused(lambda: _generate(client, protocol, "a red fox", "erin", inputs=inputs), name)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_megabyte_prompt_is_refused_before_decoding(client, protocol) -> None:
    inputs = {"PROMPT": (np.array([b"\xff" * 1_000_000], np.object_), "BYTES")}  # not even UTF-8
    _refused(lambda: _generate(client, protocol, "x", "erin", inputs=inputs), "PROMPT", "1000000 bytes")


def test_refusals_are_counted_and_the_server_still_serves(deployment, client) -> None:
    assert _metric(deployment, "nirvana_internal_refused_total") >= 1  # the cache model's own count
    image = _generate(client, "http", "a green heron by a pond", "frank").as_numpy("IMAGE")
    assert image.shape == (64, 64, 3)
