"""Local commands of `invmon`: run, runs, models, serve, predict, data."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from pipeline.cli.conventions import add_json_option, add_recipe_option, checked_parameters, print_json
from pipeline.cli.errors import CommandError, UsageError
from pipeline.home import invmon_home, step_envs
from pipeline.registry.local import RegistryError

LOG = logging.getLogger("invmon.local")


def add_commands(commands) -> None:
    run = commands.add_parser("run", help="run the whole pipeline on this machine")
    run.add_argument("--data", metavar="DIR_OR_S3_URI",
                     help="photos: a local folder (ABID bucket layout or one folder per count) or an "
                          "s3://bucket/prefix/ in the ABID layout (default: the embedded synthetic data)")
    run.add_argument("--manifest", metavar="FILE_OR_S3_URI",
                     help="file_list.json-style manifest selecting photos: a local file or an "
                          "s3://bucket/key")
    add_recipe_option(run, "local",
                      help="parameter defaults: local (fast, CPU, synthetic data), real (real ABID "
                           "photos on a CPU: EfficientNet-Lite0, its last two stages fine-tuned), "
                           "finetune (real photos on a GPU: Lite0 fine-tuned at 320 px) or full (the "
                           "reference recipe)")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="set a pipeline parameter (repeatable), e.g. --param Epochs=3")
    run.add_argument("--resume", metavar="RUN_ID", help="resume a failed run from its failed step")
    run.set_defaults(handler=cmd_run)

    plan = commands.add_parser(
        "plan", help="print the compiled step requests (JSON) that a run executes",
        description="The DAG compiled with a recipe's defaults and --param values: every step's request "
                    "in the SageMaker API's shape, with placeholders ({\"Get\": ...}) for what is known only "
                    "at run time. The local runner executes exactly these (each run keeps them as plan.json, "
                    "beside executed.jsonl); the SageMaker definition is built from them.")
    add_recipe_option(plan, "local", help="parameter defaults (see run)")
    plan.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                      help="set a pipeline parameter (repeatable)")
    plan.set_defaults(handler=cmd_plan)

    runs = commands.add_parser("runs", help="list or show local runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    listed = runs_sub.add_parser("list", help="every local run")
    add_json_option(listed, "the runs")
    listed.set_defaults(handler=cmd_runs_list)
    show = runs_sub.add_parser("show", help="one run's steps, or its summary")
    show.add_argument("run_id", nargs="?", help="default: the latest run")
    add_json_option(show, "the run's run.json")
    show.set_defaults(handler=cmd_runs_show)
    compared = runs_sub.add_parser(
        "compare", help="two runs side by side: parameters, code, data, metrics",
        description="Parameters, the commit, the data (manifest and split digests, photos per split) and "
                    "Evaluate's metrics (accuracy, RMSE, accuracy per count) of two local runs side by "
                    "side; a * marks each difference.")
    compared.add_argument("run_a", metavar="RUN_A")
    compared.add_argument("run_b", metavar="RUN_B")
    add_json_option(compared, "the comparison")
    compared.set_defaults(handler=cmd_runs_compare)

    models = commands.add_parser("models", help="the model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, handler, help_text in (
        ("list", cmd_models_list, "model versions"),
        ("show", cmd_models_show, "one model version with its metrics and lineage"),
        ("approve", cmd_models_approve, "approve a version (deploys it to production)"),
        ("reject", cmd_models_reject, "reject a version (rolls production back if it serves it)"),
    ):
        sub = models_sub.add_parser(name, help=help_text)
        if name != "list":
            sub.add_argument("version", type=int)
        if name in ("approve", "reject"):
            sub.add_argument("--note", default="", help="why (kept with the version)")
        if name == "approve":
            sub.add_argument("--force-no-smoke", action="store_true",
                             help="approve although the version's staging smoke test failed or never ran "
                                  "(an operator's override: logged, and kept in the approval's note; on aws also "
                                  "recorded on the package as SmokeTestOverride with who and why, which the "
                                  "production deploy requires)")
        sub.add_argument("--group", default=None, help="model package group (default: bin-count)")
        sub.add_argument("--backend", choices=["local", "aws"], default="local")
        sub.add_argument("--region", default=None, help="AWS region (aws back-end)")
        if name in ("approve", "reject"):
            sub.add_argument("--role-arn", default=None, help="aws: role of the models a rollback "
                                                             "creates (default: $INVMON_MODEL_ROLE_ARN)")
            sub.add_argument("--instance-type", default=None, help="aws: endpoint instance type")
        else:
            add_json_option(sub, "the versions" if name == "list" else "the version")
        sub.set_defaults(handler=handler)

    serve = commands.add_parser("serve", help="serve a model on 127.0.0.1 (GET /ping, POST /invocations)")
    _model_choice(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--max-batch", type=int, default=None,
                       help="images per forward pass (micro-batching; default 16)")
    serve.add_argument("--max-wait-ms", type=float, default=None,
                       help="how long a batch waits for requests still decoding (default 5)")
    serve.add_argument("--max-queue", type=int, default=None,
                       help="requests admitted at once; past it 503 + Retry-After (default 64)")
    serve.add_argument("--timeout", type=float, default=None,
                       help="seconds from a received body to its answer (default 30)")
    capture = serve.add_mutually_exclusive_group()
    capture.add_argument("--capture", metavar="DIR", default=None,
                         help="capture what is served, for `invmon monitor` (default for an endpoint: "
                              "$INVMON_HOME/capture/<endpoint>; with --version: no capture)")
    capture.add_argument("--no-capture", action="store_true", help="capture nothing")
    serve.add_argument("--capture-sample", type=float, default=None,
                       help="share of answered requests captured, 0-1 (default 1)")
    serve.add_argument("--capture-body-sample", type=float, default=None,
                       help="share of captured requests that keep the photo's bytes, 0-1 (default 0)")
    serve.set_defaults(handler=cmd_serve)

    monitor = commands.add_parser(
        "monitor", help="compare what an endpoint served with its model's baseline (drift)",
        description="Runs the monitor's step container (scripts/monitor) on this machine: the endpoint's "
                    "capture (invmon serve writes it) against the monitoring baseline Evaluate made for the "
                    "version it serves. Writes monitor.json and report.html; drift is alerted (notifications "
                    "log, INVMON_NOTIFY_COMMAND). Exit 0 either way, 3 with --fail-on-drift and drift.")
    _model_choice(monitor)
    monitor.add_argument("--capture", metavar="DIR", help="default: $INVMON_HOME/capture/<endpoint>")
    monitor.add_argument("--since", help="window start: ISO 8601 or a duration back (6h, 7d); default: all")
    monitor.add_argument("--out", metavar="DIR", help="default: $INVMON_HOME/monitor/<endpoint>/<time>")
    monitor.add_argument("--fail-on-drift", action="store_true", help="exit 3 when drift is found")
    add_json_option(monitor, "monitor.json")
    monitor.set_defaults(handler=cmd_monitor)

    predict = commands.add_parser("predict", help="count photos: print each, or --out a CSV")
    predict.add_argument("photos", nargs="+", metavar="PHOTO_DIR_OR_GLOB",
                         help="photos, folders (searched for .jpg/.jpeg/.png) or globs; with --backend "
                              "aws also one s3://BUCKET/PREFIX/, counted by a SageMaker Batch Transform job")
    _model_choice(predict)
    predict.add_argument("--url", help="a running endpoint, e.g. http://127.0.0.1:8080")
    predict.add_argument("--backend", choices=["local", "aws"], default="local",
                         help="aws: --endpoint names a SageMaker endpoint (runtime InvokeEndpoint); for "
                              "s3:// photos the model is --version, the version --endpoint serves, or the "
                              "newest Approved")
    predict.add_argument("--region", default=None, help="AWS region (aws back-end)")
    predict.add_argument("--json", action="store_true", help="print the full answers as JSON lines")
    predict.add_argument("--out", type=_file_or_s3, help="write a CSV (id, path, count, confidence, "
                         "p1..p5, error) with a progress bar; for s3:// photos also s3://BUCKET/KEY.csv")
    predict.add_argument("--batch-size", type=int, default=16, help="photos per forward pass (--out)")
    predict.add_argument("--concurrency", type=int, default=8,
                         help="requests in flight (--out --url; s3:// photos: per instance)")
    predict.add_argument("--no-raw", action="store_true",
                         help="skip measuring the raw forward rate printed beside the throughput")
    job = predict.add_argument_group("s3:// photos (--backend aws): the Batch Transform job")
    job.add_argument("--instance-type", default="ml.m5.xlarge", help="default: %(default)s")
    job.add_argument("--instance-count", type=int, default=1, help="default: %(default)s")
    job.add_argument("--role-arn", default=None, help="the role the model runs as (default: "
                                                      "$INVMON_MODEL_ROLE_ARN, the stack's ModelRoleArn)")
    job.add_argument("--transform-output", metavar="S3_PREFIX", default=None,
                     help="where the job's manifests and answers go (default: s3://<the artifact's "
                          "bucket>/bulk/<group>/, which the stack's ModelRole may write)")
    job.add_argument("--poll-seconds", type=float, default=30.0, help="default: %(default)s")
    predict.set_defaults(handler=cmd_predict)

    data = commands.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the embedded synthetic dataset (ABID layout)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--per-class", type=int, default=300)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=cmd_data_synth)
    fetch = data_sub.add_parser(
        "fetch", help="mirror the ABID images a manifest or selection rule names (S3 -> folder)",
        description="Mirror exactly the listed ABID images and metadata into --out (ABID layout), "
                    "checked as Preprocess checks them, with fetch_report.json. Anonymous access "
                    "when no AWS credentials are configured; AWS_ENDPOINT_URL for other stores. "
                    "A rerun fetches only what is missing or damaged.")
    from pipeline.data.fetch import ingest

    ingest().add_arguments(fetch)
    fetch.set_defaults(handler=cmd_data_fetch)


def _file_or_s3(value: str) -> Path | str:
    return value if value.startswith("s3://") else Path(value)


def _model_choice(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--endpoint", default=None, help="a local endpoint name (default: bin-count-staging)")
    group.add_argument("--version", type=int, default=None, help="a registered model version")
    parser.add_argument("--group", default=None, help="model package group (default: bin-count)")


# -- run ---------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from pipeline.data import fetch as data
    from pipeline.lineage import COMMIT_PARAMETER
    from pipeline.local.runner import LocalRun, synthetic_data
    from pipeline.local.summary import summarize
    from pipeline.dag.parameters import parse_assignments, validate
    from pipeline.dag.profiles import defaults
    from steps import DAG

    home = invmon_home()
    if args.resume:
        if args.data or args.manifest or args.param:
            raise UsageError("--resume reruns a run with its own parameters; drop --data/--manifest/--param")
        try:
            run = LocalRun.load(home, DAG, args.resume)
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from None
        if run.state["status"] == "Succeeded":
            raise CommandError(f"run {args.resume} already succeeded; nothing to resume")
        if not run.state.get("resumable", True):
            raise CommandError(f"run {args.resume} stopped at {run.state['failure']}; resuming would "
                               "stop there again: start a new run with other parameters")
        LOG.info(f"resuming run {args.resume} from its first unfinished step")
    else:
        try:
            given = parse_assignments(args.param)
            if COMMIT_PARAMETER in given:
                raise UsageError(f"{COMMIT_PARAMETER} is read from the working tree a run starts in "
                                 "(git rev-parse HEAD, -dirty with uncommitted changes), not set")
            params = {**defaults(args.recipe), **given}
            if args.data:
                params["InputDataUrl"] = data.data_location(args.data)
            if args.manifest:
                params["ManifestUrl"] = str(data.manifest_location(home, args.manifest, echo=LOG.info))
            validate(params)  # before the synthetic data is generated and before any step
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except data.UnreadableObject as exc:  # an s3:// manifest that cannot be read
            raise CommandError(str(exc)) from None
        if not params["InputDataUrl"]:
            params["InputDataUrl"] = str(synthetic_data(home, int(params["Seed"])))
        run = LocalRun.create(home, DAG, params, args.recipe)
        LOG.info(f"run {run.state['id']} ({args.recipe} recipe) in {run.dir}")
        LOG.info("parameters: " + " ".join(f"{k}={v}" for k, v in params.items() if v != ""))
    from pipeline.local.runner import RunLocked, RunStopped

    try:
        state = run.execute()
    except RunLocked as exc:
        raise CommandError(str(exc)) from None
    except RunStopped as exc:
        LOG.warning(f"run {run.state['id']} stopped by {exc} (every job and trial stopped); "
                    f"continue with: invmon run --resume {run.state['id']}")
        return 130
    print()
    print(summarize(state, run.dir))
    return 0 if state["status"] == "Succeeded" else 1


def cmd_plan(args) -> int:
    from pipeline.dag.compile import CompileError, plan
    from pipeline.dag.parameters import validate
    from pipeline.dag.profiles import defaults
    from steps import DAG

    base = defaults(args.recipe)
    params = validate({**base, **checked_parameters(args.param, base)})  # typed as declared
    try:
        compiled = plan(DAG, params)
    except CompileError as exc:
        raise CommandError(str(exc)) from None
    print_json(compiled)
    return 0


def cmd_runs_list(args) -> int:
    from pipeline.local.runner import list_runs

    runs = [run_record(state) for state in list_runs(invmon_home())]
    if args.json:
        print_json(runs)
        return 0
    if not runs:
        print("no runs yet: start one with `invmon run`")
        return 0
    print(f"{'RUN':<24} {'STATUS':<10} {'PROFILE':<8} {'ACCURACY':>8}  FAILED STEP")
    for run in runs:
        shown = f"{run['accuracy']:.4f}" if run["accuracy"] is not None else "-"
        failed = run["failed_step"] or ""
        print(f"{run['id']:<24} {run['status']:<10} {run['profile']:<8} {shown:>8}  {failed}")
    return 0


def run_record(state: dict) -> dict:
    """One run as `runs list` shows it (the accuracy is the gate's, known once CheckAccuracy ran)."""
    return {"id": state["id"], "status": state["status"], "profile": state["profile"],
            "created_at": state.get("created_at"),
            "accuracy": state["steps"].get("CheckAccuracy", {}).get("properties", {}).get("left"),
            "failed_step": next((n for n, s in state["steps"].items() if s.get("status") == "Failed"), None)}


def _load_runs(*run_ids: str) -> list[tuple[dict, Path]]:
    """Each run's run.json and folder, or a one-line error naming the missing one."""
    from pipeline.local.runner import list_runs

    runs = {state["id"]: state for state in list_runs(invmon_home())}
    for run_id in run_ids:
        if run_id not in runs:
            raise CommandError(f"no run {run_id!r}; see `invmon runs list`")
    return [(runs[run_id], invmon_home() / "runs" / run_id) for run_id in run_ids]


def cmd_runs_compare(args) -> int:
    from pipeline.local import compare

    document = compare.compare(*_load_runs(args.run_a, args.run_b))
    if args.json:
        print_json(document)
    else:
        print(compare.table(document))
    return 0


def cmd_runs_show(args) -> int:
    from pipeline.local.runner import list_runs
    from pipeline.local.summary import summarize

    runs = {state["id"]: state for state in list_runs(invmon_home())}
    run_id = args.run_id or (sorted(runs)[-1] if runs else None)
    if run_id not in runs:
        raise CommandError(f"no run {run_id!r}; see `invmon runs list`" if run_id else "no runs yet")
    state = runs[run_id]
    if args.json:
        print_json(state)
        return 0
    for name, step in state["steps"].items():
        extra = step.get("error") or step.get("reason") or (
            f"cached from {step['reused_from']}" if step.get("reused_from") else "")
        seconds = f"{step['seconds']:.0f}s" if "seconds" in step else ""
        print(f"  {name:<16} {step['status']:<10} {seconds:>6}  {extra}")
    print(summarize(state, invmon_home() / "runs" / run_id))
    return 0


# -- models ------------------------------------------------------------------------------------
def _registry(args):
    if args.backend == "aws":
        from pipeline.cli.aws import region_of
        from pipeline.registry.sagemaker import SageMakerRegistry

        return _registry_call(SageMakerRegistry, region=region_of(args.region))
    from pipeline.registry.local import open_registry

    registry = open_registry(invmon_home())
    LOG.debug(f"local registry {registry.path}")
    return registry


def _group(args) -> str:
    from pipeline.dag.parameters import BY_NAME

    return args.group or str(BY_NAME["ModelPackageGroupName"].default)


def _registry_call(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except RegistryError as exc:
        raise CommandError(str(exc)) from None


def version_document(version, parameters: dict | None = None, parameters_missing: str | None = None) -> dict:
    """A version as `models list/show --json` print it: its record and its lineage."""
    from pipeline import lineage

    return {**asdict(version), "lineage": lineage.of_version(version, parameters, parameters_missing)}


def cmd_models_list(args) -> int:
    versions = _registry_call(_registry(args).list_versions, args.group)
    if args.json:
        print_json([version_document(v) for v in versions])
        return 0
    if not versions:
        print("no registered models yet: `invmon run` registers one when it passes the accuracy gate")
        return 0
    print(f"{'GROUP':<16} {'VERSION':>7} {'STATUS':<22} {'ACCURACY':>8} {'RMSE':>7}  CREATED")
    for v in versions:
        accuracy, rmse = _headline(v.metrics)
        print(f"{v.group:<16} {v.version:>7} {v.status:<22} {accuracy:>8} {rmse:>7}  {v.created_at}")
    return 0


def _headline(metrics: dict) -> tuple[str, str]:
    try:
        accuracy = f"{metrics['multiclass_classification_metrics']['accuracy']['value']:.4f}"
        rmse = f"{metrics['regression_metrics']['rmse']['value']:.4f}"
    except (KeyError, TypeError):
        return "-", "-"
    return accuracy, rmse


def cmd_models_show(args) -> int:
    from pipeline import lineage

    registry = _registry(args)
    version = _registry_call(registry.get, _group(args), args.version)
    report = report_uri(version)
    parameters, missing = None, None
    if args.backend == "aws":  # the parameters are the execution's own, kept by SageMaker
        parameters, missing = registry.execution_parameters(version.run_id)
    document = version_document(version, parameters, missing)
    if args.json:
        print_json({**document, "evaluation_report": report})
        return 0
    print_json(asdict(version))
    print("\n".join(lineage.lines(document["lineage"])))
    print(report_line(report))
    return 0


def report_uri(version) -> str | None:
    """Where the version's evaluation report is: recorded at registration (both back-ends), or
    beside the artifact for a local version registered before it was recorded."""
    from pipeline.registry.local import REPORT_PROPERTY

    uri = version.properties.get(REPORT_PROPERTY, "")
    if not uri:
        legacy = Path(str(version.artifact_uri)).parent / "report.html"
        return legacy.resolve().as_uri() if legacy.is_file() else None
    return uri


def report_line(uri: str | None) -> str:
    from urllib.parse import unquote, urlparse

    if uri is None:
        return "evaluation report: none recorded for this version"
    if uri.startswith("file://") and not Path(unquote(urlparse(uri).path)).is_file():
        return f"evaluation report: {uri} (missing: the file was removed)"
    return f"evaluation report: {uri}"


def cmd_models_approve(args) -> int:
    from pipeline.cli import deploy as cli_deploy
    from pipeline.registry import deploy
    from pipeline.registry.stages import endpoint_name

    registry = _registry(args)
    group = _group(args)
    args.note = _smoke_gate(args, registry, _registry_call(registry.get, group, args.version))
    if args.backend == "aws":
        # On AWS the approval event is what deploys: the EventBridge rule of infra/ invokes the
        # deploy function (deploying here as well would race it).
        version = _registry_call(registry.set_status, group, args.version, "Approved", args.note)
        print(f"{group} version {args.version}: {version.status}")
        print(f"the approval rule deploys it to {endpoint_name(group, 'prod')}")
        LOG.info(f"follow it: invmon endpoints --backend aws (without the infra stack: invmon deploy "
                 f"--stage prod --backend aws --version {args.version})")
        return 0
    # A failed deploy keeps the approval: the error says so, and the exit status is 1.
    outcome = _registry_call(deploy.approve, registry, cli_deploy.target_of(args, registry), group,
                             args.version, args.note)
    print(f"{group} version {args.version}: Approved")
    verb = "now serves" if outcome.changed else "already serves"
    print(f"production endpoint {outcome.endpoint} {verb} version {outcome.version.version}"
          + (f" (was version {outcome.previous})" if outcome.changed and outcome.previous else "")
          + f" (serve it: invmon serve --endpoint {outcome.endpoint})")
    return 0


def _smoke_gate(args, registry, version) -> str:
    """The approval's note, once the version's staging smoke test passed (pipeline/registry/smoke.py,
    production_problem, the rule production's deploy applies too); refused otherwise, unless
    --force-no-smoke, which is logged and kept in the note; on AWS also recorded on the package
    (who and why) before it is approved: the approval event deploys, and the deploy function
    requires it."""
    from pipeline.registry import smoke

    problem = smoke.production_problem(version)
    if problem is None:
        return args.note
    if not args.force_no_smoke:
        raise CommandError(f"not approved: {problem}; run the pipeline again, or approve it anyway with "
                           "--force-no-smoke (an operator's override, kept in the approval's note)")
    LOG.warning(f"approving {version.name} without a passing staging smoke test (--force-no-smoke): {problem}")
    if args.backend == "aws":
        override = smoke.override_text(_registry_call(smoke.operator, registry.sm), args.note, problem)
        _registry_call(smoke.record_override, registry.sm, version, override)
        LOG.info(f"recorded on {version.name}: {smoke.OVERRIDE_PROPERTY}={override}")
    # SageMaker keeps 1,024 characters of an ApprovalDescription.
    return f"{args.note} [--force-no-smoke: {problem}]".strip()[:1024]


def cmd_models_reject(args) -> int:
    from pipeline.cli import deploy as cli_deploy
    from pipeline.registry import deploy

    registry = _registry(args)
    group = _group(args)
    outcome = _registry_call(deploy.reject, registry, cli_deploy.target_of(args, registry), group,
                             args.version, args.note)
    print(f"{group} version {args.version}: Rejected")
    if outcome is not None:
        print(outcome.message)
    return 0


# -- serving -----------------------------------------------------------------------------------
def _resolve_model(args) -> tuple[Path, str]:
    """(artifact path, version label) for --endpoint / --version, default the staging endpoint."""
    version, artifact = _resolve_version(args)
    return artifact, f"{version.group}/{version.version}"


def _resolve_version(args):
    """(the registered version, its artifact path) for --endpoint / --version."""
    from pipeline.dag.parameters import BY_NAME
    from pipeline.registry.local import NotFoundError, is_production, open_registry

    registry = open_registry(invmon_home())
    group = _group(args)
    if args.version is not None:
        version = _registry_call(registry.get, group, args.version)
    else:
        name = args.endpoint or str(BY_NAME["StagingEndpointName"].default)
        try:
            endpoint = registry.get_endpoint(name)
        except NotFoundError:
            raise CommandError(f"no local endpoint {name!r}: `invmon run` deploys the staging one, "
                               "`invmon models approve` the production one; or pick --version") from None
        version = _registry_call(registry.get, endpoint.group, endpoint.version)
        if is_production(name) and version.status != "Approved":
            raise CommandError(f"{name} points at version {version.version}, which is {version.status}")
    artifact = Path(version.artifact_uri)
    if not artifact.exists():
        raise CommandError(f"model artifact {artifact} of {group} version {version.version} is missing")
    if args.version is None:  # an endpoint serves only the bytes that were registered
        from pipeline.registry.artifacts import verify_local_artifact
        from pipeline.registry.stages import DeployError

        try:
            verify_local_artifact(version)
        except DeployError as exc:
            raise CommandError(str(exc)) from None
    return version, artifact


def cmd_serve(args) -> int:
    from dataclasses import replace

    from pipeline.serving.capture import CaptureError
    from pipeline.serving.endpoint import ServingSettings
    from pipeline.serving.http_server import serve

    for share in (args.capture_sample, args.capture_body_sample):
        if share is not None and not 0 <= share <= 1:
            raise UsageError(f"--capture-sample and --capture-body-sample are shares from 0 to 1, got {share}")
    artifact, label = _resolve_model(args)
    settings = ServingSettings(capture_dir=_capture_dir(args))
    for name, value in (("max_batch", args.max_batch), ("max_wait_ms", args.max_wait_ms),
                        ("max_queue", args.max_queue), ("request_timeout_s", args.timeout),
                        ("capture_sample", args.capture_sample),
                        ("capture_body_sample", args.capture_body_sample)):
        if value is not None:
            settings = replace(settings, **{name: value})
    LOG.info(f"serving {label} from {artifact} on http://{args.host}:{args.port} (Ctrl-C stops)")
    if settings.capture_dir:
        LOG.info(f"capturing what it serves into {settings.capture_dir} (--no-capture: none)")
    try:
        return serve(artifact, host=args.host, port=args.port, model_version=label, settings=settings)
    except CaptureError as exc:
        raise CommandError(str(exc)) from None


def cmd_monitor(args) -> int:
    """The monitor container's script, in its own step environment as the runner runs a step."""
    import subprocess
    from datetime import datetime, timezone
    from urllib.parse import unquote, urlparse

    from pipeline.alerts import notify
    from pipeline.dag.parameters import BY_NAME
    from pipeline.local.envs import StepEnvironmentError, python_for
    from pipeline.registry.local import BASELINE_PROPERTY
    from steps.images import MONITOR

    version, artifact = _resolve_version(args)
    group, label = version.group, f"{version.group}/{version.version}"
    name = args.endpoint or (None if args.version is not None else str(BY_NAME["StagingEndpointName"].default))
    baseline = version.properties.get(BASELINE_PROPERTY, "")
    if not baseline:
        raise CommandError(f"{label} has no monitoring baseline (registered before Evaluate made one): "
                           "register a new version to monitor it")
    baseline = Path(unquote(urlparse(baseline).path)) if baseline.startswith("file:") else Path(baseline)
    capture = Path(args.capture).expanduser() if args.capture else (
        invmon_home() / "capture" / name if name else None)
    if capture is None:
        raise UsageError("--version has no endpoint capture of its own: give --capture DIR")
    if not capture.exists():
        raise CommandError(f"no capture at {capture}: `invmon serve` writes one while it serves")
    out = Path(args.out).expanduser() if args.out else (
        invmon_home() / "monitor" / (name or label.replace("/", "-")) / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    try:
        python = python_for(MONITOR.requirements, step_envs(), log=LOG.info)
    except StepEnvironmentError as exc:
        raise CommandError(str(exc)) from None
    command = [str(python), str(MONITOR.requirements.parent / "monitor.py"), "--capture", str(capture),
               "--baseline", str(baseline), "--output", str(out), "--model-version", label,
               "--model", str(artifact), *(["--since", args.since] if args.since else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise CommandError((done.stderr.strip().splitlines() or [f"the monitor exited {done.returncode}"])[-1])
    result = json.loads((out / "monitor.json").read_text())
    if result["drift"]:
        notify("drift", f"{name or label} drifted: {', '.join(result['drifted'])}",
               f"{result['window']['requests']} requests against {label}'s baseline; report: {out / 'report.html'}",
               endpoint=name, group=group, version=version.version, report=str(out / "report.html"))
    if args.json:
        print_json(result)
    else:
        print("\n".join(line for line in done.stdout.splitlines() if "=" not in line.split(" ")[0]))
        print(f"report: {out / 'report.html'}")
    return 3 if result["drift"] and args.fail_on_drift else 0


def _capture_dir(args) -> str:
    """Where `invmon serve` captures: --capture, else an endpoint's own folder; a bare --version
    serves no endpoint, so it captures only when asked."""
    from pipeline.dag.parameters import BY_NAME

    if args.no_capture:
        return ""
    if args.capture:
        return str(Path(args.capture).expanduser().resolve())
    if args.version is not None:
        return ""
    name = args.endpoint or str(BY_NAME["StagingEndpointName"].default)
    return str(invmon_home() / "capture" / name)


def cmd_predict(args) -> int:
    from pipeline.serving.bulk import NoPhotos, collect_photos
    from pipeline.serving.endpoint import ArtifactError, EndpointError, load_model, predict_local, predict_remote

    if args.batch_size < 1 or args.concurrency < 1:
        raise UsageError("--batch-size and --concurrency must be at least 1")
    if any(photo.startswith("s3://") for photo in args.photos):
        return _predict_on_sagemaker(args)
    if isinstance(args.out, str):
        raise UsageError("--out s3://... is for s3:// photos with --backend aws; give a file")
    if args.backend == "aws" and args.out:
        raise UsageError("--out with --backend aws counts an s3://BUCKET/PREFIX/ of photos (Batch "
                         "Transform); local photos are counted with the local model or --url")
    if args.backend == "aws" and not args.endpoint:
        raise UsageError("--backend aws needs --endpoint NAME (e.g. bin-count-production)")
    try:
        photos = collect_photos(args.photos)
    except NoPhotos as exc:
        raise CommandError(str(exc)) from None
    model = None
    if args.backend == "aws":
        predict = _sagemaker_predictor(args)
    else:
        if not args.url:
            # Loaded once through the artifact's own code/inference.py, exactly as the endpoint does.
            artifact, label = _resolve_model(args)
            try:
                model = load_model(artifact, model_version=label)
            except ArtifactError as exc:
                raise CommandError(str(exc)) from None
        if args.out:
            return _predict_csv(args, photos, model)
        if args.url:
            def predict(photo: Path) -> dict:
                return predict_remote(args.url, photo)
        else:
            def predict(photo: Path) -> dict:
                return predict_local(artifact, photo, model=model)

    failed = 0
    for photo in photos:
        try:
            answer = predict(photo)
        except EndpointError as exc:
            failed += 1
            LOG.error(f"{photo}: {exc}")
            continue
        if args.json:  # JSON lines: one document per photo, as each is counted
            print(json.dumps({"photo": str(photo), **answer}))
        else:
            confidence = answer["probabilities"][str(answer["count"])]
            items = "item" if answer["count"] == 1 else "items"
            print(f"{photo}: {answer['count']} {items} (p={confidence:.2f}, model {answer['model_version']})")
    return 1 if failed else 0


def cmd_data_fetch(args) -> int:
    from pipeline.data.fetch import ingest

    module = ingest()
    try:
        module.rule_from(args)  # the option values, before anything is fetched
    except module.InputError as exc:
        raise UsageError(str(exc)) from None
    try:
        report = module.run_from_args(args, echo=LOG.info)
    except (module.InputError, module.s3fetch.FetchError) as exc:
        raise CommandError(str(exc)) from None
    return 0 if report["usable"] else 1


def _sagemaker_predictor(args):
    """Photos to a SageMaker endpoint through sagemaker-runtime InvokeEndpoint."""
    from pipeline.cli.aws import region_of
    from pipeline.sagemaker import clients, executions
    from pipeline.serving.endpoint import content_type_for

    runtime = clients.client("sagemaker-runtime", region_of(args.region))
    return lambda photo: executions.invoke_endpoint(runtime, args.endpoint, photo.read_bytes(),
                                             content_type_for(photo))


def _predict_on_sagemaker(args) -> int:
    """One s3:// prefix counted by a Batch Transform job into the local command's CSV."""
    import os

    from pipeline.cli.aws import region_of
    from pipeline.sagemaker import clients, transform

    if args.backend != "aws" or len(args.photos) != 1 or not args.out or args.url or args.json:
        raise UsageError("s3:// photos are counted on SageMaker: one s3://BUCKET/PREFIX/ with --backend "
                         "aws and --out counts.csv (or --out s3://BUCKET/KEY.csv), without --url or --json")
    if args.instance_count < 1 or args.poll_seconds <= 0:
        raise UsageError("--instance-count must be at least 1 and --poll-seconds above 0")
    if args.transform_output and not args.transform_output.startswith("s3://"):
        raise UsageError(f"--transform-output {args.transform_output}: give an s3://BUCKET/PREFIX/")
    if args.instance_type not in (kinds := transform.instance_types()):
        raise UsageError(f"--instance-type {args.instance_type}: Batch Transform runs on "
                         f"{', '.join(k for k in kinds if k.startswith('ml.m5.'))}, ... (not this one)")
    role = args.role_arn or os.environ.get("INVMON_MODEL_ROLE_ARN", "")
    if not role:
        raise UsageError("the Batch Transform job needs the model's execution role: pass --role-arn "
                         "or set INVMON_MODEL_ROLE_ARN (the stack's ModelRoleArn output)")
    region = region_of(args.region)
    sm, s3, logs = (clients.client(service, region) for service in ("sagemaker", "s3", "logs"))
    settings = transform.Settings(role, args.instance_type, args.instance_count, args.concurrency,
                                  args.transform_output, args.poll_seconds)
    try:
        print(transform.count(sm, s3, logs, args.photos[0], args.out, settings, _group(args),
                              args.version, args.endpoint, progress=LOG.isEnabledFor(logging.INFO)))
    except transform.TransformError as exc:
        raise CommandError(str(exc)) from None
    return 0


def _predict_csv(args, photos: list[Path], model) -> int:
    """Bulk counting into a CSV; bad photos are rows with their error (exit status 0)."""
    from pipeline.serving import bulk

    if args.url:
        rows = bulk.count_remote(args.url, photos, concurrency=args.concurrency)
    else:
        rows = bulk.count_local(model, photos, batch_size=args.batch_size)
    quiet = not LOG.isEnabledFor(logging.INFO)  # -q: no progress bar either
    tally = bulk.write_csv(rows, args.out, total=len(photos), progress=not quiet)
    print(f"wrote {args.out}: {bulk.summary_line(tally)}")
    if model is not None and not args.no_raw and tally.counted:
        sample = [image for image in (bulk.decode_photo(model, p)[0] for p in photos[:args.batch_size])
                  if image is not None]
        if sample:
            raw = bulk.raw_forward_rate(model, sample, args.batch_size)
            print(f"raw forward pass of the same model at batch {args.batch_size}: {raw:.1f} images/s; "
                  f"bulk counting ran at {tally.rate / raw:.2f}x of it (decoding and files included)")
    return 0


def cmd_data_synth(args) -> int:
    from pipeline.data import synth

    summary = synth.write_dataset(args.out, per_class=args.per_class, seed=args.seed)
    print_json(summary)
    return 0
