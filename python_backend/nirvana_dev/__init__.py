"""Development tools around the product, an optional extra (`pip install -e .[dev]`).

tritonserver from the pytriton wheel as a managed child process (`nirvana serve`, the tests, the demo), the tiny
random-weight model, and the benchmarks. The Docker image never installs or uses it: there Triton is the image's own.
"""
