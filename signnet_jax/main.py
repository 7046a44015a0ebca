"""python -m signnet_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Flags only: config.mode 'train' runs train_and_evaluate, 'eval' tests the
checkpoint in the workdir (or config.init_from).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from signnet_jax import evaluate, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file from configs/")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs and metrics")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    # Library INFO logs (orbax, grain) would drown the progress lines.
    logging.set_verbosity(logging.WARNING)
    if config.distributed.initialize:
        kwargs = {}
        if config.distributed.coordinator_address:
            kwargs = dict(
                coordinator_address=config.distributed.coordinator_address,
                num_processes=config.distributed.num_processes,
                process_id=config.distributed.process_id,
            )
        # CPU processes need a collectives backend (multi-process tests on one machine);
        # TPU and GPU clients ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
    try:
        if config.mode == "train":
            train.train_and_evaluate(config, _WORKDIR.value)
        elif config.mode == "eval":
            evaluate.evaluate(config, _WORKDIR.value)
        else:
            raise train.TrainingError(f"config.mode must be 'train' or 'eval', got {config.mode!r}")
    except train.TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
