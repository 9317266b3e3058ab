"""The bin-count pipeline as a whole: parameters, profiles, executors, registry, endpoint, CLI."""


def get_pipeline(*args, **kwargs):
    """The SageMaker pipeline (see pipeline/sagemaker/definition.py); the SDK loads only when called."""
    from pipeline.sagemaker.definition import get_pipeline as build

    return build(*args, **kwargs)
