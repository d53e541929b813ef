"""Model-agnostic sharded training core shared by every stage.

* ``mesh``        device mesh, regex sharding rules, global batches, multi-host start-up.
* ``optim``       AdamW with warmup/decay, clipping, frozen subtrees.
* ``step``        ``TrainState`` and the jitted train step (gradient accumulation).
* ``losses``      in-batch-negative NLL, cross-entropy and KL helpers.
* ``checkpoint``  Orbax checkpoints and the resume order.
* ``metrics_log`` logs and ``metrics.jsonl``; stops on a non-finite loss.
* ``loop``        ``train_loop`` and the resumable ``EpochIterator``.

A stage supplies ``init_fn(rng) -> params`` and ``loss_fn(params, batch, rng) ->
(loss, aux_metrics)`` and calls ``loop.train_loop``.
"""
