"""Pipeline steps: curate, precompute, train, sweep, evaluate, register. Ray and storage live here."""

import os as _os

# Ray reads these when it is imported, so they are set before any module here imports ray:
# together with ``_node_ip_address="127.0.0.1"`` they keep a local Ray 2.60 listening on
# loopback only (it otherwise binds every interface) and stop it writing a token to ~/.ray.
# A value already in the environment wins.
for _key, _value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    _os.environ.setdefault(_key, _value)
