"""Test-session set-up: 8 fake CPU devices, so sharded code runs on any machine.

This must take effect before JAX initialises its backends, hence at import time
of this conftest (pytest imports it before any test module).
"""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

# One persistent compilation cache for the suite's processes and its xdist workers: many tests compile the same tiny
# programs, and compiling is most of their time. (Commands run in subprocesses keep their own defaults.)
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "rnr-jax-tests-compile-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)

try:
  jax.config.update("jax_num_cpu_devices", 8)
except (AttributeError, RuntimeError):  # older JAX without the option / backend already up
  pass
