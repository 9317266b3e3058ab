"""The SageMaker pipeline definition: built from steps/ with SDK v3, under moto, with no network.

Assertions are on the definition JSON, the document SageMaker runs.
"""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import pytest

from aws_testing import (BUCKET, REGION, ROLE, NetworkGuard, all_steps, aws_env,
                         default_offline_definition, offline_build, patched_environ)
from pipeline.dag import profiles
from pipeline.dag.parameters import PARAMETERS

TYPES = {str: "String", int: "Integer", float: "Float"}


@pytest.fixture(scope="module")
def moto_build():
    """Build and serialize the pipeline under moto; returns (definition, {S3 key: bytes})."""
    import boto3
    from moto import mock_aws

    from pipeline.sagemaker import definition as sp

    with patched_environ(aws_env()), mock_aws(), NetworkGuard() as guard:
        boto3.Session(region_name=REGION).client("s3").create_bucket(Bucket=BUCKET)
        with sp.telemetry_disabled():  # the SDK's own reporting, not part of the build
            pipeline = sp.get_pipeline(REGION, ROLE, default_bucket=BUCKET)
            text = sp.definition(pipeline)
        s3 = boto3.Session(region_name=REGION).client("s3")
        objects = {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
                   for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    return json.loads(text), objects, guard.attempts


@pytest.fixture(scope="module")
def definition(moto_build):
    return moto_build[0]


@pytest.fixture(scope="module")
def steps(definition):
    return all_steps(definition)


def get(name: str) -> dict:
    return {"Get": name}


@pytest.mark.slow
def test_built_without_network(moto_build):
    assert moto_build[2] == []


def test_parameters_and_defaults_come_from_parameters_py_and_the_profile(definition):
    params = definition["Parameters"]
    assert [p["Name"] for p in params] == [p.name for p in PARAMETERS]
    full = profiles.defaults("full")
    for declared, built in zip(PARAMETERS, params):
        assert built["Type"] == TYPES[declared.type], declared.name
        if declared.name != "ManifestUrl":  # a local file: its uploaded copy (next test)
            assert built["DefaultValue"] == full[declared.name], declared.name
        # A parameter with a set of values carries it: SageMaker refuses any other at start.
        assert built.get("EnumValues") == (list(declared.choices) or None), declared.name
    assert "ModelApprovalStatus" not in [p["Name"] for p in params]  # a run cannot approve


def test_preprocess_reads_only_the_manifests_objects(moto_build, steps):
    """The default execution reads the shipped 10,441-image manifest's objects, one by one, from
    the public bucket: no processing input mounts InputDataUrl (the 535k-image bucket)."""
    from pipeline.dag.parameters import ABID_MANIFEST

    definition, objects, _ = moto_build
    preprocess = steps["Preprocess"]["Arguments"]
    inputs = {i["InputName"]: i["S3Input"] for i in preprocess["ProcessingInputs"]}
    assert "data" not in inputs
    assert all(i["S3Uri"] != get("Parameters.InputDataUrl") for i in inputs.values())
    assert not any(str(i["S3Uri"]).startswith("s3://aft-vbi-pds") for i in inputs.values())
    args = preprocess["AppSpecification"]["ContainerArguments"]
    assert args[args.index("--input") + 1] == get("Parameters.InputDataUrl")
    assert args[args.index("--shard") + 1] == "auto"
    assert inputs["manifest"]["S3Uri"] == get("Parameters.ManifestUrl")
    defaults = {p["Name"]: p.get("DefaultValue") for p in definition["Parameters"]}
    assert defaults["InputDataUrl"] == "s3://aft-vbi-pds/"
    uri = defaults["ManifestUrl"]
    assert uri.startswith(f"s3://{BUCKET}/bin-count/code/manifest-") and uri.endswith("/abid-10441.json")
    assert objects[uri[len(f"s3://{BUCKET}/"):]] == ABID_MANIFEST.read_bytes()
    manifest = json.loads(ABID_MANIFEST.read_text())
    assert sum(len(v) for v in manifest.values()) == 10441


def test_step_types_and_branches(definition, steps):
    assert [(s["Name"], s["Type"]) for s in definition["Steps"]] == [
        ("Preprocess", "Processing"), ("Tune", "Tuning"), ("Train", "Training"),
        ("Evaluate", "Processing"), ("CheckAccuracy", "Condition")]
    condition = steps["CheckAccuracy"]["Arguments"]
    assert [(s["Name"], s["Type"]) for s in condition["IfSteps"]] == [
        ("Register", "RegisterModel"), ("Deploy-Model", "Model"),
        ("Deploy-EndpointConfig", "EndpointConfig"), ("Deploy", "Endpoint"),
        ("SmokeTest", "Processing"), ("CheckSmokeTest", "Condition")]
    assert [(s["Name"], s["Type"]) for s in condition["ElseSteps"]] == [("AccuracyTooLow", "Fail")]
    smoke = steps["CheckSmokeTest"]["Arguments"]
    assert smoke["IfSteps"] == [] and [(s["Name"], s["Type"]) for s in smoke["ElseSteps"]] == [
        ("SmokeTestFailed", "Fail")]


def test_train_hyperparameters_are_wired_from_the_best_tuning_job(steps):
    train = steps["Train"]["Arguments"]["HyperParameters"]
    assert train["lr"] == get("Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']")
    assert train["batch_size"] == get("Steps.Tune.BestTrainingJob.TunedHyperParameters['batch_size']")
    # Integer parameters become strings at run time (hyperparameters are a string map).
    assert train["epochs"] == {"Std:Join": {"On": "", "Values": [get("Parameters.Epochs")]}}
    assert train["arch"] == get("Parameters.Arch")
    static = steps["Tune"]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]
    assert "lr" not in static and "batch_size" not in static  # those are tuned
    assert static["epochs"] == {"Std:Join": {"On": "", "Values": [get("Parameters.TrialEpochs")]}}
    assert static["data_fraction"] == {"Std:Join": {"On": "", "Values": [get("Parameters.TrialDataFraction")]}}
    assert static["sagemaker_program"] == "train.py"


def test_tuning_job(steps):
    from steps.train import METRICS

    args = steps["Tune"]["Arguments"]
    config = args["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize",
                                                          "MetricName": "validation:accuracy"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": get("Parameters.TuningMaxJobs"),
                                        "MaxParallelTrainingJobs": get("Parameters.TuningMaxParallelJobs")}
    ranges = config["ParameterRanges"]
    # The lr bounds are parameters (AdamW wants another range than SGD), rendered as strings.
    as_text = lambda name: {"Std:Join": {"On": "", "Values": [get(f"Parameters.{name}")]}}  # noqa: E731
    assert ranges["ContinuousParameterRanges"] == [
        {"Name": "lr", "MinValue": as_text("TuneLrMin"), "MaxValue": as_text("TuneLrMax"), "ScalingType": "Logarithmic"}]
    assert ranges["CategoricalParameterRanges"] == [
        {"Name": "batch_size", "Values": ["32", "64", "128", "256", "512"]}]
    declared = [{"Name": m.name, "Regex": m.regex} for m in METRICS]
    assert args["TrainingJobDefinition"]["AlgorithmSpecification"]["MetricDefinitions"] == declared
    assert steps["Train"]["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"] == declared


def test_train_checkpoints_for_managed_spot(steps):
    args = steps["Train"]["Arguments"]
    checkpoint = args["CheckpointConfig"]
    assert checkpoint["LocalPath"] == "/opt/ml/checkpoints"
    assert checkpoint["S3Uri"]["Std:Join"]["Values"][:3] == ["s3:/", BUCKET, "bin-count"]
    assert checkpoint["S3Uri"]["Std:Join"]["Values"][-2:] == ["Train", "checkpoints"]
    assert args["EnableManagedSpotTraining"] is True
    stop = args["StoppingCondition"]
    assert stop["MaxWaitTimeInSeconds"] >= stop["MaxRuntimeInSeconds"]
    # Trials are short and do not resume: no checkpoints there.
    assert "CheckpointConfig" not in steps["Tune"]["Arguments"]["TrainingJobDefinition"]


def test_evaluate_property_file_and_condition(steps):
    assert steps["Evaluate"]["PropertyFiles"] == [
        {"PropertyFileName": "EvaluationReport", "OutputName": "evaluation", "FilePath": "evaluation.json"}]
    outputs = steps["Evaluate"]["Arguments"]["ProcessingOutputConfig"]["Outputs"]
    assert [o["OutputName"] for o in outputs] == ["evaluation"]
    (condition,) = steps["CheckAccuracy"]["Arguments"]["Conditions"]
    assert condition == {
        "Type": "GreaterThanOrEqualTo",
        "LeftValue": {"Std:JsonGet": {
            "PropertyFile": get("Steps.Evaluate.PropertyFiles.EvaluationReport"),
            "Path": "multiclass_classification_metrics.accuracy.value"}},
        "RightValue": get("Parameters.AccuracyThreshold"),
    }


def test_fail_message_carries_measured_accuracy_and_threshold(steps):
    message = steps["AccuracyTooLow"]["Arguments"]["ErrorMessage"]["Std:Join"]
    values = message["Values"]
    assert {"Std:JsonGet": {"PropertyFile": get("Steps.Evaluate.PropertyFiles.EvaluationReport"),
                            "Path": "multiclass_classification_metrics.accuracy.value"}} in values
    assert get("Parameters.AccuracyThreshold") in values
    text = "".join(v for v in values if isinstance(v, str))
    assert "below AccuracyThreshold" in text


def test_register_with_evaluation_metrics_always_pending_approval(steps):
    args = steps["Register"]["Arguments"]
    assert args["ModelApprovalStatus"] == "PendingManualApproval"  # a literal, never a parameter
    assert args["ModelPackageGroupName"] == get("Parameters.ModelPackageGroupName")
    stats = args["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert stats["ContentType"] == "application/json"
    assert stats["S3Uri"] == {"Std:Join": {"On": "/", "Values": [
        get("Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"),
        "evaluation.json"]}}
    (container,) = args["InferenceSpecification"]["Containers"]
    assert container["ModelDataUrl"] == get("Steps.Train.ModelArtifacts.S3ModelArtifacts")
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert "pytorch-inference" in container["Image"]


def test_the_registered_model_names_the_evaluation_report(steps):
    """report.html is uploaded with Evaluate's `evaluation` output, and the model package names
    its S3 URI in its CustomerMetadataProperties (what `invmon models show --backend aws` prints)."""
    (output,) = [o for o in steps["Evaluate"]["Arguments"]["ProcessingOutputConfig"]["Outputs"]
                 if o["OutputName"] == "evaluation"]
    assert output["S3Output"]["LocalPath"] == "/opt/ml/processing/evaluation"  # evaluate.py writes report.html there
    assert steps["Register"]["Arguments"]["CustomerMetadataProperties"] == {
        "EvaluationReport": {"Std:Join": {"On": "/", "Values": [
            get("Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"), "report.html"]}},
        # The SHA-256 of the model.tar.gz Evaluate scored, which every deploy checks.
        "ArtifactSha256": {"Std:JsonGet": {"Path": "artifact.sha256", "PropertyFile": {
            "Get": "Steps.Evaluate.PropertyFiles.EvaluationReport"}}},
        # The monitoring baseline beside the report, what the monitor compares traffic with.
        "MonitoringBaseline": {"Std:Join": {"On": "/", "Values": [
            get("Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"), "baseline.json"]}}}


def test_evaluate_looks_up_the_previous_version_in_the_registry_itself(steps):
    """No input for the previous version (a ProcessingInput cannot be empty, and a parameter would
    be stale): the job gets the group and, for boto3, the region."""
    args = steps["Evaluate"]["Arguments"]
    container = args["AppSpecification"]["ContainerArguments"]
    assert container[container.index("--model-package-group") + 1] == get("Parameters.ModelPackageGroupName")
    assert args["Environment"] == {"AWS_DEFAULT_REGION": REGION}
    assert {i["InputName"] for i in args["ProcessingInputs"]} == {"model", "test", "report", "code", "aux", "entrypoint"}
    assert "AWS_DEFAULT_REGION" not in (steps["Preprocess"]["Arguments"].get("Environment") or {})
    assert "CacheConfig" not in steps["Evaluate"]  # the registry changes between executions


def test_deploy_creates_or_updates_the_staging_endpoint_from_the_registered_model(steps):
    model = steps["Deploy-Model"]["Arguments"]["PrimaryContainer"]
    assert model["ModelDataUrl"] == get("Steps.Register.InferenceSpecification.Containers[0].ModelDataUrl")
    # The artifact is self-contained: the serving container starts with no network at all.
    assert steps["Deploy-Model"]["Arguments"]["EnableNetworkIsolation"] is True
    config = steps["Deploy-EndpointConfig"]["Arguments"]
    (variant,) = config["ProductionVariants"]
    assert variant["ModelName"] == get("Steps.Deploy-Model.ModelName")
    assert variant["InstanceType"] == get("Parameters.InferenceInstanceType")
    assert config["EndpointConfigName"]["Std:Join"]["Values"] == [
        get("Parameters.StagingEndpointName"), get("Execution.PipelineExecutionId")]
    endpoint = steps["Deploy"]["Arguments"]
    assert endpoint["EndpointName"] == get("Parameters.StagingEndpointName")
    assert endpoint["EndpointConfigName"] == get("Steps.Deploy-EndpointConfig.EndpointConfigName")


def test_caching_on_the_data_and_tuning_steps_only(steps):
    for name in ("Preprocess", "Tune"):
        assert steps[name]["CacheConfig"]["Enabled"] is True
        assert steps[name]["CacheConfig"]["ExpireAfter"]
    for name in ("Train", "Evaluate"):
        assert "CacheConfig" not in steps[name]


def test_retry_policies_for_throttling_and_capacity(steps):
    def exception_types(name):
        return {t for p in steps[name].get("RetryPolicies", []) for t in p["ExceptionType"]}

    for name in ("Preprocess", "Tune", "Train", "Evaluate"):
        assert {"Step.THROTTLING", "SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT"} <= exception_types(name)
    for name in ("Register", "Deploy-Model", "Deploy-EndpointConfig"):
        assert "Step.THROTTLING" in exception_types(name)
    for policy in steps["Train"]["RetryPolicies"]:
        assert policy["MaxAttempts"] >= 2 and policy["BackoffRate"] > 1


def test_job_names_show_pipeline_and_step(steps):
    assert steps["Preprocess"]["Arguments"]["ProcessingJobName"] == "bin-count-Preprocess"
    assert steps["Evaluate"]["Arguments"]["ProcessingJobName"] == "bin-count-Evaluate"
    assert steps["Tune"]["Arguments"]["HyperParameterTuningJobName"] == "bin-count-Tune"
    assert steps["Train"]["Arguments"]["TrainingJobName"] == "bin-count-Train"
    assert steps["Deploy-Model"]["Arguments"]["ModelName"] == "bin-count-Deploy"


def _tar_names(data: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return set(tar.getnames())


def test_code_is_staged_with_requirements_and_inference_beside_train(moto_build, steps):
    _, objects, _ = moto_build
    channels = {c["ChannelName"]: c for c in steps["Train"]["Arguments"]["InputDataConfig"]}
    code_uri = channels["code"]["DataSource"]["S3DataSource"]["S3Uri"]
    key = code_uri.removeprefix(f"s3://{BUCKET}/")
    assert key.startswith("bin-count/code/train-") and key.endswith("/sourcedir.tar.gz")
    assert {"train.py", "inference.py", "requirements.txt"} <= _tar_names(objects[key])
    static = steps["Tune"]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]
    assert static["sagemaker_submit_directory"] == code_uri  # the trials run the same code

    inputs = {i["InputName"]: i["S3Input"]["S3Uri"] for i in steps["Preprocess"]["Arguments"]["ProcessingInputs"]}
    prefix = inputs["code"].removeprefix(f"s3://{BUCKET}/")
    assert {"preprocess.py", "requirements.txt"} <= _tar_names(objects[prefix + "sourcedir.tar.gz"])
    runproc = objects[inputs["entrypoint"].removeprefix(f"s3://{BUCKET}/")].decode()
    assert "install_requirements.py requirements.txt" in runproc and "preprocess.py" in runproc
    # Every S3 URI the definition names was uploaded.
    text = json.dumps(steps)
    for uri in (code_uri, inputs["aux"], inputs["entrypoint"]):
        assert uri.removeprefix(f"s3://{BUCKET}/") in objects, uri
    assert text.count("s3://") >= 6


def test_offline_build_is_the_same_definition_with_the_same_files(moto_build, tmp_path):
    moto_definition, objects, _ = moto_build
    offline = offline_build(tmp_path)
    assert offline == moto_definition
    staged = {p.relative_to(tmp_path / BUCKET).as_posix() for p in (tmp_path / BUCKET).rglob("*") if p.is_file()}
    assert staged == set(objects)


@pytest.mark.slow
def test_code_uris_are_content_addressed(tmp_path):
    """Same code, same URIs (caching survives an upsert); other code, other URIs."""
    import steps as declared
    from steps.base import Code, Dag

    again = offline_build(tmp_path / "again")
    assert json.dumps(again, sort_keys=True) == json.dumps(json.loads(default_offline_definition()), sort_keys=True)

    pre = declared.DAG["Preprocess"]
    changed = dataclasses.replace(pre, code=Code("preprocess", "preprocess.py",
                                                 extra_files=("inference/inference.py",)))
    dag = Dag(tuple(changed if s.name == "Preprocess" else s for s in declared.DAG.steps))
    other = all_steps(offline_build(tmp_path / "other", dag=dag))
    base = all_steps(again)

    def code_input(step_map, name):
        return {i["InputName"]: i["S3Input"]["S3Uri"]
                for i in step_map[name]["Arguments"]["ProcessingInputs"]}["code"]

    assert code_input(other, "Preprocess") != code_input(base, "Preprocess")
    assert code_input(other, "Evaluate") == code_input(base, "Evaluate")


def _find_keys(obj, keys: set, found: list, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys:
                found.append(f"{path}/{k}")
            _find_keys(v, keys, found, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _find_keys(v, keys, found, f"{path}[{i}]")
    return found


def test_empty_kms_vpc_and_manifest_leave_no_fields(definition, tmp_path):
    assert _find_keys(definition["Steps"], {"KmsKeyId", "VolumeKmsKeyId", "VpcConfig", "NetworkConfig"}, []) == []
    built = offline_build(tmp_path, parameter_overrides={"ManifestUrl": ""})
    names = [i["InputName"] for i in all_steps(built)["Preprocess"]["Arguments"]["ProcessingInputs"]]
    assert "manifest" not in names and "data" not in names  # data: read by the script itself


def test_kms_vpc_and_manifest_are_used_when_given(tmp_path):
    overrides = {"KmsKeyId": "alias/invmon", "SubnetIds": "subnet-1, subnet-2",
                 "SecurityGroupIds": "sg-1", "ManifestUrl": "s3://my-bucket/file_list.json",
                 "InputDataUrl": "s3://my-bucket/abid/"}
    built = offline_build(tmp_path, profile="local", parameter_overrides=overrides)
    steps = all_steps(built)
    defaults = {p["Name"]: p["DefaultValue"] for p in built["Parameters"]}
    assert defaults == {**profiles.defaults("local"), **overrides}
    kms = get("Parameters.KmsKeyId")
    pre = steps["Preprocess"]["Arguments"]
    assert pre["ProcessingOutputConfig"]["KmsKeyId"] == kms
    assert pre["ProcessingResources"]["ClusterConfig"]["VolumeKmsKeyId"] == kms
    assert pre["NetworkConfig"]["VpcConfig"] == {"SecurityGroupIds": ["sg-1"], "Subnets": ["subnet-1", "subnet-2"]}
    assert steps["Train"]["Arguments"]["OutputDataConfig"]["KmsKeyId"] == kms
    assert steps["Train"]["Arguments"]["VpcConfig"]["Subnets"] == ["subnet-1", "subnet-2"]
    assert steps["Tune"]["Arguments"]["TrainingJobDefinition"]["VpcConfig"]["SecurityGroupIds"] == ["sg-1"]
    assert steps["Deploy-EndpointConfig"]["Arguments"]["KmsKeyId"] == kms
    inputs = {i["InputName"]: i for i in pre["ProcessingInputs"]}
    assert inputs["manifest"]["S3Input"]["S3Uri"] == get("Parameters.ManifestUrl")
    assert inputs["manifest"]["S3Input"]["LocalPath"] == "/opt/ml/processing/input/manifest"

    from pipeline.sagemaker.definition import fixed_parameters

    assert set(fixed_parameters(built)) == {"SubnetIds", "SecurityGroupIds", "EnableDebugger"}
    assert set(fixed_parameters(json.loads(default_offline_definition()))) == {
        "SubnetIds", "SecurityGroupIds", "EnableDebugger", "KmsKeyId"}  # the full profile ships a manifest


def test_half_a_vpc_config_is_refused(tmp_path):
    from pipeline.sagemaker.definition import DefinitionError

    with pytest.raises(DefinitionError, match="SubnetIds and SecurityGroupIds"):
        offline_build(tmp_path, parameter_overrides={"SubnetIds": "subnet-1"})


def test_settings_that_do_not_go_together_are_refused(tmp_path):
    from pipeline.sagemaker.definition import DefinitionError

    with pytest.raises(DefinitionError, match=r"TuneLrMin \(0.2\) must be below TuneLrMax \(0.1\)"):
        offline_build(tmp_path, parameter_overrides={"TuneLrMin": 0.2})
    with pytest.raises(DefinitionError, match="FrozenBlocks=11 applies to the efficientnet_lite architectures, not resnet50"):
        offline_build(tmp_path, parameter_overrides={"FrozenBlocks": 11})


def test_offline_build_refuses_aws_calls(tmp_path):
    """Anything in the build that needs AWS fails loudly offline instead of reaching out."""
    from pipeline.sagemaker import definition as sp

    with patched_environ({k: v for k, v in aws_env().items()}), NetworkGuard() as guard:
        session = sp.make_session(REGION, BUCKET, "bin-count", offline_dir=tmp_path)
        with pytest.raises(sp.OfflineError, match="ListPipelines"):
            session.sagemaker_client.list_pipelines()
    assert guard.attempts == []


# --------------------------------------------------------------------------- images and Debugger


def _image(container, instance_type: str) -> str:
    from sagemaker.core import image_uris

    image = container.image
    return image_uris.retrieve("pytorch", region=REGION, version=image.version, py_version=image.python,
                               instance_type=instance_type, image_scope=image.scope)


def _driver_lines(staged: dict[str, bytes], step: dict, channel: str, script: str) -> list[str]:
    """The line of a job's SDK driver script (sm_train.sh, runproc.sh) that installs requirements."""
    if "TrainingJobDefinition" in step["Arguments"]:
        inputs = step["Arguments"]["TrainingJobDefinition"]["InputDataConfig"]
    else:
        inputs = step["Arguments"]["InputDataConfig"]
    uri = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in inputs}[channel]
    key = uri.removeprefix(f"s3://{BUCKET}/").rstrip("/") + f"/{script}"
    return [line.strip() for line in staged[key].decode().splitlines() if "install_requirements.py" in line]


def _staged(folder) -> dict[str, bytes]:
    root = folder / BUCKET
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def debugger_build(tmp_path_factory):
    """The definition upserted with EnableDebugger=true, and the files it staged."""
    folder = tmp_path_factory.mktemp("debugger-on")
    return offline_build(folder, parameter_overrides={"EnableDebugger": "true"}), _staged(folder)


def test_every_step_runs_in_the_image_steps_images_declares(steps):
    """steps/images.py is the one place: each job's image is its container's, CPU or GPU from the
    build-time instance type (full profile: ml.m5.xlarge processing, ml.g4dn.xlarge training,
    ml.m5.large serving)."""
    from steps import images

    def training_image(step):
        args = step["Arguments"]
        return (args.get("TrainingJobDefinition") or args)["AlgorithmSpecification"]["TrainingImage"]

    assert steps["Preprocess"]["Arguments"]["AppSpecification"]["ImageUri"] == _image(images.PREPROCESS, "ml.m5.xlarge")
    assert steps["Evaluate"]["Arguments"]["AppSpecification"]["ImageUri"] == _image(images.EVALUATE, "ml.m5.xlarge")
    assert training_image(steps["Tune"]) == training_image(steps["Train"]) == _image(images.TRAIN, "ml.g4dn.xlarge")
    assert training_image(steps["Train"]).endswith("/pytorch-training:2.10-gpu-py313")
    served = _image(images.INFERENCE, "ml.m5.large")
    assert steps["Register"]["Arguments"]["InferenceSpecification"]["Containers"][0]["Image"] == served
    assert steps["Deploy-Model"]["Arguments"]["PrimaryContainer"]["Image"] == served
    assert served.endswith("/pytorch-inference:2.6-cpu-py312")


def test_by_default_the_train_job_has_no_debugger_at_all(definition, steps, tmp_path):
    """EnableDebugger=false (every profile's default): no hook, no rules, no rules image, and the
    job installs train's own requirements.txt, which has no smdebug."""
    text = json.dumps(definition)
    for absent in ("DebugHookConfig", "DebugRuleConfigurations", "sagemaker-debugger-rules"):
        assert absent not in text, absent
    staged = tmp_path / "staged"
    offline_build(staged)
    files = _staged(staged)
    for name in ("Tune", "Train"):
        assert _driver_lines(files, steps[name], "sm_drivers", "sm_train.sh") == [
            "$SM_PYTHON_CMD /opt/ml/input/data/sm_drivers/scripts/install_requirements.py requirements.txt"]
    assert not any(line.startswith("smdebug") for line in _requirement_lines("train/requirements.txt"))


def _requirement_lines(relative: str) -> list[str]:
    from steps.base import SCRIPTS

    return [line.split("#")[0].strip() for line in (SCRIPTS / relative).read_text().splitlines()
            if line.split("#")[0].strip()]


def test_with_the_debugger_train_has_the_hook_the_four_rules_and_smdebugs_image(debugger_build):
    from steps import images

    definition, staged = debugger_build
    steps = all_steps(definition)
    args = steps["Train"]["Arguments"]
    hook = args["DebugHookConfig"]
    assert {"Std:Join"} == set(hook["S3OutputPath"]) and "debugger" in hook["S3OutputPath"]["Std:Join"]["Values"]
    saved = {c["CollectionName"]: c["CollectionParameters"]["save_interval"] for c in hook["CollectionConfigurations"]}
    assert saved == {"losses": "1", "gradients": "50", "weights": "50", "biases": "50"}
    rules = {r["RuleConfigurationName"]: r for r in args["DebugRuleConfigurations"]}
    assert set(rules) == {"LossNotDecreasing", "Overfit", "VanishingGradient", "ExplodingTensor"}
    for name, rule in rules.items():
        assert rule["RuleParameters"]["rule_to_invoke"] == name
        assert rule["RuleEvaluatorImage"].endswith(".amazonaws.com/sagemaker-debugger-rules:latest")
    # smdebug's numpy<2 has no wheel for Python 3.13: the Train job runs in the Python 3.12 image
    # and installs requirements-debugger.txt (train's file + smdebug) from the same staged code.
    assert args["AlgorithmSpecification"]["TrainingImage"] == _image(images.TRAIN_DEBUGGER, "ml.g4dn.xlarge")
    assert args["AlgorithmSpecification"]["TrainingImage"].endswith("/pytorch-training:2.9-gpu-py312")
    assert _driver_lines(staged, steps["Train"], "sm_drivers", "sm_train.sh") == [
        "$SM_PYTHON_CMD /opt/ml/input/data/sm_drivers/scripts/install_requirements.py requirements-debugger.txt"]
    assert "smdebug==1.0.34" in _requirement_lines("train/requirements-debugger.txt")
    # The trials keep their image and have no hook; every other step is the same request.
    assert "DebugHookConfig" not in steps["Tune"]["Arguments"]["TrainingJobDefinition"]
    default = all_steps(json.loads(default_offline_definition()))
    assert [n for n in steps if steps[n] != default[n]] == ["Train"]


def test_enable_debugger_is_fixed_at_upsert_and_start_refuses_to_change_it(debugger_build):
    """A pipeline cannot add request fields or change an image at run time: `invmon start` refuses
    an EnableDebugger other than the one upserted, with the command that changes it."""
    from pipeline.sagemaker import clients, executions
    from pipeline.sagemaker.definition import fixed_parameters

    class Deployed:  # the SageMaker API as `invmon start` uses it, for one upserted definition
        def __init__(self, definition):
            self.text, self.started = json.dumps(definition), []

        def describe_pipeline(self, PipelineName):
            return {"PipelineDefinition": self.text}

        def start_pipeline_execution(self, **request):
            self.started.append(request)
            return {"PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:123456789012:pipeline/bin-count/execution/x"}

    for definition, upserted, other in ((json.loads(default_offline_definition()), "false", "true"),
                                        (debugger_build[0], "true", "false")):
        assert "EnableDebugger" in fixed_parameters(definition)
        sm = Deployed(definition)
        with pytest.raises(clients.AwsError, match=(
                r"cannot override EnableDebugger at start: EnableDebugger is fixed when the pipeline is "
                r"upserted .* re-run `invmon upsert --param EnableDebugger=\.\.\.`")):
            executions.start(sm, "bin-count", {"EnableDebugger": other})
        executions.start(sm, "bin-count", {"EnableDebugger": upserted})  # the value it has: nothing to refuse
        assert sm.started[-1]["PipelineParameters"] == [{"Name": "EnableDebugger", "Value": upserted}]
