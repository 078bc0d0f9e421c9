"""Research harness, an optional extra (`pip install -e .[quality]`).

The captioned-shapes dataset, a small latent diffusion model trained on it, an attribute judge, and the
cache-quality evaluation whose records `nirvana calibrate` fits similarity thresholds on. Depends on the product
package `nirvana`; the product never imports it.
"""
