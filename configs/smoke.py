"""python -m signnet_jax.main --config configs/smoke.py --workdir runs/smoke

A whole train -> val -> checkpoint -> multi-view test cycle in a few minutes on a
CPU: a tiny ViT on a synthetic H&HT dataset (rendered signers whose head and
hands move along class-specific paths) generated into records_dir on first use.
"""

import pathlib
import sys

# configs are loaded by path; make the sibling base config importable from anywhere
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import wlasl2000  # noqa: E402


def get_config():
    c = wlasl2000.get_config()
    c.records_dir = "runs/smoke_records"
    c.smoke.enabled = True
    c.smoke.train_per_class = 48
    c.init_reset_head = False
    c.model.preset = "S"
    c.model.embed_dim = 96
    c.model.depth = 2
    c.model.num_heads = 3
    c.model.mlp_dim = 384
    c.model.num_frames = 8
    c.model.img_size = 64
    c.model.drop_path_rate = 0.0
    c.model.init_scale = 1.0  # from scratch, a full-size head learns faster
    c.model.dtype = "float32"
    c.data.batch_size = 16
    c.data.repeated_aug = 1
    # 64 px frames and direction-sensitive classes: no crop jitter, no flips
    c.data.crop_scale = (1.0, 1.0)
    c.data.flip = "none"
    c.data.rand_augment = ""
    c.data.reprob = 0.0
    c.data.short_side_size = 64
    c.data.test_num_segment = 3
    c.data.eval_batch_size = 32
    c.data.num_workers = 0
    c.data.num_threads = 2
    c.optim.base_lr = 0.016  # 1e-3 after the batch / 256 scaling
    c.optim.warmup_epochs = 1
    c.optim.epochs = 40
    c.optim.layer_decay = 1.0
    c.optim.weight_decay = 0.05
    c.loss.mixup = 0.0
    c.loss.cutmix = 0.0
    c.train.log_every = 100
    c.train.val_every_epochs = 5
    return c
