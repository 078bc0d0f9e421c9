"""Add-ons of a request, LoRA adapters and ControlNets, below the runtimes that run them.

``registry``: a request's add-ons resolved once (`AddOns`, and what its cache key holds); ``lora``: adapter files,
sets and merging into a UNet; ``lora_onnx``: the same merge for an exported ONNX UNet; ``variant_pool``: merged
UNet variants loaded on demand and evicted; ``controlnet`` and ``controlnet_graphs``: ControlNet folders and the
residual wiring. The runtimes (`nirvana.runtime`) and the serving models import from here, never the reverse.
"""
