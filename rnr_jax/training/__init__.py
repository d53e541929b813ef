"""The model-agnostic sharded training core every stage uses: mesh and sharding rules (``mesh``), AdamW (``optim``), the
train state and jitted step with gradient accumulation (``step``), losses, Orbax checkpoints and the resume order
(``checkpoint``), logs (``metrics_log``) and the one training loop (``loop``)."""
