"""One `execute` of a python sub-model under dynamic batching: N requests in, one merged run, N responses out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nirvana.runtime.batching import run_merged
from nirvana.serving.internal import InternalGate


def execute_merged(
    pb: Any,
    requests: list,
    names: tuple[Sequence[str], Sequence[str]],
    run: Callable[[dict[str, Any]], dict[str, Any]],
    convert: tuple[Callable[[Any], Any], Callable[[str, Any], Any]],
    invalid: tuple[type[Exception], ...],
    gate: InternalGate,
) -> list:
    """Answer `requests` in order. `names` = (inputs, outputs); `convert` = (pb input tensor → array, (name, array)
    → pb output tensor); an exception of an `invalid` type is the client's INVALID_ARG, any other INTERNAL. A request
    the `gate` refuses is answered with its refusal and never joins the run."""
    inputs, outputs = names
    read, write = convert
    refusals = [gate.refusal(request) for request in requests]
    feeds = []
    for request, refusal in zip(requests, refusals, strict=True):
        if refusal is None:
            tensors = {name: pb.get_input_tensor_by_name(request, name) for name in inputs}
            feeds.append({name: read(tensor) for name, tensor in tensors.items() if tensor is not None})
    answers = iter(run_merged(run, feeds))
    responses = []
    for refusal in refusals:
        answer = refusal if refusal is not None else next(answers)
        if refusal is not None:
            responses.append(refusal)
        elif isinstance(answer, Exception):
            code = pb.TritonError.INVALID_ARG if isinstance(answer, invalid) else pb.TritonError.INTERNAL
            responses.append(pb.InferenceResponse(error=pb.TritonError(str(answer), code)))
        else:
            responses.append(pb.InferenceResponse([write(name, answer[name]) for name in outputs]))
    return responses
