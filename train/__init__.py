"""Stage entry points: ``python -m train.<stage>`` (``train.prepare`` builds the prepared dataset)."""
