"""The training core: a run's settings (config), its folder (run_dir), resume rules (resume),
data and model (run_data, user_model), the update and epoch loop (trainer) with its events and
callbacks, and one run end to end (session). Names load on first use: torch only when needed."""
import importlib

_NAMES = {
    "TrainConfig": "config", "DEFAULT_EIG_SAMPLES": "config", "DEFAULT_EIG_METHOD": "config",
    "DEFAULT_MODELS": "config", "METHODS": "config",
    "CHECKPOINT_DIR": "run_dir", "WEIGHTS_FILE": "run_dir", "RUN_FILES": "run_dir", "REPLACED_DIR": "run_dir",
    "check_out_dir": "run_dir", "prepare_out_dir": "run_dir", "open_writer": "run_dir",
    "LocalOutputs": "outputs",
    "resumed_options": "resume", "refuse_finished": "resume",
    "Trainer": "trainer", "StopRequested": "trainer",
    "Event": "events", "Callback": "events",
    "Session": "session", "train": "session", "finish": "session",
    "check_model_fits": "user_model", "check_no_arguments_needed": "user_model",
    "epoch_line": "progress", "format_summary": "progress",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"hvd_abs.training.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'hvd_abs.training' has no attribute {name!r}")
