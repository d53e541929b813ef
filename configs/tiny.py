"""A tiny random-init BERT for tests and smoke runs (seconds on one CPU)."""

from configs import common


def get_config():
  return common.make_tiny(common.base_config())
