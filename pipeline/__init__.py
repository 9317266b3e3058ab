"""The bin-count pipeline as a whole: parameters, profiles, executors, registry, endpoint, CLI."""
