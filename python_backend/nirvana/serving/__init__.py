"""Code that runs inside Triton's python backend stub: the `nirvana` BLS model, the onnxruntime sub-models, metrics.

Importing any of them imports this package first, so the thread policy is set before torch or onnxruntime loads.
"""

from nirvana.threads import set_thread_policy

set_thread_policy()
