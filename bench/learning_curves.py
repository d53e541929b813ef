r"""Learning curves of a finished pipeline's trained stages, on held-out training questions.

  python -m bench.learning_curves --workdir runs/mini --out runs/mini_curves \
      [--config configs/mini.py] [--stages teacher_retriever,filter,distill,finetune] [--every distill=25] \
      [--override distill:train.num_steps=100 ...] [--record]

Each stage is trained again with its pipeline config, inputs and seed into ``OUT/<stage>``, evaluated at step 0
(its starting parameters) and every ``--every`` steps on the first ``--questions`` questions of the held-out splits.
Retrieval stages search a passage subset instead of the whole corpus, so that an evaluation encodes a few thousand
passages rather than every kept one: the kept passages among those questions' gold passages and the teacher
retriever's top ``--top_k``, plus ``--distractors`` random kept passages (``OUT/curve_subset.npz``). Top-k and EM over
the subset are higher than over the corpus; what sizes a stage is where its curve flattens, so ``--override``
runs a stage past its pipeline schedule (``STAGE:KEY=VALUE``, applied last). A rerun resumes, and skips the stages
that finished with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import numpy as np
from absl import logging

from bench import report
from rnr_jax import passage_filter
from rnr_jax.config import apply_override, load_config
from rnr_jax.io import atomic_write_json
from train import pipeline

# Every step count of a stage's curve: one evaluation per this many steps (--every overrides).
EVERY = {"teacher_retriever": 20, "student_retriever": 20, "teacher_reader": 400, "filter": 25, "distill": 25,
         "finetune": 10}
# What each stage's table reads, under its heading.
READS = {**dict.fromkeys(("teacher_retriever", "student_retriever"),
                        "top-k answer accuracy of the held-out splits over the subset."),
         "teacher_reader": "EM on the gold passage alone, among hard negatives with the ranker choosing, and on the "
                           "teacher retriever's top passage.",
         "filter": "hit_val: the share of J+val's answer passages (from held-out questions) among the filter's top "
                   "|J+val| scores of J+val and J-val.",
         **dict.fromkeys(("distill", "finetune"), "{split}: top-k answer accuracy over the subset, and EM reading "
                                                  "the top 1 and top 5 retrieved passages.")}
# Columns of each stage's table: its eval.jsonl metrics (prefix "<split>/" expanded to every held-out split).
COLUMNS = {**dict.fromkeys(("teacher_retriever", "student_retriever"),
                          ("{split}/top1", "{split}/top5", "{split}/top20")),
           "teacher_reader": ("em_gold_alone", "em_gold_ranked", "em_open"),
           "filter": ("hit_val",),
           **dict.fromkeys(("distill", "finetune"), ("top1", "top5", "top20", "em_open@1", "em_open@5"))}


def curve_subset(p: pipeline.Pipeline, questions: int, top_k: int, distractors: int, seed: int = 0) -> np.ndarray:
  """Sorted passage ids (module docstring): kept passages that hold an answer of the first ``questions`` held-out
  questions' gold articles or rank in the teacher's top ``top_k`` for them, plus ``distractors`` random kept ones."""
  kept = p.subset_pids()
  keep = np.zeros(p.data.num_passages, bool)
  keep[kept] = True
  chosen = np.zeros(p.data.num_passages, bool)
  with np.load(p.path("filter", "candidates.npz")) as ranked:  # the teacher's candidates, kept passages only
    for split in p.held_out_splits():
      top = ranked[split][:questions, :top_k]
      chosen[top[top >= 0]] = True
      gold_of = p.data.candidates(split).gold
      for i in range(min(questions, len(gold_of))):
        gold = np.asarray(gold_of[i], np.int64)
        chosen[gold[keep[gold]]] = True
  rest = np.flatnonzero(keep & ~chosen)
  rng = np.random.default_rng(seed)
  chosen[rng.choice(rest, min(distractors, len(rest)), replace=False)] = True
  return np.flatnonzero(chosen)


def stage_overrides(stage: str, p: pipeline.Pipeline, subset: str, questions: int, every: int) -> dict[str, Any]:
  """What a curve run changes in the stage's pipeline config: evaluation only."""
  out: dict[str, Any] = {"train.eval_every": every, "train.eval_at_start": True}
  if stage.endswith("_retriever"):
    out.update({"retriever.subset": subset, "retriever.eval_splits": tuple(p.held_out_splits()),
                "retriever.max_eval_questions": questions, "retriever.save_embeddings": False})
  elif stage == "teacher_reader":
    out["reader.eval_questions"] = questions
  elif stage in ("distill", "finetune"):
    out.update({"pool.subset": subset, "eval.questions": questions})
  return out


def under_workdir(tree: Any, workdir: str) -> Any:
  """``tree`` (a config as plain data) with paths inside ``workdir`` written as ``{workdir}/...``."""
  if isinstance(tree, dict):
    return {k: under_workdir(v, workdir) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [under_workdir(v, workdir) for v in tree]
  if isinstance(tree, str) and (tree == workdir or tree.startswith(workdir + os.sep)):
    return "{workdir}" + tree[len(workdir):]
  return tree


def curve_table(stage: str, evals: list[dict[str, Any]], batch_size: int, splits: list[str]) -> str:
  columns = [c.format(split=s) for c in COLUMNS[stage] for s in (splits if "{split}" in c else [None])]
  rows = [[f"{e['step']:,}", f"{e['step'] * batch_size:,}",
           *(f"{100 * e[c]:.1f}" if c in e else "" for c in columns)] for e in evals]
  return report.markdown_table(["step", "questions seen" if stage != "filter" else "passages seen", *columns], rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a finished pipeline's work directory")
  parser.add_argument("--out", required=True, help="where the curve runs go (one directory per stage)")
  parser.add_argument("--config", default=os.path.join(pipeline.ROOT, "configs", "mini.py"),
                      help="the pipeline config the work directory was run with")
  parser.add_argument("--stages", default="teacher_retriever,filter,distill,finetune")
  parser.add_argument("--every", default="", help="STAGE=N,...: steps between evaluations (defaults: EVERY)")
  parser.add_argument("--questions", type=int, default=300, help="held-out questions per evaluation and split")
  parser.add_argument("--top_k", type=int, default=10)
  parser.add_argument("--distractors", type=int, default=1000)
  parser.add_argument("--override", action="append", default=[],
                      help="STAGE:KEY=VALUE, repeatable: a stage config setting of the curve runs (e.g. a longer "
                           "schedule, distill:train.num_steps=100)")
  parser.add_argument("--record", action="store_true", help="write the tables to docs/pipeline.md")
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  stages = [s for s in args.stages.split(",") if s]
  if bad := sorted(set(stages) - set(pipeline.TRAINERS)):
    parser.error(f"unknown stage(s) {bad}; trained stages: {sorted(pipeline.TRAINERS)}")
  every = dict(EVERY)
  for item in filter(None, args.every.split(",")):
    stage, _, n = item.partition("=")
    if stage not in pipeline.TRAINERS or not n.isdigit() or int(n) < 1:
      parser.error(f"--every {item!r}: expected STAGE=N with a trained stage and N >= 1")
    every[stage] = int(n)
  extra: dict[str, dict[str, str]] = {}
  for item in args.override:
    stage, _, setting = item.partition(":")
    key, eq, value = setting.partition("=")
    if stage not in pipeline.TRAINERS or not key or not eq:
      parser.error(f"--override {item!r}: expected STAGE:KEY=VALUE with a trained stage")
    extra.setdefault(stage, {})[key] = value

  p = pipeline.Pipeline(load_config(args.config), args.workdir)
  if missing := [s for s in stages if p.finished(s) is None]:
    raise SystemExit(f"{args.workdir}: stage(s) {missing} have not finished; run the pipeline first")
  if not p.held_out_splits():
    raise SystemExit(f"{args.workdir}: no held-out splits (prepare.holdout = 0) to evaluate on")
  os.makedirs(args.out, exist_ok=True)
  subset_path = os.path.join(args.out, "curve_subset.npz")
  pids = curve_subset(p, args.questions, args.top_k, args.distractors)
  passage_filter.save_subset(subset_path, pids, np.zeros(len(pids), np.float32), p.data.num_passages)
  logging.info("Curve subset: %d passages.", len(pids))

  tables = []
  for stage in stages:
    config_fn, trainer = pipeline.TRAINERS[stage]
    cfg = config_fn(p)
    overrides = stage_overrides(stage, p, subset_path, args.questions, every[stage])
    for key, value in overrides.items():
      apply_override(cfg, key, repr(value))
    for key, value in extra.get(stage, {}).items():
      apply_override(cfg, key, value)
    done = os.path.join(args.out, f"{stage}.json")
    # Paths into the work directory are stored relative to it: the same pipeline reached by another path (moved,
    # symlinked) reads its finished curves back rather than training them again.
    record = {"config": under_workdir(cfg.to_dict(), p.workdir), "subset": pids.tolist()}
    previous = None
    if os.path.exists(done):
      with open(done, encoding="utf-8") as f:
        previous = json.load(f)
    if previous is None or {k: previous.get(k) for k in record} != json.loads(json.dumps(record)):
      if previous is not None:  # finished with other settings: its checkpoints must not be resumed
        shutil.rmtree(os.path.join(args.out, stage), ignore_errors=True)
      trainer(cfg, os.path.join(args.out, stage))  # else finished earlier with these settings: its evals stand
    evals = pipeline.read_evals(os.path.join(args.out, stage, "eval.jsonl"))
    atomic_write_json(done, {**record, "evals": evals})
    table = curve_table(stage, evals, int(cfg.train.batch_size), p.held_out_splits())
    tables.append(f"### {stage}\n\n{READS[stage].format(split=p.select_split())}\n\n{table}")
    print(f"{stage}\n{table}\n", flush=True)
  if args.record:
    report.record("pipeline", "Learning curves", "\n\n".join(tables),
                  f"Percentages on the first {args.questions} questions of each held-out split (one standard error: "
                  f"about {100 * np.sqrt(0.25 * 0.75 / args.questions):.1f} points at 25% EM); retrieval over a "
                  f"subset of {len(pids):,} kept passages (those questions' gold passages and the teacher's top "
                  f"{args.top_k}, plus {args.distractors:,} random kept passages). Step 0 is the stage's starting "
                  "point: pretrained MiniLM for the teacher retriever and the filter, the teacher reader for "
                  "distillation, the distilled student for finetuning.")


if __name__ == "__main__":
  main()
