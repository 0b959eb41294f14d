"""Envoy as preflight's data plane: its configuration, its process and its access-log receiver.

    config.py     pure: the bootstrap, and the RDS/CDS resources for a set of routes
    xds_files.py  the xDS directory Envoy watches: one route file per model, atomic rewrites
    process.py    find the binary, start Envoy on a bootstrap, wait for /ready, stop it
    receiver.py   gRPC access-log service: Envoy's entries -> request records -> the bus
    app.py        the receiver as a service (`serve(settings)`, `python -m services.envoy.app`)

The traffic router that writes weights into Envoy is services/traffic/envoy.py.
"""
