"""bench.accelerator on the 8 test CPU devices with a tiny BERT: every work runs sharded, FLOPs come from the
config, and the datasheet peaks are found by device kind."""

import dataclasses

import jax
import pytest

from bench import accelerator
from bench.bench_qa import encoder_flops, read_flops


def test_every_work_runs_on_all_devices_with_flops_from_the_config():
  shapes = dataclasses.replace(accelerator.PRESETS["tiny"], steps=1)
  result = accelerator.run(shapes)
  assert result["devices"] == jax.local_device_count() == 8
  rows = {r["work"].split(" (")[0]: r for r in result["rows"]}
  assert list(rows) == ["retriever step", "reader step", "distillation step", "Algorithm 1 step", "corpus encoding"]
  for row in rows.values():
    assert row["examples_per_s"] > 0 and row["of_measured_peak"] > 0
    assert row["mfu"] is None  # no datasheet peak for a CPU
  enc, s = accelerator.ENCODERS["tiny"], shapes
  reading = s.batch * s.m * read_flops(enc, s.reader_len)
  retrieval = s.batch * (encoder_flops(enc, s.question_len) + s.m * encoder_flops(enc, s.passage_len))
  assert rows["reader step"]["tflop_per_step"] * 1e12 == pytest.approx(3 * reading)
  assert rows["Algorithm 1 step"]["tflop_per_step"] * 1e12 == pytest.approx(3 * reading + 4 * retrieval)
  assert rows["corpus encoding"]["examples"] == s.encode_batch
  assert "| retriever step" in accelerator.table(result)


@pytest.mark.parametrize("kind,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.4), ("TPU v5 lite", "bfloat16", 197.0), ("TPU v5", "bfloat16", 459.0),
    ("TPU v4", "bfloat16", 275.0), ("cpu", "bfloat16", None), ("NVIDIA H100 80GB HBM3", "float32", None)])
def test_datasheet_peak_by_device_kind(kind, dtype, tflops):
  peak = accelerator.datasheet_peak(kind, dtype)
  assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
