"""Local commands of `invmon`: run, runs, models, serve, predict, data."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import CommandError
from pipeline.home import invmon_home

PRODUCTION_ENDPOINT = "bin-count-production"


def add_commands(commands) -> None:
    run = commands.add_parser("run", help="run the whole pipeline on this machine")
    run.add_argument("--data", help="photos: ABID bucket layout or one folder per count "
                                    "(default: the embedded synthetic data)")
    run.add_argument("--manifest", help="file_list.json-style manifest selecting photos")
    run.add_argument("--profile", default="local", choices=["local", "real", "full"],
                     help="parameter defaults: local (fast, CPU, synthetic data), real (real ABID photos "
                          "on a CPU: frozen pretrained EfficientNet-Lite0) or full (the reference recipe)")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="set a pipeline parameter (repeatable), e.g. --param Epochs=3")
    run.add_argument("--resume", metavar="RUN_ID", help="resume a failed run from its failed step")
    run.set_defaults(handler=cmd_run)

    runs = commands.add_parser("runs", help="list or show local runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    runs_sub.add_parser("list", help="every local run").set_defaults(handler=cmd_runs_list)
    show = runs_sub.add_parser("show", help="one run's steps, or its summary")
    show.add_argument("run_id", nargs="?", help="default: the latest run")
    show.add_argument("--json", action="store_true", help="print run.json")
    show.set_defaults(handler=cmd_runs_show)

    models = commands.add_parser("models", help="the model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, handler, help_text in (
        ("list", cmd_models_list, "model versions"),
        ("show", cmd_models_show, "one model version with its metrics"),
        ("approve", cmd_models_approve, "approve a version (deploys it to production)"),
        ("reject", cmd_models_reject, "reject a version"),
    ):
        sub = models_sub.add_parser(name, help=help_text)
        if name != "list":
            sub.add_argument("version", type=int)
        if name in ("approve", "reject"):
            sub.add_argument("--note", default="", help="why (kept with the version)")
        sub.add_argument("--group", default=None, help="model package group (default: bin-count)")
        sub.add_argument("--backend", choices=["local", "aws"], default="local")
        sub.add_argument("--region", default=None, help="AWS region (aws back-end)")
        sub.set_defaults(handler=handler)

    serve = commands.add_parser("serve", help="serve a model on 127.0.0.1 (GET /ping, POST /invocations)")
    _model_choice(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(handler=cmd_serve)

    predict = commands.add_parser("predict", help="print the count for each photo")
    predict.add_argument("photos", nargs="+", type=Path)
    _model_choice(predict)
    predict.add_argument("--url", help="a running endpoint, e.g. http://127.0.0.1:8080")
    predict.add_argument("--json", action="store_true", help="print the full answers as JSON lines")
    predict.set_defaults(handler=cmd_predict)

    data = commands.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the embedded synthetic dataset (ABID layout)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--per-class", type=int, default=300)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=cmd_data_synth)


def _model_choice(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--endpoint", default=None, help="a local endpoint name (default: bin-count-staging)")
    group.add_argument("--version", type=int, default=None, help="a registered model version")
    parser.add_argument("--group", default=None, help="model package group (default: bin-count)")


# -- run ---------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from pipeline.local.runner import LocalRun, synthetic_data
    from pipeline.local.summary import summarize
    from pipeline.parameters import parse_assignments
    from pipeline.profiles import defaults
    from steps import DAG

    home = invmon_home()
    if args.resume:
        if args.data or args.manifest or args.param:
            raise CommandError("--resume reruns a run with its own parameters; drop --data/--manifest/--param")
        try:
            run = LocalRun.load(home, DAG, args.resume)
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from None
        if run.state["status"] == "Succeeded":
            raise CommandError(f"run {args.resume} already succeeded; nothing to resume")
        if not run.state.get("resumable", True):
            raise CommandError(f"run {args.resume} stopped at {run.state['failure']}; resuming would "
                               "stop there again: start a new run with other parameters")
        print(f"resuming run {args.resume} from its first unfinished step")
    else:
        try:
            params = {**defaults(args.profile), **parse_assignments(args.param)}
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if args.data:
            params["InputDataUrl"] = str(Path(args.data).expanduser().resolve())
        if args.manifest:
            params["ManifestUrl"] = str(Path(args.manifest).expanduser().resolve())
        if not params["InputDataUrl"]:
            params["InputDataUrl"] = str(synthetic_data(home, int(params["Seed"])))
        run = LocalRun.create(home, DAG, params, args.profile)
        print(f"run {run.state['id']} ({args.profile} profile) in {run.dir}")
        print("parameters: " + " ".join(f"{k}={v}" for k, v in params.items() if v != ""))
    state = run.execute()
    print()
    print(summarize(state, run.dir))
    return 0 if state["status"] == "Succeeded" else 1


def cmd_runs_list(args) -> int:
    from pipeline.local.runner import list_runs

    runs = list_runs(invmon_home())
    if not runs:
        print("no runs yet: start one with `invmon run`")
        return 0
    print(f"{'RUN':<24} {'STATUS':<10} {'PROFILE':<8} {'ACCURACY':>8}  FAILED STEP")
    for state in runs:
        accuracy = state["steps"].get("CheckAccuracy", {}).get("properties", {}).get("left")
        failed = next((n for n, s in state["steps"].items() if s.get("status") == "Failed"), "")
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        print(f"{state['id']:<24} {state['status']:<10} {state['profile']:<8} {shown:>8}  {failed}")
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
        print(json.dumps(state, indent=2))
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
        from pipeline.aws import SageMakerRegistry

        return SageMakerRegistry(region=args.region)
    from pipeline.registry import open_registry

    return open_registry(invmon_home())


def _group(args) -> str:
    from pipeline.parameters import BY_NAME

    return args.group or str(BY_NAME["ModelPackageGroupName"].default)


def _registry_call(fn, *a, **kw):
    from pipeline.registry import RegistryError

    try:
        return fn(*a, **kw)
    except RegistryError as exc:
        raise CommandError(str(exc)) from None


def cmd_models_list(args) -> int:
    versions = _registry_call(_registry(args).list_versions, args.group)
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
    from dataclasses import asdict

    version = _registry_call(_registry(args).get, _group(args), args.version)
    print(json.dumps(asdict(version), indent=2, default=str))
    return 0


def cmd_models_approve(args) -> int:
    registry = _registry(args)
    group = _group(args)
    version = _registry_call(registry.set_status, group, args.version, "Approved", args.note)
    print(f"{group} version {args.version}: {version.status}")
    if args.backend == "local":
        # Approval is what deploys to production; only Approved versions ever get there.
        endpoint = _registry_call(registry.deploy, PRODUCTION_ENDPOINT, group, args.version,
                                  require_approved=True)
        print(f"production endpoint {endpoint.name} now serves version {endpoint.version} "
              f"(serve it: invmon serve --endpoint {endpoint.name})")
    return 0


def cmd_models_reject(args) -> int:
    group = _group(args)
    version = _registry_call(_registry(args).set_status, group, args.version, "Rejected", args.note)
    print(f"{group} version {args.version}: {version.status}")
    return 0


# -- serving -----------------------------------------------------------------------------------
def _resolve_model(args) -> tuple[Path, str]:
    """(artifact path, version label) for --endpoint / --version, default the staging endpoint."""
    from pipeline.parameters import BY_NAME
    from pipeline.registry import NotFoundError, open_registry

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
        if name == PRODUCTION_ENDPOINT and version.status != "Approved":
            raise CommandError(f"{name} points at version {version.version}, which is {version.status}")
    artifact = Path(version.artifact_uri)
    if not artifact.exists():
        raise CommandError(f"model artifact {artifact} of {group} version {version.version} is missing")
    return artifact, f"{version.group}/{version.version}"


def cmd_serve(args) -> int:
    from pipeline.endpoint import serve

    artifact, label = _resolve_model(args)
    print(f"serving {label} from {artifact} on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve(artifact, host=args.host, port=args.port, model_version=label)
    return 0


def cmd_predict(args) -> int:
    from pipeline.endpoint import ArtifactError, EndpointError, load_model, predict_local, predict_remote

    missing = [str(p) for p in args.photos if not p.is_file()]
    if missing:
        raise CommandError(f"no such photo: {', '.join(missing)}")
    if args.url:
        def predict(photo: Path) -> dict:
            return predict_remote(args.url, photo)
    else:
        # Loaded once through the artifact's own code/inference.py, exactly as the endpoint does.
        artifact, label = _resolve_model(args)
        try:
            model = load_model(artifact, model_version=label)
        except ArtifactError as exc:
            raise CommandError(str(exc)) from None

        def predict(photo: Path) -> dict:
            return predict_local(artifact, photo, model=model)

    failed = 0
    for photo in args.photos:
        try:
            answer = predict(photo)
        except EndpointError as exc:
            failed += 1
            print(f"{photo}: error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"photo": str(photo), **answer}))
        else:
            confidence = answer["probabilities"][str(answer["count"])]
            items = "item" if answer["count"] == 1 else "items"
            print(f"{photo}: {answer['count']} {items} (p={confidence:.2f}, model {answer['model_version']})")
    return 1 if failed else 0


def cmd_data_synth(args) -> int:
    from pipeline import synth

    summary = synth.write_dataset(args.out, per_class=args.per_class, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0
