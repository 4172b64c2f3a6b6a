"""The training loop's state and its Orbax checkpoints: a resumed run ends with the same parameters as an
uninterrupted one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..host_memory import release_host_memory, save_concurrent_gb


class TrainingError(RuntimeError):
    pass


def checkpoint_manager(directory, keep=2, state=None):
    """An Orbax manager of training checkpoints in `directory`; `state`: what it will save (arrays, or
    ShapeDtypeStructs with their shardings), which sets how much Orbax writes at once (`save_concurrent_gb`)."""
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb(state))
    return ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep),
                                 item_handlers={"state": state, "history": ocp.JsonCheckpointHandler()})


def _save(manager, step, state, history):
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               history=ocp.args.JsonSave(history)))
    manager.wait_until_finished()


def _restore(manager, target):
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    try:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                            history=ocp.args.JsonRestore()))
    except ValueError as e:
        if "tree structures do not match" not in str(e):
            raise
        raise TrainingError(f"{manager.directory} holds a training checkpoint (step {step}) of other trained "
                            f"parameters than these (another `trainable`, `freeze` or block, or a checkpoint "
                            f"written before trained parameters were a set): resume it with the settings it was "
                            f"written with, or start in an empty directory") from None
    return out["state"], out["history"]


@dataclasses.dataclass
class LoopState:
    """What a training checkpoint holds: the trained parameters, their optimizer state, the best parameters so far,
    the data position (batches consumed) and the history."""

    trained: dict
    opt_state: object
    best: dict
    micro: int = 0
    history: dict = dataclasses.field(default_factory=lambda: {"train": [], "valid": [], "best_step": 0,
                                                               "best_valid": None, "wall_s": 0.0})

    def arrays(self) -> dict:
        """The arrays a checkpoint holds; `best` only where it is not the trained parameters themselves (training
        without validation), which would write the block twice."""
        arrays = {"trained": self.trained, "opt_state": self.opt_state, "micro": np.asarray(self.micro, np.int64)}
        if self.best is not self.trained:
            arrays["best"] = self.best
        return arrays


class Checkpoints:
    """The loop state's Orbax checkpoints in `directory` (none without a directory). A directory that already holds
    one is refused unless `resume`. `state`: the arrays it will save (or their ShapeDtypeStructs), for Orbax's write
    limit (`checkpoint_manager`)."""

    def __init__(self, directory, resume: bool, state=None):
        self.directory, self.resume = directory, resume
        self.manager = checkpoint_manager(directory, state=state) if directory else None
        self.last_good = self.manager.latest_step() if self.manager is not None else None
        if self.last_good is not None and not resume:
            raise TrainingError(f"{directory} already holds a training checkpoint (step {self.last_good}); "
                                f"pass resume=True to continue it, or use an empty directory")

    def restore(self, state: LoopState) -> None:
        """Load the latest checkpoint into `state`, when resuming and there is one."""
        if self.manager is None or not self.resume:
            return
        restored = _restore(self.manager, state.arrays())
        if restored is not None:
            arrays, state.history = restored
            state.trained, state.opt_state = arrays["trained"], arrays["opt_state"]
            state.best = arrays.get("best", state.trained)
            state.micro = int(arrays["micro"])

    def save(self, step, state: LoopState) -> None:
        if self.manager is None:
            return
        if self.manager.latest_step() != step:
            _save(self.manager, step, state.arrays(), state.history)
            release_host_memory()  # Orbax's host copies of what it wrote
        self.last_good = step

    def where(self) -> str:
        """Where the last good checkpoint is, for an error."""
        if self.last_good is None:
            return "no checkpoint was saved"
        return f"the last good checkpoint is step {self.last_good} in {self.directory}"
