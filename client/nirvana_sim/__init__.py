"""nirvana-sim: a discrete-event simulator of a replica pool, to compare request-placement policies offline.

Pure Python and numpy; it shares its policies with the client balancer (`nirvana_client.routing`).
"""
