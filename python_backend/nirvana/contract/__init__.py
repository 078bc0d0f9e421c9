"""The tensor contract between clients, the Triton models and the exporters, in one place.

``specs``: every served model's inputs, outputs and names (the source each `config.pbtxt` is rendered from);
``tensors``: the sub-models' tensor names, shapes and dtypes; ``controlnet``: a ControlNet's inputs and the UNet's
residual inputs; ``stream``: the streaming model's events.
"""
