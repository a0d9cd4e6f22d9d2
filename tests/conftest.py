"""Shared setup. Tests run on the CPU with small shapes and 8 simulated devices.

The device count must be set before JAX starts, so it is set here, before any test module
imports jax.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests/numpy_reference.py

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
