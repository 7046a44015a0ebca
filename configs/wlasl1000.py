"""python -m signnet_jax.main --config configs/wlasl1000.py --workdir runs/wlasl1000 --config.records_dir=records/wlasl1000 --config.init_from=runs/asl_citizen

SignNet on WLASL1000 (the first 1000 glosses of WLASL_v0.3.json): the WLASL2000 recipe.
"""

import pathlib
import sys

# configs are loaded by path; make the sibling base config importable from anywhere
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import wlasl2000  # noqa: E402


def get_config():
    return wlasl2000.get_config()
