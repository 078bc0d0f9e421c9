"""The `nirvana` command line: the composition root that puts the engine, export and the dev tools together.

It sits above every other package (nothing imports it but the research CLI, for shared options), so the engine,
export and the dev launcher depend on each other in one direction only.
"""
