"""The client's copy of the `nirvana_stream` contract matches the committed config, and the CLI's cache line."""

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from nirvana_client.client import INPUT_DATATYPES, OUTPUT_DATATYPES
from nirvana_client.stream import STREAM_INPUT_DATATYPES, STREAM_MODEL, STREAM_OUTPUT_DATATYPES
from nirvana_client.stream_view import cache_line

CONFIG = Path(__file__).resolve().parents[2] / "model_repository" / STREAM_MODEL / "config.pbtxt"
TRITON_TYPES = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_INT32": "INT32", "TYPE_FP32": "FP32"}
TRITON_TYPES |= {"TYPE_UINT8": "UINT8", "TYPE_BOOL": "BOOL"}


def test_client_stream_tables_match_config_pbtxt() -> None:
    config = text_format.Parse(CONFIG.read_text(), mc.ModelConfig())
    inputs = {i.name: TRITON_TYPES[mc.DataType.Name(i.data_type)] for i in config.input}
    outputs = {o.name: TRITON_TYPES[mc.DataType.Name(o.data_type)] for o in config.output}
    assert inputs == INPUT_DATATYPES | STREAM_INPUT_DATATYPES
    assert outputs == OUTPUT_DATATYPES | STREAM_OUTPUT_DATATYPES


def test_cache_line_says_hit_and_k_or_why_it_missed() -> None:
    hit = {"hit": True, "skipped_steps": 10, "similarity": 0.96212, "reason": "hit"}
    assert cache_line(hit) == "hit K=10 sim=0.962"
    assert cache_line({"hit": False, "skipped_steps": 0, "similarity": None, "reason": "bypass"}) == "miss (bypass)"
