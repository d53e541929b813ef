"""Paper-like settings on the shared data (MiniLM initialisation, CPU-sized batches)."""

from configs import common


def get_config():
  return common.base_config()
