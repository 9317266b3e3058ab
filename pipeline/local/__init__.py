"""The local executor: runs the step declarations on this machine, no AWS and no Docker."""
