"""python -m signnet_jax.main --config configs/asl_citizen.py --workdir runs/asl_citizen --config.records_dir=records/asl_citizen --config.init_from=ckpt/vit_b_k710

SignNet on ASL-Citizen (2,731 glosses), warm-started from the VideoMAEv2 distilled
ViT-B (vit_b_k710_dl_from_giant.pth converted with signnet_jax.convert); the
model it produces is the warm start of the WLASL configs.
"""

import pathlib
import sys

# configs are loaded by path; make the sibling base config importable from anywhere
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import wlasl2000  # noqa: E402


def get_config():
    c = wlasl2000.get_config()
    c.init_reset_head = True  # the K710 head has 710 Kinetics classes
    return c
