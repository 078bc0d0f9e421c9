"""nirvana: approximate caching of diffusion latents (NIRVANA, NSDI'24), served through Triton."""

__version__ = "0.1.0"
