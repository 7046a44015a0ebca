"""The recipe's optimiser pieces against hand-computed values."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from signnet_jax import optim, sharding


def test_schedule_is_linspace_warmup_then_cosine():
    s = optim.lr_schedule(base_lr=1.0, min_lr=0.1, total_steps=7, warmup_steps=3, warmup_lr=0.0)
    cos = [0.1 + 0.45 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0, *cos], rtol=1e-12)
    assert s[3] == 1.0 and s[-1] > 0.1


def test_schedule_without_enough_steps_is_an_error():
    with pytest.raises(ValueError, match="lower optim.warmup_epochs"):
        optim.lr_schedule(1.0, 0.0, total_steps=3, warmup_steps=3, warmup_lr=0.0)


def test_published_recipe_warms_up_from_zero_like_the_original():
    # VideoMAEv2's run_class_finetuning.py calls utils.cosine_scheduler(args.lr, args.min_lr,
    # args.epochs, steps, warmup_epochs=..., warmup_steps=...) without start_warmup_value
    # (default 0): the scaled --warmup_lr is never used. WLASL2000 train (14,289 videos),
    # SignNet's batch of 16 videos: 893 updates an epoch, 4465 of warmup, peak
    # 1e-3 * 16 / 256 = 6.25e-5, final 1e-6 * 16 / 256 = 6.25e-8.
    from configs import wlasl2000

    c = wlasl2000.get_config()
    o, batch = c.optim, c.data.batch_size
    assert batch == 16
    _, total, warmup = optim.steps_for(14289, batch, o.epochs, o.warmup_epochs)
    lr, min_lr, warmup_lr = optim.scaled_lrs(o.base_lr, o.min_lr, o.warmup_lr, batch)
    s = optim.lr_schedule(lr, min_lr, total, warmup, warmup_lr)
    assert (len(s), warmup) == (44650, 4465)
    assert s[0] == 0.0
    np.testing.assert_allclose(s[1], 6.25e-5 / 4464, rtol=1e-12)
    np.testing.assert_allclose(s[4464:4466], [6.25e-5, 6.25e-5], rtol=1e-12)
    last = 6.25e-8 + 0.5 * (6.25e-5 - 6.25e-8) * (1 + math.cos(math.pi * 40184 / 40185))
    np.testing.assert_allclose(s[-1], last, rtol=1e-12)


def test_learning_rates_scale_with_total_batch():
    assert optim.scaled_lrs(1e-3, 1e-6, 1e-8, 512) == (2e-3, 2e-6, 2e-8)
    assert optim.steps_for(14289, 64, 50, 5) == (223, 11150, 1115)
    with pytest.raises(ValueError, match="lower data.batch_size"):
        optim.steps_for(10, 64, 50, 5)


PARAMS = {
    "patch_embed": {"proj": {"kernel": np.zeros((2, 4, 4, 3, 8)), "bias": np.zeros(8)}},
    "blocks": {
        0: {"attn": {"qkv": {"kernel": np.zeros((8, 24))}, "q_bias": np.zeros(8)}},
        1: {"norm1": {"scale": np.zeros(8), "bias": np.zeros(8)}},
    },
    "fc_norm": {"scale": np.zeros(8)},
    "head": {"kernel": np.zeros((8, 5)), "bias": np.zeros(5)},
    "pos_embed": np.zeros((1, 4, 8)),
}


def test_layer_decay_follows_videomae_layer_ids():
    scales = optim.lr_scales(PARAMS, depth=2, layer_decay=0.5)
    # num layers = depth + 2 = 4; scale = 0.5 ** (3 - layer id)
    assert scales["patch_embed"]["proj"]["kernel"] == 0.125
    assert scales["pos_embed"] == 0.125
    assert scales["blocks"][0]["attn"]["qkv"]["kernel"] == 0.25
    assert scales["blocks"][1]["norm1"]["bias"] == 0.5
    assert scales["head"]["kernel"] == 1.0 and scales["fc_norm"]["scale"] == 1.0


def test_no_weight_decay_on_vectors_and_positions():
    mask = optim.decay_mask(PARAMS)
    assert mask["patch_embed"]["proj"]["kernel"] and mask["head"]["kernel"]
    assert mask["blocks"][0]["attn"]["qkv"]["kernel"]
    assert not mask["blocks"][0]["attn"]["q_bias"] and not mask["blocks"][1]["norm1"]["scale"]
    assert not mask["head"]["bias"] and not mask["pos_embed"]


def test_one_adamw_step_matches_the_closed_form():
    # first Adam step: m_hat / (sqrt(v_hat) + eps) = sign(g) (up to eps)
    cfg = optim.OptimConfig(
        base_lr=0.1,
        min_lr=0.0,
        warmup_lr=0.1,
        total_steps=10,
        warmup_steps=1,
        weight_decay=0.5,
        layer_decay=0.5,
    )
    params = {
        "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "blocks": {0: {"w": jnp.ones((2, 2))}},
    }
    grads = jax.tree.map(lambda x: -2.0 * x, params)
    tx = optim.make_optimizer(cfg, params, depth=1)
    updates, _ = tx.update(grads, tx.init(params), params)
    # head: scale 1, decayed: -0.1 * (-1 + 0.5 * 1) = 0.05 ; bias not decayed: 0.1
    # (float32 bias correction 1 - 0.999 costs about 1e-5 relative)
    np.testing.assert_allclose(updates["head"]["kernel"], 0.05, rtol=1e-4)
    np.testing.assert_allclose(updates["head"]["bias"], 0.1, rtol=1e-4)
    # block 0 of depth 1: layer id 1, scale 0.5 ** (2 - 1)
    np.testing.assert_allclose(updates["blocks"][0]["w"], 0.025, rtol=1e-4)


def test_label_smoothing_targets():
    t = optim.smooth_one_hot(jnp.array([2]), 4, 0.1)
    np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)


def _clips(n=4, t=2, h=8, w=8):
    # every clip constant at its own index value: mixing is readable from the pixels
    return jnp.broadcast_to(
        jnp.arange(n, dtype=jnp.float32)[:, None, None, None, None], (n, t, h, w, 1)
    )


def test_cutmix_box_is_shared_by_all_frames_and_lambda_is_its_area():
    cfg = optim.MixupConfig(mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    labels = jnp.arange(4)
    for seed in range(5):
        x, y = optim.mixup_cutmix(jax.random.key(seed), _clips(), labels, 4, cfg)
        x = np.asarray(x)
        pasted = x[0] == 3.0  # clip 0 receives clip 3 (the batch reversed)
        assert (pasted == pasted[0]).all()  # same box in every frame
        lam = 1.0 - pasted[0].mean()
        np.testing.assert_allclose(y[0], [lam, 0, 0, 1 - lam], atol=1e-6)
        np.testing.assert_allclose(np.asarray(y).sum(1), 1.0, rtol=1e-6)


def test_cutmix_box_is_timm_s_rand_bbox_of_its_draws():
    # timm's rand_bbox, by hand: sides int(side * sqrt(1 - lam)) around a uniform centre,
    # half a side (floored) each way, clipped to the frame; lambda corrected to the box
    h, w = 12, 10
    cfg = optim.MixupConfig(mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    clipped = 0
    for seed in range(12):
        key = jax.random.key(seed)
        _, _, _, k_lam, k_y, k_x = jax.random.split(key, 6)  # apply, switch, mixup's lambda
        lam = np.float32(jax.random.beta(k_lam, 1.0, 1.0))
        cy, cx = int(jax.random.randint(k_y, (), 0, h)), int(jax.random.randint(k_x, (), 0, w))
        rat = np.sqrt(np.float32(1.0) - lam)
        cut_h, cut_w = int(np.float32(h) * rat), int(np.float32(w) * rat)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        clipped += (y0, x0, y1, x1) != (cy - cut_h // 2, cx - cut_w // 2, cy + cut_h // 2,
                                        cx + cut_w // 2)  # fmt: skip
        expected = np.zeros((h, w), bool)
        expected[y0:y1, x0:x1] = True
        x, y = optim.mixup_cutmix(key, _clips(h=h, w=w), jnp.arange(4), 4, cfg)
        np.testing.assert_array_equal(np.asarray(x)[0, :, :, :, 0] == 3.0, [expected] * 2)
        lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        np.testing.assert_allclose(y[0], [lam_box, 0, 0, 1 - lam_box], atol=1e-6)
    assert clipped  # boxes over the edge were among them


def test_mixup_blends_with_the_reversed_batch():
    cfg = optim.MixupConfig(mixup=0.8, cutmix=0.0, label_smoothing=0.1)
    x, y = optim.mixup_cutmix(jax.random.key(3), _clips(), jnp.arange(4), 4, cfg)
    lam = float(1.0 - x[0, 0, 0, 0, 0] / 3.0)
    np.testing.assert_allclose(x[1], lam * 1 + (1 - lam) * 2, rtol=1e-5)
    smooth = np.asarray(optim.smooth_one_hot(jnp.arange(4), 4, 0.1))
    np.testing.assert_allclose(y, lam * smooth + (1 - lam) * smooth[::-1], rtol=1e-5)


def test_mixup_groups_mix_within_themselves_with_their_own_lambda():
    labels = jnp.arange(8)
    mix = optim.MixupConfig(mixup=0.8, cutmix=0.0, label_smoothing=0.0, group_size=4)
    x, y = optim.mixup_cutmix(jax.random.key(3), _clips(8), labels, 8, mix)
    x, y = np.asarray(x)[:, 0, 0, 0, 0], np.asarray(y)
    # group 0 is clips 0..3 mixed with 3..0, group 1 clips 4..7 with 7..4
    lam0, lam1 = 1 - x[0] / 3, (7 - x[4]) / 3
    assert abs(lam0 - lam1) > 0.05  # a lambda each
    g0, g1 = np.arange(4), np.arange(4, 8)
    np.testing.assert_allclose(x[:4], lam0 * g0 + (1 - lam0) * g0[::-1], rtol=1e-5)
    np.testing.assert_allclose(x[4:], lam1 * g1 + (1 - lam1) * g1[::-1], rtol=1e-5)
    eye = np.eye(8)
    np.testing.assert_allclose(y[:4], lam0 * eye[:4] + (1 - lam0) * eye[3::-1], atol=1e-6)
    np.testing.assert_allclose(y[4:], lam1 * eye[4:] + (1 - lam1) * eye[7:3:-1], atol=1e-6)
    # cutmix: each group pastes from its own reversed rows, in a box of its own
    cut = optim.MixupConfig(mixup=0.0, cutmix=1.0, label_smoothing=0.0, group_size=4)
    boxes = []
    for seed in range(4):
        x, _ = optim.mixup_cutmix(jax.random.key(seed), _clips(8), labels, 8, cut)
        x = np.asarray(x)[..., 0]
        assert set(np.unique(x[0])) <= {0.0, 3.0} and set(np.unique(x[4])) <= {4.0, 7.0}
        boxes.append((x[0, 0] == 3.0, x[4, 0] == 7.0))
    assert any((a != b).any() for a, b in boxes)
    # one group of the whole batch is the default
    key = jax.random.key(5)
    whole = optim.mixup_cutmix(key, _clips(8), labels, 8, optim.MixupConfig(group_size=8))
    default = optim.mixup_cutmix(key, _clips(8), labels, 8, optim.MixupConfig())
    for a, b in zip(whole, default, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="mixup group size 3 does not divide the batch of 8"):
        optim.mixup_cutmix(jax.random.key(0), _clips(8), labels, 8, optim.MixupConfig(group_size=3))


def test_mixup_groups_of_a_devices_clips_stay_on_the_device():
    mesh = sharding.make_mesh()  # the trainer's: 8 devices on the data axis
    clips = jax.device_put(_clips(16), sharding.batch_sharding(mesh, 5))
    labels = jax.device_put(jnp.arange(16), sharding.batch_sharding(mesh, 1))

    def hlo(group_size):
        cfg = optim.MixupConfig(group_size=group_size)
        fn = jax.jit(lambda k, c, y: optim.mixup_cutmix(k, c, y, 16, cfg))
        return fn.lower(jax.random.key(0), clips, labels).compile().as_text()

    assert "collective-permute" in hlo(0)  # the whole batch reversed: clips cross devices
    per_device = hlo(2)
    assert not any(op in per_device for op in ("collective-permute", "all-to-all", "all-gather"))


def _mix_draws(cfg, n, size, grouped=False):
    """n seeded mixings of clip 0 (zeros) with clip 1 (ones), as the train step mixes.

    Returns (clip 0 after mixing (n, size, size), its weight lambda on its own label (n,)).
    ``grouped``: one batch of n groups of 2 clips (``group_size``), else n batches of 2.
    """
    clips = jnp.broadcast_to(
        jnp.arange(2, dtype=jnp.float32)[:, None, None, None, None], (2, 1, size, size, 1)
    )
    labels = jnp.arange(2)
    if grouped:
        cfg = dataclasses.replace(cfg, group_size=2)
        x, y = jax.jit(
            lambda k: optim.mixup_cutmix(
                k, jnp.tile(clips, (n, 1, 1, 1, 1)), jnp.tile(labels, n), 2, cfg
            )
        )(jax.random.key(0))
        return np.asarray(x)[::2, 0, ..., 0], np.asarray(y)[::2, 0]
    x, y = jax.jit(jax.vmap(lambda k: optim.mixup_cutmix(k, clips, labels, 2, cfg)))(
        jax.random.split(jax.random.key(0), n)
    )
    return np.asarray(x)[:, 0, 0, ..., 0], np.asarray(y)[:, 0, 0]


def _recipe_mixup(**over):
    from configs import wlasl2000

    lo = wlasl2000.get_config().loss
    kw = dict(mixup=lo.mixup, cutmix=lo.cutmix, prob=lo.mixup_prob, switch_prob=lo.switch_prob)
    return optim.MixupConfig(**{**kw, "label_smoothing": 0.0, **over})


@pytest.mark.parametrize(
    ("over", "grouped"),
    [({}, False), ({}, True), ({"switch_prob": 0.25}, False), ({"prob": 0.5}, False)],
)
def test_mixup_cutmix_switch_and_gate(over, grouped):
    # The recipe (mixup 0.8, cutmix 1.0, switch 0.5, mixup_prob 1): per group, cutmix (a box
    # pasted, lambda = 1 - its area) with probability switch_prob, else mixup (a uniform blend);
    # mixup_prob gates both. 4000 draws of 32x32 clips; a cutmix box is empty (the group
    # looks unmixed) only when 1 - lambda < 1 / 256.
    cfg = _recipe_mixup(**over)
    n = 4000
    x, lam = _mix_draws(cfg, n, 32, grouped)
    binary = ((x == 0) | (x == 1)).all(axis=(1, 2))
    pasted = x == 1
    kept = binary & ~pasted.any(axis=(1, 2))
    cut, mix = binary & ~kept, ~binary
    # each cutmix draw pastes one rectangle: contiguous rows and columns, all of their product
    rows, cols = pasted[cut].any(2), pasted[cut].any(1)
    for lines in (rows, cols):
        starts = lines[:, 0].astype(int) + (lines[:, 1:] & ~lines[:, :-1]).sum(1)
        np.testing.assert_array_equal(starts, 1)
    np.testing.assert_array_equal(pasted[cut].sum((1, 2)), rows.sum(1) * cols.sum(1))
    np.testing.assert_allclose(lam[cut], 1 - pasted[cut].mean((1, 2)), atol=1e-6)
    np.testing.assert_allclose(
        x[mix], np.broadcast_to((1 - lam[mix])[:, None, None], x[mix].shape), atol=1e-6
    )
    assert ((lam[mix] > 0) & (lam[mix] < 1)).all()
    np.testing.assert_array_equal(lam[kept], 1.0)

    expected = {
        "cutmix": cfg.prob * cfg.switch_prob,
        "mixup": cfg.prob * (1 - cfg.switch_prob),
        "none": 1 - cfg.prob,
    }
    got = {"cutmix": cut.mean(), "mixup": mix.mean(), "none": kept.mean()}
    for mode, p in expected.items():
        # 4 binomial standard deviations (0.032 at p = 0.5); at least 0.006 for the empty boxes
        assert abs(got[mode] - p) <= 4 * math.sqrt(max(p * (1 - p), 0.01) / n), (mode, got)


def test_mixup_lambda_follows_beta_of_the_mixup_alpha():
    # mixup's lambda ~ Beta(0.8, 0.8): Kolmogorov-Smirnov distance of ~10,000 draws under the
    # 0.1 % critical value 1.95 / sqrt(m); Beta(1, 1) (cutmix's alpha) is at 0.037.
    x, lam = _mix_draws(_recipe_mixup(), 20000, 4)
    lam = np.sort(lam[~((x == 0) | (x == 1)).all(axis=(1, 2))]).astype(np.float64)
    m = len(lam)
    assert abs(m / 20000 - 0.5) < 0.02
    cdf = np.asarray(jax.scipy.special.betainc(0.8, 0.8, jnp.asarray(lam, jnp.float32)))
    ks = max((np.arange(1, m + 1) / m - cdf).max(), (cdf - np.arange(m) / m).max())
    assert ks < 1.95 / math.sqrt(m)


def test_mixing_off_gives_the_clips_and_smoothed_labels():
    cfg = optim.MixupConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.1)
    x, y = optim.mixup_cutmix(jax.random.key(0), _clips(), jnp.arange(4), 4, cfg)
    np.testing.assert_array_equal(x, _clips())
    np.testing.assert_allclose(y, optim.smooth_one_hot(jnp.arange(4), 4, 0.1))


def test_soft_target_cross_entropy():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    assert float(
        optim.soft_target_cross_entropy(logits, jnp.array([[1.0, 0, 0]]))
    ) == pytest.approx(math.log(2))


# --- float16 loss scaling --------------------------------------------------------------


class DeepSpeedScaler:
    """DeepSpeed's DynamicLossScaler.update_scale, written out in plain Python (consecutive
    hysteresis off, raise at the minimum scale: its defaults)."""

    def __init__(self, init, window, hysteresis, min_scale=1.0):
        self.scale, self.window, self.shift, self.min = init, window, hysteresis, min_scale
        self.hysteresis, self.iter, self.last_overflow = hysteresis, 0, -1

    def update(self, overflow):
        """The next scale and hysteresis; 'stop' where DeepSpeed raises."""
        if overflow:
            if self.shift == 1 or self.hysteresis == 1:
                if self.scale == self.min:
                    return "stop"
                self.scale = max(self.scale / 2, self.min)
            else:
                self.hysteresis -= 1
            self.last_overflow = self.iter
        elif (self.iter - self.last_overflow) % self.window == 0:
            self.hysteresis = self.shift
            self.scale *= 2
        self.iter += 1
        return self.scale, self.hysteresis


def _jax_scaler(cfg, overflows):
    update = jax.jit(lambda s, o: optim.loss_scale_update(s, o, cfg))
    state, out = optim.loss_scale_init(cfg), []
    for o in overflows:
        state, at_min = update(state, jnp.asarray(o))
        if bool(at_min):
            out.append("stop")
            break
        out.append((float(state["scale"]), int(state["hysteresis"])))
    return out


def test_loss_scale_by_hand_with_videomaes_settings():
    """2**7, window 128, hysteresis 2: the first overflow spends the allowance, the second
    halves; 128 clean updates after the last overflow double it and restore the allowance."""
    cfg = optim.LossScaleConfig()
    assert (cfg.init, cfg.window, cfg.hysteresis, cfg.min_scale) == (128.0, 128, 2, 1.0)
    got = _jax_scaler(cfg, [True, True] + [False] * 127 + [False, True, False])
    assert got[0] == (128.0, 1)  # allowance spent, scale kept
    assert got[1] == (64.0, 1)  # halved
    assert got[2:129] == [(64.0, 1)] * 127  # 127 clean updates: not yet
    assert got[129] == (128.0, 2)  # the 128th after the overflow doubles it
    assert got[130] == (128.0, 1)  # an overflow spends the allowance again
    assert got[131] == (128.0, 1)


@pytest.mark.parametrize(("window", "hysteresis"), [(3, 2), (4, 1), (2, 3), (5, 3)])
def test_loss_scale_follows_deepspeeds_rule(window, hysteresis):
    rng = np.random.default_rng(window * 10 + hysteresis)
    overflows = list(rng.random(300) < 0.3)
    ref = DeepSpeedScaler(2.0**12, window, hysteresis)
    want = []
    for o in overflows:
        want.append(ref.update(o))
        if want[-1] == "stop":
            break
    cfg = optim.LossScaleConfig(init=2.0**12, window=window, hysteresis=hysteresis)
    assert _jax_scaler(cfg, overflows) == want
    assert len({w for w in want if w != "stop"}) > 3  # the scale really moved both ways


def test_loss_scale_stops_where_deepspeed_gives_up():
    cfg = optim.LossScaleConfig(init=2.0, window=100, hysteresis=1)
    assert _jax_scaler(cfg, [True, True, True]) == [(1.0, 1), "stop"]
    with pytest.raises(ValueError, match="optim.loss_scale must be a finite number >= 1"):
        optim.LossScaleConfig(init=0.5)
    with pytest.raises(ValueError, match="optim.loss_scale_window and"):
        optim.LossScaleConfig(window=0)


@pytest.mark.parametrize("accum", [1, 2])
def test_a_skipped_update_keeps_adam_and_moves_the_schedule(accum):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    cfg = optim.OptimConfig(
        base_lr=1.0, min_lr=0.0, warmup_lr=0.0, total_steps=10, warmup_steps=2,
        weight_decay=0.1, layer_decay=1.0, grad_accum=accum,
    )  # fmt: skip
    tx = optim.make_optimizer(cfg, params, depth=0)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    state = tx.init(params)
    for _ in range(accum):  # one real update
        _, state = tx.update(grads, state, params)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.inf), grads)
    mid = state  # the last micro-step's state before the update (accum - 1 micro-steps on)
    for _ in range(accum - 1):
        _, mid = tx.update(bad, mid, params)
    _, after = tx.update(bad, mid, params)
    skipped = optim.skipped_update(mid, after)

    def parts(s):
        inner = s.inner_opt_state if accum > 1 else s
        counts = [x.count for x in jax.tree.leaves(inner, is_leaf=_is_schedule)
                  if _is_schedule(x)]  # fmt: skip
        adam = [x for x in jax.tree.leaves(inner, is_leaf=_is_adam) if _is_adam(x)]
        return counts, adam

    (count_before,), (adam_before,) = parts(state)
    (count_after,), (adam_after,) = parts(skipped)
    assert int(count_after) == int(count_before) + 1 == 2
    assert int(adam_after.count) == int(adam_before.count) == 1
    for a, b in zip(jax.tree.leaves(adam_after), jax.tree.leaves(adam_before), strict=True):
        np.testing.assert_array_equal(a, b)
    if accum > 1:  # the accumulator starts empty (the inf would make it 0 x inf = nan)
        assert int(skipped.mini_step) == 0
        for a in jax.tree.leaves(skipped.acc_grads):
            np.testing.assert_array_equal(a, 0.0)


def _is_schedule(x):
    import optax

    return isinstance(x, optax.ScaleByScheduleState)


def _is_adam(x):
    import optax

    return isinstance(x, optax.ScaleByAdamState)
