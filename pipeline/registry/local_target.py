"""The local deploy back-end: a stage endpoint is a record in the SQLite registry naming the
version it serves (`invmon serve --endpoint` and `invmon predict` read it)."""
from __future__ import annotations

from pipeline.registry.artifacts import verify_local_artifact
from pipeline.registry.cleanup import Pruned
from pipeline.registry.local import Endpoint, ModelVersion, NotFoundError
from pipeline.registry.rollout import rollout_report, rollout_settings
from pipeline.registry.stages import STAGES, NoChange, endpoint_name


class LocalTarget:
    """Endpoints as records in the SQLite registry (`invmon serve --endpoint` serves them)."""

    smoke_gate = False  # a local version is Approved only by `invmon models approve`, which applies it

    def __init__(self, registry):
        self.registry = registry

    def current(self, name: str) -> Endpoint | None:
        try:
            return self.registry.get_endpoint(name)
        except NotFoundError:
            return None

    def deploy(self, name: str, model: ModelVersion, stage: str, recheck=None) -> None:
        verify_local_artifact(model)
        if recheck and (problem := recheck()):
            raise NoChange(problem)
        # The status is checked again inside the registry's write transaction.
        self.registry.deploy(name, model.group, model.version, require_approved=stage == "prod")

    def flag(self, name: str, text: str) -> None:
        self.registry.flag_endpoint(name, text)

    def endpoints(self, group: str) -> list[Endpoint]:
        names = {endpoint_name(group, s) for s in STAGES}
        return [e for e in self.registry.list_endpoints() if e.name in names]

    def rollout_report(self, name: str, stage: str, creating: bool = False) -> str:
        """What a deploy on SageMaker would shift when, from the same settings the deploy function
        reads (the local record itself switches at once)."""
        return rollout_report(name, stage, rollout_settings()[0], creating)

    def prune(self, name: str, group: str, stage: str, dry_run: bool = False) -> Pruned:
        """A local endpoint is one record naming the version it serves: no models or configs pile up."""
        current = self.current(name)
        return Pruned(name, kept=[(name, f"serves version {current.version}")] if current else [],
                      note="nothing to prune: a local endpoint is one record naming the version it serves"
                           + (f" ({current.version})" if current else " (no record)"))
