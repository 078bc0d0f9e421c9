"""nirvana-client: talk to a nirvana-triton deployment with the standard Triton clients (no engine import)."""

from nirvana_client.client import GenerateOptions, GenerateResult, NirvanaClient

__all__ = ["GenerateOptions", "GenerateResult", "NirvanaClient"]
