"""The VideoMAEv2 fine-tuning optimisation recipe in optax and jax.

AdamW with layer-wise learning-rate decay and no weight decay on 1-D parameters
(biases, norms, q/v biases, layer scale) or the position table; the per-step
schedule of the original (linear warmup, then cosine); soft-target cross
entropy with label smoothing; batch-mode mixup / cutmix on the device with one
cutmix box for every frame of every clip; dynamic loss scaling for float16 compute, as
DeepSpeed's loss scaler does it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def lr_schedule(
    base_lr: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float,
) -> np.ndarray:
    """Learning rate of every update: linspace warmup (both ends included), then cosine.

    The same values as VideoMAEv2's ``utils.cosine_scheduler``.
    """
    warmup = np.linspace(warmup_lr, base_lr, warmup_steps) if warmup_steps > 0 else np.zeros(0)
    n = total_steps - warmup_steps
    if n <= 0:
        raise ValueError(
            f"the schedule has {total_steps} steps but {warmup_steps} warmup steps; "
            "lower optim.warmup_epochs or raise optim.epochs"
        )
    i = np.arange(n)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1 + np.cos(np.pi * i / n))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def path_name(path: tuple) -> str:
    """'blocks.3.attn.qkv.kernel' from a jax tree path of a nested params dict."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def layer_id(name: str, depth: int) -> int:
    """VideoMAEv2's layer index: patch embedding / positions 0, block i -> i + 1, rest depth + 1."""
    if name.startswith(("patch_embed", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def lr_scales(params: Any, depth: int, layer_decay: float) -> Any:
    """Per-parameter learning-rate multipliers: layer_decay ** (depth + 1 - layer id)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: float(layer_decay ** (depth + 1 - layer_id(path_name(p), depth))), params
    )


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: parameters of 2+ dims except the position table."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: len(x.shape) > 1 and not path_name(p).startswith("pos_embed"), params
    )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    base_lr: float  # already scaled by batch / 256
    min_lr: float
    warmup_lr: float
    total_steps: int
    warmup_steps: int
    weight_decay: float
    layer_decay: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 0.0
    grad_accum: int = 1


def make_optimizer(cfg: OptimConfig, params: Any, depth: int) -> optax.GradientTransformation:
    """AdamW with the per-step schedule and layer-wise decay of the recipe.

    Update: p <- p - lr_t * scale_p * (adam_p + wd * p [where decayed]), as torch AdamW
    with the original's param groups (``lr = schedule[t] * lr_scale``).
    """
    schedule = jnp.asarray(
        lr_schedule(cfg.base_lr, cfg.min_lr, cfg.total_steps, cfg.warmup_steps, cfg.warmup_lr),
        jnp.float32,
    )

    def lr_at(count):
        return schedule[jnp.minimum(count, schedule.shape[0] - 1)]

    scales = lr_scales(params, depth, cfg.layer_decay)
    parts = []
    if cfg.clip_grad > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params)),
        _scale_by_tree(scales),
        optax.scale_by_schedule(lambda count: -lr_at(count)),
    ]
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by its own constant (the layer-decay lr scale)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum(targets * log_softmax(logits))."""
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32)), -1))


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jax.nn.one_hot(labels, num_classes) * (on - off) + off


@dataclasses.dataclass(frozen=True)
class MixupConfig:
    mixup: float = 0.8  # Beta alpha of mixup; 0 disables
    cutmix: float = 1.0  # Beta alpha of cutmix; 0 disables
    prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of cutmix when both are on
    label_smoothing: float = 0.1
    # clips that mix with each other, with their own lambda and box, as one GPU's batch in
    # the original; 0: the whole batch is one group
    group_size: int = 0

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


def mixup_cutmix(
    key: jax.Array, clips: jax.Array, labels: jax.Array, num_classes: int, cfg: MixupConfig
) -> tuple[jax.Array, jax.Array]:
    """Batch-mode mixup / cutmix (timm semantics) on ``(B, T, H, W, C)`` clips.

    Each clip is mixed with its group reversed (``cfg.group_size`` consecutive clips, the
    whole batch by default). Per group, one lambda; cutmix cuts one box (the same for every
    frame and clip of the group) and corrects lambda to the box's true area.

    Returns:
      (mixed clips, soft targets (B, num_classes) float32).

    Raises:
      ValueError: a group size that does not divide the batch.
    """
    targets = smooth_one_hot(labels, num_classes, cfg.label_smoothing)
    if not cfg.enabled:
        return clips, targets
    b = clips.shape[0]
    group = cfg.group_size or b
    if b % group:
        raise ValueError(f"mixup group size {group} does not divide the batch of {b} clips")
    if group == b:
        return _mix_group(key, clips, targets, cfg)
    n = b // group
    # Groups of consecutive rows: with a group per device's rows, no clip leaves its device.
    mixed, mixed_targets = jax.vmap(lambda k, c, t: _mix_group(k, c, t, cfg))(
        jax.random.split(key, n),
        clips.reshape(n, group, *clips.shape[1:]),
        targets.reshape(n, group, num_classes),
    )
    return mixed.reshape(clips.shape), mixed_targets.reshape(targets.shape)


def _mix_group(
    key: jax.Array, clips: jax.Array, targets: jax.Array, cfg: MixupConfig
) -> tuple[jax.Array, jax.Array]:
    """One group's mixing: ``mixup_cutmix`` for a batch that is one group."""
    k_apply, k_switch, k_lam_m, k_lam_c, k_y, k_x = jax.random.split(key, 6)
    apply = jax.random.uniform(k_apply) < cfg.prob
    if cfg.mixup > 0 and cfg.cutmix > 0:
        use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
    else:
        use_cutmix = jnp.asarray(cfg.cutmix > 0)
    lam_mix = jax.random.beta(k_lam_m, cfg.mixup, cfg.mixup) if cfg.mixup > 0 else 1.0
    lam_cut = jax.random.beta(k_lam_c, cfg.cutmix, cfg.cutmix) if cfg.cutmix > 0 else 1.0
    _, _, h, w, _ = clips.shape
    # timm rand_bbox: a box of sqrt(1 - lam) of each side around a uniform centre
    cut_rat = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (h * cut_rat).astype(jnp.int32), (w * cut_rat).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)

    flipped = clips[::-1]
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    box = box[None, None, :, :, None] & apply & use_cutmix
    mixed = jnp.where(
        apply & ~use_cutmix,
        clips * lam.astype(clips.dtype) + flipped * (1 - lam).astype(clips.dtype),
        clips,
    )
    mixed = jnp.where(box, flipped, mixed)
    return mixed, targets * lam + targets[::-1] * (1 - lam)


def steps_for(
    num_videos: int, batch_size: int, epochs: int, warmup_epochs: int
) -> tuple[int, int, int]:
    """(updates per epoch, total updates, warmup updates) as the original counts them."""
    per_epoch = num_videos // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {num_videos} training videos; "
            "lower data.batch_size"
        )
    return per_epoch, per_epoch * epochs, per_epoch * warmup_epochs


def scaled_lrs(
    base_lr: float, min_lr: float, warmup_lr: float, batch_size: int
) -> tuple[float, float, float]:
    """All three learning rates scaled by total batch / 256, as the original does."""
    s = batch_size / 256
    return base_lr * s, min_lr * s, warmup_lr * s


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    return jax.tree.map(lambda e, p: e * decay + p * (1 - decay), ema, params)


def is_finite(*trees: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# --- dynamic loss scaling (float16) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling by DeepSpeed's rule, with the settings of VideoMAEv2's DeepSpeed
    config (``fp16``: ``initial_scale_power`` 7, ``loss_scale_window`` 128, DeepSpeed's
    default ``hysteresis`` 2 and ``min_loss_scale`` 1), under which SignNet trained.

    The loss is multiplied by ``scale`` before the backward pass so that small float16
    gradients do not flush to zero, and the gradients divided by it again. An update whose
    gradients overflow is skipped; the scale halves on an overflow once ``hysteresis``
    overflows have used up their allowance (each overflow before that only spends one), and
    doubles, restoring the allowance, every ``window`` updates after the last overflow.
    torch's GradScaler is the same rule with hysteresis 1 (init 65536, window 2000), except
    that it has no minimum scale and never stops.
    """

    init: float = 2.0**7
    window: int = 128
    hysteresis: int = 2
    min_scale: float = 1.0
    factor: float = 2.0

    def __post_init__(self):
        if not (np.isfinite(self.init) and self.init >= self.min_scale):
            raise ValueError(
                f"optim.loss_scale must be a finite number >= {self.min_scale:g}, got {self.init}"
            )
        if self.window < 1 or self.hysteresis < 1:
            raise ValueError(
                "optim.loss_scale_window and optim.loss_scale_hysteresis must be >= 1, got "
                f"{self.window} and {self.hysteresis}"
            )


def loss_scale_init(cfg: LossScaleConfig) -> dict[str, jax.Array]:
    """The scale, the overflows it still allows before halving, and the updates since the
    last overflow modulo the window (DeepSpeed's ``cur_iter - last_overflow_iter``)."""
    return {
        "scale": jnp.float32(cfg.init),
        "hysteresis": jnp.int32(cfg.hysteresis),
        "since_overflow": jnp.int32(1 % cfg.window),
    }


def loss_scale_update(
    state: dict[str, jax.Array], overflow: jax.Array, cfg: LossScaleConfig
) -> tuple[dict[str, jax.Array], jax.Array]:
    """DeepSpeed's ``DynamicLossScaler.update_scale`` after one update.

    Returns:
      ``(new state, at_minimum)``: ``at_minimum`` where the gradients overflowed with the
      scale already at ``min_scale`` and no allowance left (DeepSpeed stops the run there).
    """
    scale, hyst, since = state["scale"], state["hysteresis"], state["since_overflow"]
    shrink = overflow & ((cfg.hysteresis == 1) | (hyst == 1))
    grow = ~overflow & (since == 0)
    new_scale = jnp.where(
        shrink,
        jnp.maximum(scale / jnp.float32(cfg.factor), jnp.float32(cfg.min_scale)),
        jnp.where(grow, scale * jnp.float32(cfg.factor), scale),
    )
    new_hyst = jnp.where(
        overflow & ~shrink, hyst - 1, jnp.where(grow, jnp.int32(cfg.hysteresis), hyst)
    )
    new_since = jnp.where(overflow, 1 % cfg.window, (since + 1) % cfg.window)
    new = {"scale": new_scale, "hysteresis": new_hyst, "since_overflow": new_since}
    return new, shrink & (scale <= cfg.min_scale)


def skipped_update(old: Any, new: Any) -> Any:
    """The optimizer state after an update skipped for overflow.

    Adam's moments and step count stay as they were, as when DeepSpeed skips the optimizer's
    step; the learning-rate schedule moves on one step, as the original's per-iteration
    schedule does. With gradient accumulation the counters move on (``new``'s)
    and the accumulator starts empty, as after any update (``new``'s would be 0 x inf).
    """
    if isinstance(new, optax.MultiStepsState):
        return new._replace(
            inner_opt_state=skipped_update(old.inner_opt_state, None),
            acc_grads=jax.tree.map(jnp.zeros_like, new.acc_grads),
        )

    def advance(s):
        if isinstance(s, optax.ScaleByScheduleState):
            return s._replace(count=optax.safe_increment(s.count))
        return s

    return jax.tree.map(advance, old, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
