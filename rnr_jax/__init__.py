"""rnr-jax: minimal retrieve-and-read open-domain QA in JAX/Flax (the library; ``train/`` and ``infer/`` hold the
entry points, docs/design.md the design). ``from rnr_jax import QASystem`` is the inference API."""

__version__ = "0.1.0"
__all__ = ["QASystem"]


def __getattr__(name: str):
  if name == "QASystem":  # imported on first use, so `import rnr_jax.<module>` stays light
    from rnr_jax.qa_system import QASystem  # pylint: disable=import-outside-toplevel
    return QASystem
  raise AttributeError(f"module 'rnr_jax' has no attribute {name!r}")
