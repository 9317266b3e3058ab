"""SageMaker Debugger (smdebug) for train.py, isolated: it records when smdebug imports, else nothing.

smdebug is opt-in. It is installed only in the Train job of a pipeline upserted with
EnableDebugger=true (scripts/train/requirements-debugger.txt, in the Python 3.12 image: its numpy<2
has no wheel for 3.13), which also carries SageMaker's DebugHookConfig and built-in rules. Everywhere
else (the default on SageMaker, the trials, the local run) training is unchanged without it: its
curves are in history.json, and Evaluate computes the four rule verdicts from them.

    import debugger
    debugger.attach(model, rank)           # once, on the bare (not DDP-wrapped) module
    debugger.record("train", loss)         # each training step (a scalar loss tensor)
    debugger.learning_rate(lr)             # each training step; saved at the weights' interval
    debugger.record("validation", loss)    # each validation batch
    debugger.pause()                       # stop recording (train.py --tails: only the first tail's run)
    debugger.finish(model_dir)             # reads the trial back, writes model_dir/debugger.json

With smdebug, a `smdebug.pytorch.Hook` saves losses every step and weights, biases, gradients
and the learning rate (a scalar, `scalar/learning_rate`) every DEBUGGER_INTERVAL steps (the
`DEBUGGER_INTERVAL` environment variable, default 100) into the trial folder: SageMaker's hook config when the job has one
(/opt/ml/input/config/debughookconfig.json; the trial then goes to the DebuggerHookConfig's S3
path), else SM_OUTPUT_DATA_DIR/debugger. `finish` reads the trial back with `create_trial` and
writes a compact summary into the model dir (losses per step and mode, the learning rate and
the mean |value| of each gradient and weight at each saved step, their non-finite counts) that the Evaluate step turns
into the four rule verdicts (scripts/evaluate/rules.py). Without smdebug (or with one that does
not import: it breaks on numpy 2 and protobuf > 3.20) debugger.json says why, training is
unchanged, and the report says that the Debugger data is missing.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SMDEBUG_CONFIG = Path("/opt/ml/input/config/debughookconfig.json")
NOT_INSTALLED = ("smdebug is not installed (SageMaker Debugger is opt-in: EnableDebugger=true "
                 "installs it, scripts/train/requirements-debugger.txt)")

_hook = None
_modes = None
_trial_dir: Path | None = None
_reason = "not attached"
_rank = 0
_paused = False


def _say(line: str) -> None:
    """One line in one write (train.py's `say`): a forked tail's lines share the pipe."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _interval() -> int:
    try:
        return max(1, int(os.environ.get("DEBUGGER_INTERVAL", "100")))
    except ValueError:
        return 100


def attach(model, rank: int = 0):
    """Register the smdebug hook on `model` (rank 0 only). Returns the hook, or None and says why."""
    global _hook, _modes, _trial_dir, _reason, _rank
    _rank = rank
    if rank != 0:
        _reason = f"rank {rank} does not record"
        return None
    try:
        import smdebug
        from smdebug.core.collection import CollectionKeys
        from smdebug.pytorch import Hook, SaveConfig, modes
    except Exception as exc:  # ImportError, or numpy/protobuf incompatibilities raised at import
        if isinstance(exc, ModuleNotFoundError) and exc.name == "smdebug":
            _reason = NOT_INSTALLED
        else:
            _reason = f"smdebug is not usable here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        _say(f"debugger: off: {_reason}")
        if SMDEBUG_CONFIG.is_file():  # the job asked for the Debugger and cannot record for it
            _say(f"debugger: this job has SageMaker's DebugHookConfig ({SMDEBUG_CONFIG}) but no working smdebug: "
                 "the built-in rules will find no tensors")
        return None
    try:
        if SMDEBUG_CONFIG.is_file():  # on SageMaker: the DebuggerHookConfig decides
            hook = Hook.create_from_json_file()
            _trial_dir = Path(hook.out_dir)
        else:
            out = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")) / "debugger"
            if out.exists():  # a restarted job: smdebug refuses to write into an existing trial
                import shutil
                shutil.rmtree(out)
            hook = Hook(out_dir=str(out), export_tensorboard=False,
                        save_config=SaveConfig(save_interval=_interval()),
                        include_collections=[CollectionKeys.WEIGHTS, CollectionKeys.BIASES,
                                             CollectionKeys.GRADIENTS, CollectionKeys.LOSSES])
            _trial_dir = out
        losses = hook.get_collection(CollectionKeys.LOSSES)
        losses.include("loss_")  # record()'s tensors, every step
        losses.save_config = SaveConfig(save_interval=1)
    except Exception as exc:  # a hook that cannot start must not stop the training
        _reason = f"the smdebug hook could not start ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        _say(f"debugger: off: {_reason}")
        return None
    # Set the mode from model.training before smdebug's own pre-hook counts the step.
    model.register_forward_pre_hook(
        lambda module, _: hook.set_mode(modes.TRAIN if module.training else modes.EVAL))
    hook.register_module(model)
    _hook, _modes = hook, modes
    _reason = ""
    _say(f"debugger: smdebug {smdebug.__version__} hook on, trial in {_trial_dir}")
    return hook


def pause() -> None:
    """Record no more steps (the hook stays open for finish): the trial holds one training run."""
    global _paused
    _paused = True


def record(mode: str, loss) -> None:
    """One step's loss (a 0-d tensor) under `mode` ("train" or "validation")."""
    if _hook is None or _paused:
        return
    _hook.record_tensor_value(tensor_name=f"loss_{mode}", tensor_value=loss.detach().float().mean())


def learning_rate(lr: float) -> None:
    """The learning rate of this training step, saved when the hook saves the weights (the same
    steps on SageMaker, where the DebuggerHookConfig sets that interval)."""
    if _hook is None or _paused:
        return
    from smdebug.core.collection import CollectionKeys

    mode = _modes.TRAIN
    if _hook.get_collection(CollectionKeys.WEIGHTS).save_config.should_save_step(mode, _hook.mode_steps[mode]):
        _hook.save_scalar("learning_rate", float(lr))


def summarize_trial(path: Path) -> dict:
    """A saved trial -> {"losses": {mode: [[step, value]]}, "learning_rate": [[step, lr]],
    "gradients": {...}, "tensors": {...}}."""
    import numpy as np
    from smdebug.trials import create_trial
    trial = create_trial(str(path))
    losses = {}
    for mode_name in ("train", "validation"):
        for name in trial.tensor_names(regex=f"^loss_{mode_name}"):  # smdebug adds "_output_0"
            tensor = trial.tensor(name)
            losses[mode_name] = [[int(s), float(np.asarray(tensor.value(s)))] for s in tensor.steps()]
    learning_rate = []
    for name in trial.tensor_names(regex=r"^scalar/learning_rate$"):  # save_scalar's "scalar/" prefix
        tensor = trial.tensor(name)
        learning_rate = [[int(s), float(np.asarray(tensor.value(s)).ravel()[0])] for s in tensor.steps()]
    gradients, tensors = {}, {}
    for name in trial.tensor_names(collection="gradients"):
        tensor = trial.tensor(name)
        gradients[name] = [[int(s), float(np.mean(np.abs(tensor.value(s))))] for s in tensor.steps()]
    for name in trial.tensor_names(collection="weights") + trial.tensor_names(collection="gradients"):
        tensor = trial.tensor(name)
        # The non-finite values themselves, so that ExplodingTensor sees exactly what was saved.
        points = []
        for step in tensor.steps():
            values = np.asarray(tensor.value(step), dtype=np.float64).ravel()
            bad = values[~np.isfinite(values)]
            points.append([int(step), bad.tolist() or [0.0]])
        tensors[name] = points
    return {"losses": losses, "learning_rate": learning_rate, "gradients": gradients, "tensors": tensors}


def finish(model_dir: Path) -> dict:
    """Close the trial, read it back and write model_dir/debugger.json; returns what it wrote."""
    if _rank != 0:
        return {}
    if _hook is None:
        summary = {"status": "missing", "reason": _reason}
    else:
        try:
            _hook.close()
            import smdebug
            summary = {"status": "recorded", "smdebug": smdebug.__version__, "trial": str(_trial_dir),
                       "interval": _interval(), **summarize_trial(_trial_dir)}
            if _paused:
                summary["scope"] = "the first tail's training (train.py --tails trains the others beside or after it)"
        except Exception as exc:  # a trial that cannot be read back is reported, never fatal
            summary = {"status": "missing", "reason": f"the trial could not be read back "
                                                       f"({type(exc).__name__}: {exc})"}
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    (Path(model_dir) / "debugger.json").write_text(json.dumps(summary) + "\n")
    _say(f"debugger: {summary['status']}" + (f" ({summary['reason']})" if summary.get("reason") else ""))
    return summary
