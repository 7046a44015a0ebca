"""Recipe parity: 10 training steps against the PyTorch reference driven like VideoMAEv2.

The PyTorch side is written independently here, as the original fine-tuning does it:
param groups with layer-wise lr scales and no weight decay on 1-D parameters, the
per-step cosine schedule, AdamW, soft-target cross entropy with label smoothing.
Augmentation and mixing are off and the batch is fixed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from signnet_jax import optim, sharding, train
from tests.models import torch_vit
from tests.models.helpers import flax_twin

CLASSES, FRAMES, SIZE, BATCH, STEPS = 7, 4, 32, 4, 10
BASE_LR, MIN_LR, WD, DECAY, SMOOTH = 5e-4, 1e-6, 0.1, 0.75, 0.1
TOTAL, WARMUP = 20, 3


def cosine_scheduler(base, final, total_iters, warmup_iters, start_warmup):
    warmup = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    cos = np.array(
        [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(iters))) for i in iters]
    )
    return np.concatenate((warmup, cos))


def layer_id_for_vit(name, num_max_layer):
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_max_layer - 1


def torch_losses(model, clip, labels):
    depth = len(model.blocks)
    scales = [DECAY ** (depth + 1 - i) for i in range(depth + 2)]
    groups = {}
    for name, p in model.named_parameters():
        decay = not (p.ndim == 1 or name.endswith(".bias") or name == "pos_embed")
        lid = layer_id_for_vit(name, depth + 2)
        g = groups.setdefault(
            (lid, decay),
            {"params": [], "weight_decay": WD if decay else 0.0, "lr_scale": scales[lid]},
        )
        g["params"].append(p)
    opt = torch.optim.AdamW(list(groups.values()), lr=BASE_LR, betas=(0.9, 0.999), eps=1e-8)
    schedule = cosine_scheduler(BASE_LR, MIN_LR, TOTAL, WARMUP, 0.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    x = (torch.from_numpy(clip).permute(0, 4, 1, 2, 3).float() / 255.0 - mean) / std
    off = SMOOTH / CLASSES
    target = torch.full((BATCH, CLASSES), off)
    target[torch.arange(BATCH), torch.from_numpy(labels).long()] = 1.0 - SMOOTH + off
    losses = []
    model.train()
    for it in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = schedule[it] * g["lr_scale"]
        loss = torch.sum(-target * torch.log_softmax(model(x), dim=-1), dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def test_ten_steps_match_pytorch(tmp_path):
    tmodel = torch_vit.make("S", CLASSES, num_frames=FRAMES, img_size=SIZE, seed=11)
    model = flax_twin(tmodel, "S", CLASSES, FRAMES, SIZE)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (BATCH, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)

    # the trainer's own step, optimiser and loss, on one device, mixing and erasing off
    config = train_config()
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    setup = train.Setup(
        model.cfg, [str(i) for i in range(CLASSES)], {}, mesh, graphdef, None, None, ""
    )
    cfg = optim.OptimConfig(
        base_lr=BASE_LR,
        min_lr=MIN_LR,
        warmup_lr=0.0,
        total_steps=TOTAL,
        warmup_steps=WARMUP,
        weight_decay=WD,
        layer_decay=DECAY,
    )
    tx = optim.make_optimizer(cfg, params, model.cfg.depth)
    step = jax.jit(train.make_train_step(setup, config, tx, CLASSES))
    st = {"params": params, "opt_state": tx.init(params)}
    batch = {
        "clip": jnp.asarray(clip),
        "erase_box": jnp.zeros((BATCH, 4), jnp.int32),
        "label": jnp.asarray(labels),
    }
    jax_losses = []
    for i in range(STEPS):
        st, m = step(st, batch, jnp.int32(i))
        jax_losses.append(float(m["loss"]))

    ref = torch_losses(tmodel, clip, labels)
    assert ref[-1] < ref[0] - 0.05  # the steps really train
    np.testing.assert_allclose(jax_losses, ref, atol=1e-4, rtol=0)


def train_config():
    from configs import smoke

    c = smoke.get_config()
    c.loss.mixup = c.loss.cutmix = 0.0
    c.loss.label_smoothing = SMOOTH
    return c
