"""The transformer (DiT, flow-matching) families: SD 3.x and FLUX.1.

`nirvana.checkpoint.dit` reads their folders; here `conditioning` turns a prompt into what their transformer attends
to (and the pooled vector the cache retrieves by), and `modules` calls their torch modules as their pipelines do
(`nirvana.runtime.torch_dit` runs them in process). The denoising loop, the cache and the request path are the UNet
families' own (`nirvana.denoise`, `nirvana.pipeline`): the transformer stands where the UNet stands, with the
flow-matching Euler scheduler (`nirvana.schedulers.FlowMatchSchedule`).
"""
