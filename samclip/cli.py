"""Command line: ``samclip run | precompute | sweep | compare | testbed | claims | verify-registered | segment | profiles``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_PROCESS_STARTED = time.monotonic()

# Defaults for a run without a Prefect server: the temporary server Prefect starts needs more
# than its default 20 s on a loaded 2-core machine. Values already in the environment win.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="smoke", help="profile name or YAML path (default: smoke)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.stage1.epochs=3 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samclip", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the whole pipeline: curate → precompute → stages 1-3 with the sweep → evaluate → register"),
        ("precompute", "curate the images and precompute the teachers' features"),
        ("sweep", "precompute (reused), stage 1, then the stage 2 sweep"),
        ("compare", "precompute (reused), stage 1, then the teachers, naive distillation, Wise-FT and SAM-CLIP in one table"),
    ):
        _add_profile_arguments(commands.add_parser(name, help=help_text))
    testbed = commands.add_parser("testbed", help="write the shapes scenes and train the CLIP and SAM teachers on them (cached)")
    _add_profile_arguments(testbed)
    testbed.set_defaults(profile="shapes")
    claims = commands.add_parser(
        "claims", help="on the shapes testbed: teachers, naive distillation, Wise-FT and SAM-CLIP against ground truth"
    )
    _add_profile_arguments(claims)
    claims.set_defaults(profile="shapes")
    claims.add_argument("--results-dir", default=None, help="also copy the results Markdown and plot into this folder")
    verify = commands.add_parser(
        "verify-registered",
        help="load a registered model in this process, re-evaluate it and compare with its registered evaluation",
    )
    verify.add_argument("model", help="NAME@ALIAS, e.g. samclip-smoke@candidate")
    verify.add_argument("--tracking-uri", required=True, help="MLflow tracking URI of the registry")
    verify.add_argument("--tolerance", type=float, default=1e-5, help="max absolute difference per metric")
    segment = commands.add_parser(
        "segment",
        help="segment an image into text-prompted classes with both heads of a student; writes an overlay PNG and the masks",
    )
    segment.add_argument("image", help="image path or URI")
    segment.add_argument("--prompt", dest="prompts", action="append", required=True, metavar="TEXT", help="class name (repeatable)")
    segment.add_argument("--model", required=True, help="student checkpoint folder or URI, or NAME@ALIAS with --tracking-uri")
    segment.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the registry, for NAME@ALIAS")
    segment.add_argument("--output", required=True, help="output folder or URI")
    segment.add_argument("--clip-model", default=None, help="OpenCLIP model name of the text encoder (default: from the checkpoint's config.yaml)")
    segment.add_argument("--clip-weights", default=None, help="path or URI of the OpenCLIP weights file")
    segment.add_argument("--clip-config", default=None, help="path or URI of an OpenCLIP JSON config, for a custom model")
    segment.add_argument("--points", type=int, default=3, help="point prompts sampled per class (default: 3)")
    segment.add_argument(
        "--background-threshold", type=float, default=None,
        help="mask probability in [0, 1] below which a pixel is background (default: none, every pixel gets a class)",
    )
    segment.add_argument("--templates", choices=("simple", "openai"), default="simple", help="prompt templates (default: simple)")
    segment.add_argument("--seed", type=int, default=0, help="seed of the point sampling (default: 0)")
    commands.add_parser("profiles", help="list the shipped profiles")
    return parser


def _print_pipeline_summary(outputs, wall_seconds: float, flow_entry_seconds: float) -> None:
    data = outputs.sweep.data
    sweep = outputs.sweep.sweep
    lines = [
        "",
        "SAM-CLIP pipeline finished",
        f"  profile             {outputs.profile}",
        f"  resolved config     {outputs.config_uri}",
        f"  manifest            {data.manifest_uri}",
        f"  rejects             {data.rejects_uri}",
        f"  curation summary    {data.summary_uri}",
        f"  clip features       {data.features['clip']}",
        f"  sam features        {data.features['sam']}",
        f"  computed this run   clip={data.computed['clip']} sam={data.computed['sam']}",
        f"  stage 1 checkpoint  {outputs.sweep.stage1.checkpoint_uri}",
        f"  sweep table         {sweep.table_uri}",
        f"  sweep plot          {sweep.plot_uri}",
        f"  stage 2 (best)      {sweep.best['checkpoint_uri']}",
        f"  stage 3 checkpoint  {outputs.stage3.checkpoint_uri if outputs.stage3 else '(skipped)'}",
        f"  evaluation          {outputs.evaluation.report_md_uri}",
        f"                      {outputs.evaluation.report_json_uri}",
    ]
    lines += [f"  overlay             {uri}" for uri in outputs.evaluation.overlay_uris]
    datasets = outputs.datasets
    if datasets is not None:
        lines += [
            f"  dataset evaluation  {datasets.report_md_uri}",
            f"                      {datasets.report_json_uri}",
        ]
        lines += [f"  dataset overlay     {uri}" for uri in datasets.overlay_uris]
    registered = outputs.registered
    lines += [
        f"  registered model    {registered.name} version {registered.version} (@{registered.alias})",
        f"  registry            {registered.tracking_uri}",
        "",
    ]
    if outputs.random_teachers:
        lines.append(
            f"Evaluation (the {outputs.profile} profile's teachers are random: "
            "these numbers measure agreement with them)"
        )
    else:
        lines.append("Evaluation: agreement with the teachers on the manifest's held-out images")
    lines += [f"  {key:34s} {value:.4f}" for key, value in sorted(outputs.evaluation.metrics.items())]
    if datasets is not None:
        lines += ["", "Evaluation against ground truth (the datasets in the profile's evaluate section)"]
        lines += [f"  {key:34s} {value:.4f}" for key, value in sorted(datasets.metrics.items())]
    timings = outputs.timings
    work = sum(v for k, v in timings.items() if k != "ray_start")
    startup = flow_entry_seconds + timings.get("ray_start", 0.0)
    lines += ["", "Time per step (seconds)"]
    lines += [f"  {key:20s} {value:7.1f}" for key, value in timings.items()]
    lines += [
        f"  {'prefect start-up':20s} {flow_entry_seconds:7.1f}",
        "",
        f"Total {wall_seconds:.1f} s: start-up (Prefect {flow_entry_seconds:.1f} s + Ray "
        f"{timings.get('ray_start', 0.0):.1f} s) = {startup:.1f} s, steps {work:.1f} s",
    ]
    print("\n".join(lines))


def _run(args: argparse.Namespace) -> int:
    from samclip.workflows.pipeline import pipeline_flow

    called = time.time()
    outputs = pipeline_flow(profile=args.profile, overrides=args.overrides)
    _print_pipeline_summary(outputs, time.monotonic() - _PROCESS_STARTED, outputs.flow_started - called)
    return 0


def _precompute(args: argparse.Namespace) -> int:
    from samclip.workflows.precompute_flow import precompute_flow

    data = precompute_flow(profile=args.profile, overrides=args.overrides)
    print(f"manifest  {data.manifest_uri}\nrejects   {data.rejects_uri}\nsummary   {data.summary_uri}")
    for kind, uri in data.features.items():
        print(f"{kind} features  {uri}  (computed this run: {data.computed[kind]})")
    print("curation:", json.dumps(data.curate_counts, sort_keys=True))
    print("seconds:", json.dumps({k: round(v, 1) for k, v in data.timings.items()}))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from samclip.workflows.sweep_flow import sweep_flow

    outputs = sweep_flow(profile=args.profile, overrides=args.overrides)
    print(f"sweep table  {outputs.sweep.table_uri}\nsweep plot   {outputs.sweep.plot_uri}")
    print("best:", json.dumps(outputs.sweep.best, sort_keys=True, default=str))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from samclip.workflows.compare_flow import compare_flow

    outputs = compare_flow(profile=args.profile, overrides=args.overrides)
    result = outputs.comparison
    print(f"comparison table  {result.table_md_uri}\ntrade-off plot    {result.plot_uri}\n")
    from samclip.tasks import storage

    print(storage.read_bytes(result.table_md_uri).decode())
    return 0


def _testbed(args: argparse.Namespace) -> int:
    from samclip.workflows.testbed_flow import testbed_flow

    outputs = testbed_flow(profile=args.profile, overrides=args.overrides)
    print(f"scenes  {json.dumps(outputs.scenes['counts']['split'])}")
    for kind, record in (("clip", outputs.clip), ("sam", outputs.sam)):
        scores = {k: v for k, v in record["result"].items() if isinstance(v, (int, float))}
        print(f"{kind} teacher  {json.dumps(scores)}  files {json.dumps(record['files'])}")
    print("timings " + ", ".join(f"{k} {v:.0f} s" for k, v in outputs.timings.items()))
    return 0


def _claims(args: argparse.Namespace) -> int:
    from samclip.tasks import storage
    from samclip.workflows.claims_flow import claims_flow

    outputs = claims_flow(profile=args.profile, overrides=args.overrides, results_dir=args.results_dir)
    print(storage.read_bytes(outputs.files["md"]).decode())
    print(f"results  {outputs.files['md']}\nplot     {outputs.files['png']}")
    return 0


def _verify_registered(args: argparse.Namespace) -> int:
    import yaml

    from samclip.config import PipelineConfig
    from samclip.tasks.evaluate import evaluate
    from samclip.tasks.register import load_registered, registered_metrics

    if "@" not in args.model:
        print(f"invalid model {args.model!r}: expected NAME@ALIAS", file=sys.stderr)
        return 2
    name, alias = args.model.split("@", 1)
    model, meta = load_registered(name, alias, args.tracking_uri)
    config_path = os.path.join(meta["path"], "config.yaml")
    config = PipelineConfig.model_validate(yaml.safe_load(open(config_path)))
    lineage = meta["lineage"]
    result = evaluate(
        config,
        None,
        lineage["manifest_uri"],
        lineage["features"],
        name=f"verify-{name}-v{meta['version']}",
        model=model,
    )
    metrics = dict(result.metrics)
    if config.evaluate.has_datasets:
        from samclip.tasks.eval_suite import evaluate_datasets

        # the registered version already has its MLflow run; this one is only a check
        check = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"mlflow": False})})
        datasets = evaluate_datasets(check, None, model=model, name=f"verify-{name}-v{meta['version']}-datasets")
        metrics = registered_metrics(result, datasets)
    registered = meta["evaluation"]
    print(f"{name}@{alias} is version {meta['version']} (run {meta['run_id']})")
    worst = 0.0
    for key in sorted(registered):
        now = metrics.get(key, float("nan"))
        difference = abs(now - registered[key])
        worst = max(worst, difference) if difference == difference else float("inf")
        print(f"  {key:34s} registered {registered[key]:.6f}  now {now:.6f}  diff {difference:.2e}")
    print(f"max abs difference {worst:.2e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1


def _segment(args: argparse.Namespace) -> int:
    from samclip.tasks.segment import ClipTextEncoder, segment

    if (args.clip_model is None) != (args.clip_weights is None):
        print("invalid arguments: --clip-model and --clip-weights go together", file=sys.stderr)
        return 2
    encoder = None
    if args.clip_model is not None:
        encoder = ClipTextEncoder(args.clip_model, args.clip_weights, args.clip_config)
    outputs = segment(
        args.image,
        args.prompts,
        args.model,
        args.output,
        tracking_uri=args.tracking_uri,
        text_encoder=encoder,
        num_points=args.points,
        background_threshold=args.background_threshold,
        templates=args.templates,
        seed=args.seed,
    )
    print(f"overlay  {outputs.overlay_uri}\nlabels   {outputs.labels_uri}\nmasks    {outputs.masks_uri}")
    print("pixel share per class:", json.dumps({k: round(v, 4) for k, v in outputs.class_shares.items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import samclip.tasks  # noqa: F401  (sets Ray's loopback variables before ray is imported)
    from samclip.logs import setup_logging

    setup_logging()
    args = _parser().parse_args(argv)
    if args.command == "profiles":
        from samclip.config import available_profiles

        print("\n".join(available_profiles()))
        return 0
    handlers = {
        "run": _run,
        "precompute": _precompute,
        "sweep": _sweep,
        "compare": _compare,
        "testbed": _testbed,
        "claims": _claims,
        "verify-registered": _verify_registered,
        "segment": _segment,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
