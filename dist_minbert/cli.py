"""`dist-minbert train|simcse|evaluate|predict|export|prepare|corpus|scale|bench|table|analyse` — the user's entry
points."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from dist_minbert.config_loader import ConfigError


def _task_files(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep or not task or not path:
            raise ConfigError(f"{pair!r}: expected TASK=FILE, e.g. sst=data/ids-sst-dev.csv")
        out.append((task, path))
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from dist_minbert.config import load_config
    from launch.ray_run import run_training

    _set_verbose(args.verbose)
    cfg = load_config(args.config, _with_resume(args.overrides, args.resume))
    summary = run_training(cfg)
    print_summary(summary)
    return 0


def cmd_simcse(args: argparse.Namespace) -> int:
    from dist_minbert.config import load_simcse_config
    from launch.ray_run import run_simcse

    _set_verbose(args.verbose)
    cfg = load_simcse_config(args.config, _with_resume(args.overrides, args.resume))
    summary = run_simcse(cfg)
    print_summary(summary)
    print(f"encoder      {summary['paths']['encoder']}  (a model.checkpoint for `dist-minbert train`)")
    return 0


def _with_resume(overrides: list[str], resume: str | None) -> list[str]:
    """--resume as the checkpoint.resume override: "latest", a URL, or the path made absolute (workers run elsewhere)."""
    if not resume:
        return list(overrides)
    resume = resume if resume == "latest" or "://" in resume else str(Path(resume).resolve())
    return [*overrides, f"checkpoint.resume={json.dumps(resume)}"]  # quoted: any path stays one YAML string


def _set_verbose(verbose: bool) -> None:
    """--verbose as the environment variable the launcher and its workers read (launch/output.py)."""
    from launch.output import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"


def print_summary(summary: dict) -> None:
    print("\n== dist-minbert run summary ==")
    print(f"workers {summary['num_workers']}, steps {summary['steps']}, "
          f"{summary['samples_per_s']:.1f} samples/s, wall {summary['wall_s']:.0f}s")
    for label in ("initial_dev", "best_dev"):
        metrics = ", ".join(f"{t} {m} {v:.3f}" for t, ms in (summary.get(label) or {}).items()
                            for m, v in ms.items() if m != "spearman")
        print(f"{label:12s} {metrics}")
    if summary.get("best_score") is not None:
        print(f"best score   {summary['best_score']:.4f}")
    paths = summary["paths"]
    print(f"tensorboard  {paths['tensorboard']}\ncheckpoint   {paths['checkpoint']}")
    for name, path in paths["predictions"].items():
        print(f"predictions  {path}")
    print(f"summary      {Path(paths['output_dir']) / 'summary.json'}")


def _load_quietly(checkpoint: str, heads: bool = False):
    """The checkpoint's model; DeepSpeed's import-time notices go to stderr so stdout stays machine-readable.
    `heads`: the caller needs task heads, which a SimCSE run does not have."""
    from dist_minbert.engine.checkpoint_io import load_trained_model

    with contextlib.redirect_stdout(sys.stderr):
        cfg, model = load_trained_model(checkpoint)
    if heads and not hasattr(cfg, "tasks"):
        raise ConfigError(f"{checkpoint}: a SimCSE run has no task heads; allowed: `export` it, or fine-tune its "
                          f"encoder/ folder with `train` (model.checkpoint)")
    return cfg, model


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dist_minbert.engine.inference import evaluate_file

    cfg, model = _load_quietly(args.checkpoint, heads=True)
    files = _task_files(args.files) or [(t, cfg.data.resolve(s.dev)) for t, s in cfg.tasks.items() if s.dev]
    results = {task: evaluate_file(model, cfg, task, path, labelled=True)[2] for task, path in files}
    print(json.dumps(results, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dist_minbert.engine.inference import predict_files

    cfg, model = _load_quietly(args.checkpoint, heads=True)
    for task, target in predict_files(model, cfg, _task_files(args.files), args.out):
        print(f"{task}: predictions → {target}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dist_minbert.model.export import export_hf
    from dist_minbert.model.export_sentence_transformers import export_sentence_transformers

    cfg, model = _load_quietly(args.checkpoint)
    if args.format == "sentence-transformers":
        # A SimCSE run's sentence embedding leaves the training MLP out.
        pooling = cfg.simcse.embedding_pooling() if hasattr(cfg, "simcse") else cfg.model.pooling
        export_sentence_transformers(model.encoder, cfg.model.checkpoint, args.out, pooling, cfg.model.max_length)
        print(f"sentence-transformers folder ({pooling} pooling, max_seq_length {cfg.model.max_length}) "
              f"written to {args.out}")
        return 0
    export_hf(model.encoder, cfg.model.checkpoint, args.out)
    print(f"Hugging Face folder written to {args.out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Task files of a config → shards at data.shards; or one corpus file → shards at --out."""
    import dataclasses

    from dist_minbert.config import load_job_config
    from dist_minbert.data.prepare import prepare_corpus, prepare_tasks, resolve_engine
    from dist_minbert.engine.task_inputs import shards_root
    from dist_minbert.model.tokenizer import WordPieceTokenizer

    overrides = list(args.overrides)
    if args.max_reject_fraction is not None:
        overrides.append(f"data.max_reject_fraction={args.max_reject_fraction}")
    cfg = load_job_config(args.config, overrides)
    tokenizer = WordPieceTokenizer.from_checkpoint(cfg.model.checkpoint)
    if args.corpus:
        if not args.out:
            raise ConfigError("prepare --corpus needs --out (where to write the corpus shards)")
        data = dataclasses.replace(cfg.data, prepare_engine=resolve_engine(cfg.data, cfg.workers.address))
        if data.prepare_engine == "ray":
            from launch.ray_run import connect

            connect(cfg.workers.address)
        manifest = prepare_corpus(args.corpus, args.out, tokenizer, cfg.model.max_length, data)
        print(f"{args.corpus}: {manifest.num_rows} rows in {len(manifest.shards)} shards at {args.out} "
              f"({manifest.rejects['count']} rejected; engine {data.prepare_engine})")
        return 0
    if not hasattr(cfg, "tasks"):
        raise ConfigError(f"{args.config}: a SimCSE config has no tasks to prepare; allowed: --corpus FILE --out DIR")
    data = dataclasses.replace(cfg.data, shards=shards_root(cfg.data, cfg.train.output_dir))
    for task, manifests in prepare_tasks(cfg.tasks, data, tokenizer, cfg.model.max_length).items():
        for split, manifest in manifests.items():
            print(f"{task}/{split}: {manifest.num_rows} rows, {manifest.rejects['count']} rejected "
                  f"{manifest.rejects['by_reason'] or ''} → {data.shards}/{task}/{split}")
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    """The task files' train sentences (no eval text), or N lines generated from them → one file at --out."""
    from dist_minbert.config import load_config
    from dist_minbert.data.corpus import generated_lines, task_corpus, write_lines

    cfg = load_config(args.config, args.overrides)
    corpus = task_corpus(cfg.data, cfg.tasks)
    print(f"task sentences: {corpus.summary()}; {len(corpus.sentences)} kept")
    if args.generated is None:
        written = write_lines(args.out, corpus.sentences)
    else:
        written = write_lines(args.out, generated_lines(corpus.sentences, args.generated))
    print(f"{written} {'generated lines' if args.generated is not None else 'sentences'} written → {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    if args.what == "data":
        from dist_minbert.data.bench import run_data_benchmark

        if args.engine == "ray":
            from launch.ray_run import connect

            connect("")
        with tempfile.TemporaryDirectory() as work_dir:
            report = run_data_benchmark(work_dir, num_lines=args.lines, prepare_engine=args.engine)
    elif args.what == "simcse":
        from dist_minbert.bench.simcse import SimCSEBenchConfig, run_simcse_benchmark

        report = run_simcse_benchmark(SimCSEBenchConfig(num_lines=args.lines))
    elif args.what == "encoder":
        from dist_minbert.bench.encoder import EncoderBenchConfig, run_encoder_benchmark

        report = run_encoder_benchmark(EncoderBenchConfig(threads=args.threads))
    elif args.what == "scaling":
        from launch.bench_scaling import run_scaling_benchmark

        _set_verbose(args.verbose)
        report = run_scaling_benchmark()
    else:
        from launch.bench_pcgrad import run_pcgrad_benchmark

        _set_verbose(args.verbose)
        report = run_pcgrad_benchmark()
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    """The config at each worker count: throughput, step-time split and efficiency; optionally projected further."""
    import time

    from dist_minbert.bench.scaling_model import Network
    from launch.scale import Projection, run_scale

    _set_verbose(args.verbose)
    projection = None
    if args.project:
        projection = Projection(_counts(args.project_workers, "--project-workers"), args.model_size,
                                Network(args.bandwidth_gb_s, args.latency_us), compute_speedup=args.compute_speedup)
    out = args.out or f"runs/scale/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_scale(args.config, args.overrides, _counts(args.workers, "--workers"), out, args.steps,
                       args.warmup_steps, projection)
    print(f"\n== dist-minbert scale ({result['steps']} steps, medians after {result['warmup_steps']}) ==")
    print(f"{'kind':10s} {'workers':>7s} {'samples/s':>10s} {'efficiency':>10s} {'step s':>8s} {'comm s':>8s}")
    for row in result["rows"]:
        comm = row.get("communication_s")
        print(f"{row['kind']:10s} {row['workers']:7d} {row['samples_per_s']:10.1f} {row['efficiency']:10.3f} "
              f"{row['step_s']:8.3f} {'' if comm is None else f'{comm:8.3f}'}")
    for name, path in result["paths"].items():
        if name != "runs":
            print(f"{name:12s} {path}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    """The table's rows × seeds as Ray Tune trials (only what the results file lacks), then RESULTS.md."""
    from launch.table import run_table

    _set_verbose(args.verbose)
    rows = [r for r in args.rows.split(",") if r] if args.rows else None
    result = run_table(args.config, args.overrides, rows, args.seeds, args.report_only)
    recorded = result["selected"] - result["ran"] - len(result["unfinished"])
    print(f"\n== dist-minbert table: {result['ran']} run, {recorded} already recorded, {len(result['unfinished'])} "
          f"{'pending' if args.report_only else 'unfinished'} ==")
    for key, error in result["errors"].items():
        print(f"failed       {key}: {error}")
    if result["unfinished"] and not args.report_only:
        print(f"unfinished   {', '.join(result['unfinished'])} (the same command resumes them)")
    print(f"results      {result['results']}\nreport       {result['report']}")
    if result["best"]:
        print(f"best run     {result['best']['run_dir']} (score {result['best']['score']:.4f}): analysis and "
              f"test predictions in RESULTS.md")
    return 1 if result["unfinished"] and not args.report_only else 0


def cmd_analyse(args: argparse.Namespace) -> int:
    from dist_minbert.analysis.run_analysis import analyse_run

    for what, path in analyse_run(args.run, args.out, args.num_worst).items():
        print(f"{what}: {path}")
    return 0


def _counts(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: {text!r}; allowed: comma-separated worker counts, e.g. 1,2,4") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-minbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="multitask fine-tuning on Ray Train with DeepSpeed workers")
    train.add_argument("--config", required=True, help="YAML file in configs/")
    train.add_argument("--resume", metavar="PATH|latest",
                       help="continue from a checkpoint folder (or a run folder's latest), or from the latest "
                            "checkpoint in train.output_dir; also on another number of workers")
    train.add_argument("--verbose", action="store_true", help="also print Ray's and DeepSpeed's own log lines "
                                                             "(or set DIST_MINBERT_VERBOSE=1)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. workers.num_workers=1")
    train.set_defaults(func=cmd_train)

    simcse = sub.add_parser("simcse", help="unsupervised SimCSE on a corpus's shards (the encoder for `train`)")
    simcse.add_argument("--config", required=True, help="YAML file, e.g. configs/simcse.yaml")
    simcse.add_argument("--resume", metavar="PATH|latest", help="as for train")
    simcse.add_argument("--verbose", action="store_true", help="as for train")
    simcse.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. simcse.chunk_size=32")
    simcse.set_defaults(func=cmd_simcse)

    evaluate = sub.add_parser("evaluate", help="dev metrics of a checkpoint on CS224N-format files")
    evaluate.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or a tag folder (a path or URL)")
    evaluate.add_argument("files", nargs="*", help="TASK=FILE (labelled); default: the run's dev files")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="write CS224N prediction files for a checkpoint")
    predict.add_argument("checkpoint")
    predict.add_argument("files", nargs="+", help="TASK=FILE (labels not needed)")
    predict.add_argument("--out", required=True, help="folder for the <task>-<file>-output.csv files")
    predict.set_defaults(func=cmd_predict)

    prepare = sub.add_parser("prepare", help="tokenize task files (or a corpus) into Arrow shards + manifest")
    prepare.add_argument("--config", required=True, help="the tasks, tokenizer and data.shards to prepare for")
    prepare.add_argument("--corpus", help="a one-sentence-per-line file (any fsspec URL) instead of the tasks")
    prepare.add_argument("--out", help="shards folder (fsspec URL) for --corpus")
    prepare.add_argument("--max-reject-fraction", type=float, help="fail past this fraction of rejected rows")
    prepare.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    prepare.set_defaults(func=cmd_prepare)

    corpus = sub.add_parser("corpus", help="write a one-sentence-per-line corpus: the task files' train sentences "
                                            "without eval text, or N lines generated from them")
    corpus.add_argument("--out", required=True, help="the corpus file: a path or fsspec URL (.gz etc. compress)")
    source = corpus.add_mutually_exclusive_group()
    source.add_argument("--from-tasks", action="store_true",
                        help="(the default) SST, QQP and STS train sentences under data.root, de-duplicated, "
                             "every dev/test sentence left out")
    source.add_argument("--generated", type=int, metavar="N", help="N distinct lines, each 2-3 task sentences")
    corpus.add_argument("--config", help="YAML file for data.root and the task files (default: the builtin ones)")
    corpus.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.root=s3://bucket/cs224n")
    corpus.set_defaults(func=cmd_corpus)

    scale = sub.add_parser("scale", help="the same config at each worker count (global batch fixed): samples/s, "
                                          "step-time split, efficiency → CSV, plot, TensorBoard; --project: further")
    scale.add_argument("--config", required=True, help="YAML file in configs/")
    scale.add_argument("--workers", default="1,2", help="worker counts, 1 CPU and 1 thread each (default 1,2)")
    scale.add_argument("--steps", type=int, default=20, help="optimizer steps of each run (default 20)")
    scale.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the medians (default 1)")
    scale.add_argument("--out", help="output folder, new or empty (default runs/scale/<config>-<time>)")
    scale.add_argument("--project", action="store_true", help="add the multi-node projection (a ring all-reduce "
                                                              "model, labelled as a projection)")
    scale.add_argument("--project-workers", default="8,16,32", help="--project: worker counts (default 8,16,32)")
    scale.add_argument("--model-size", default="", help="--project: bert-base, bert-large or a checkpoint "
                                                        "(default: the config's model.checkpoint)")
    scale.add_argument("--bandwidth-gb-s", type=float, default=20.0, help="--project: ring bus bandwidth per "
                                                                          "worker, GB/s (default 20)")
    scale.add_argument("--latency-us", type=float, default=15.0, help="--project: per ring hop, µs (default 15)")
    scale.add_argument("--compute-speedup", type=float, default=1.0,
                       help="--project: a projected worker's compute rate over a measured one's (default 1)")
    scale.add_argument("--verbose", action="store_true", help="as for train")
    scale.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. tasks.sst.batch_size=64")
    scale.set_defaults(func=cmd_scale)

    bench = sub.add_parser("bench", help="benchmarks: figures measured side by side, as one JSON object")
    bench.add_argument("what", choices=["data", "pcgrad", "simcse", "scaling", "encoder"])
    bench.add_argument("--json", action="store_true", help="one line of JSON")
    bench.add_argument("--lines", type=int, default=1_000_000, help="bench data|simcse: corpus lines to generate")
    bench.add_argument("--engine", choices=["local", "ray"], default="local", help="bench data: the prepare engine")
    bench.add_argument("--threads", type=int, default=2, help="bench encoder: torch threads of both sides (default 2)")
    bench.add_argument("--verbose", action="store_true", help="bench pcgrad|scaling: also Ray's and DeepSpeed's "
                                                             "log lines")
    bench.set_defaults(func=cmd_bench)

    table = sub.add_parser("table", help="the study's rows × seeds as Ray Tune trials, each a full train run; "
                                          "resumable; writes the results file and docs/RESULTS.md")
    table.add_argument("--config", required=True, help="table YAML, e.g. configs/table.yaml")
    table.add_argument("--rows", help="comma-separated row names to run (default: all); every row is reported")
    table.add_argument("--seeds", type=int, help="seeds per row instead of each row's own count")
    table.add_argument("--report-only", action="store_true", help="run nothing: rewrite RESULTS.md from the "
                                                                  "results file (after editing the notes)")
    table.add_argument("--verbose", action="store_true", help="as for train; also Ray Tune's status table")
    table.add_argument("overrides", nargs="*", help="dotted key=value overrides of the table, e.g. "
                                                    "shared.train.max_steps=20 rows.b2.seeds=3")
    table.set_defaults(func=cmd_table)

    analyse = sub.add_parser("analyse", help="a run's dev confusion matrix, worst examples and gradient conflicts")
    analyse.add_argument("--run", required=True, help="a train run's folder (its best checkpoint is analysed)")
    analyse.add_argument("--out", required=True, help="folder for the PNG, Markdown and JSON files")
    analyse.add_argument("--num-worst", type=int, default=10, help="examples per task (default 10)")
    analyse.set_defaults(func=cmd_analyse)

    export = sub.add_parser("export", help="write a Hugging Face BERT folder (AutoModel.from_pretrained loads it) "
                                            "or a sentence-transformers one (SentenceTransformer loads it)")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--format", choices=["hf", "sentence-transformers"], default="hf",
                        help="sentence-transformers: the encoder with the run's model.pooling and max_length; "
                             "encode() gives our sentence embeddings (default: hf)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"dist-minbert {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
