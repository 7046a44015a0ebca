"""VideoMAEv2 ViT in Flax against the independent PyTorch reference in torch_vit.py."""

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from signnet_jax import sharding
from signnet_jax.models import vit
from tests.models import torch_vit
from tests.models.helpers import (
    assert_attention_kernels_agree,
    flax_twin,
    random_clip,
    rel_err,
    torch_logits,
)


@pytest.mark.parametrize("preset", ["S", "B"])
@pytest.mark.parametrize("frames", [16, 32])
def test_float32_logits_match_pytorch(preset, frames):
    tmodel = torch_vit.make(preset, num_classes=11, num_frames=frames, img_size=48, seed=1)
    model = flax_twin(tmodel, preset, 11, frames, 48)
    clip = random_clip(2, frames, 48)
    ref = torch_logits(tmodel, clip)
    out = np.asarray(model(jnp.asarray(clip)))
    assert out.dtype == np.float32
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.heavy
def test_float32_logits_match_pytorch_full_224():
    tmodel = torch_vit.make("S", num_classes=7, num_frames=16, img_size=224, seed=2)
    model = flax_twin(tmodel, "S", 7, 16, 224)
    clip = random_clip(1, 16, 224, seed=3)
    assert rel_err(model(jnp.asarray(clip)), torch_logits(tmodel, clip)) <= 1e-5


def test_layer_scale_cosine_attention_and_learned_positions_match_pytorch():
    tmodel = torch_vit.make(
        "S", 5, num_frames=4, img_size=32, init_values=0.1, cos_attn=True, learned_pos_emb=True
    )
    with torch.no_grad():  # make the gammas and scales non-trivial
        for name, p in tmodel.named_parameters():
            if "gamma" in name or name.endswith("attn.scale"):
                p.add_(torch.rand_like(p))
            if name == "blocks.1.attn.scale":  # past the clamp (4.6052) in half the heads
                p[:3] = torch.tensor([5.0, 7.0, 9.0])[:, None, None]
    model = flax_twin(tmodel, "S", 5, 4, 32)
    assert model.cfg.cos_attn and model.cfg.init_values > 0 and model.cfg.learned_pos_emb
    # the clamp's value itself: 4.6052 as written in VideoMAEv2, not log(100) = 4.605170...,
    # a difference the logits cannot show
    assert vit.MAX_LOG_LOGIT_SCALE == 4.6052
    clip = random_clip(3, 4, 32, seed=4)
    assert rel_err(model(jnp.asarray(clip)), torch_logits(tmodel, clip)) <= 1e-5


@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 2e-2), ("float16", 3e-3)])
def test_half_precision_compute_keeps_top1_and_float32_logits(dtype, tol):
    tmodel = torch_vit.make("S", num_classes=50, num_frames=16, img_size=32, seed=5)
    model = flax_twin(tmodel, "S", 50, 16, 32, dtype=dtype)
    clip = random_clip(8, 16, 32, seed=6)
    ref = torch_logits(tmodel, clip)
    out = np.asarray(model(jnp.asarray(clip)))
    assert out.dtype == np.float32
    assert rel_err(out, ref) <= tol
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
    # parameters stay float32 whatever the compute dtype
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {x.dtype for x in leaves} == {jnp.dtype("float32")}


def test_features_are_the_pooled_fc_norm_output():
    tmodel = torch_vit.make("S", num_classes=3, num_frames=4, img_size=32)
    model = flax_twin(tmodel, "S", 3, 4, 32)
    clip = random_clip(2, 4, 32)
    feats = model.forward_features(jnp.asarray(clip))
    assert feats.shape == (2, 384)
    with torch.no_grad():
        ref = tmodel.forward_features(torch.from_numpy(clip).permute(0, 4, 1, 2, 3)).numpy()
    assert rel_err(feats, ref) <= 1e-5


def test_every_layer_norm_uses_epsilon_1e_6():
    # Inputs of variance ~1e-6, where epsilon weighs as much as the variance: 1e-5 scales the
    # output by sqrt(2 / 11), 1e-7 by sqrt(2 / 1.1).
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=3, num_frames=2, img_size=16, embed_dim=32, depth=2, num_heads=2,
        mlp_dim=64,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), vit.abstract_params(cfg)
    )
    model = vit.model_from_params(cfg, params)
    x = 1e-3 * rng.standard_normal((2, 5, 32))
    norms = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.LayerNorm):
            norms[".".join(map(str, path))] = module
    assert sorted(norms) == [
        "blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "fc_norm"
    ]  # fmt: skip
    xc = x - x.mean(-1, keepdims=True)
    normalized = xc / np.sqrt((xc**2).mean(-1, keepdims=True) + 1e-6)
    for name, norm in norms.items():
        out = np.asarray(norm(jnp.asarray(x, jnp.float32)), np.float64)
        expected = normalized * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4, err_msg=name)


def test_sinusoid_table_matches_reference_and_follows_the_token_grid():
    ref = torch_vit.sinusoid_table(3136, 768)[0].numpy()
    np.testing.assert_allclose(vit.sinusoid_table(3136, 768), ref, rtol=0, atol=1e-6)
    # one model serves other clip sizes: the table is built for the actual grid (tokens in
    # time, row, column order), as the reference given a table of that grid's length
    tm = torch_vit.make("S", 4, num_frames=4, img_size=32, seed=2)
    model = flax_twin(tm, "S", 4, 4, 32)
    clip = np.random.default_rng(4).standard_normal((2, 8, 48, 32, 3)).astype(np.float32)
    tm.pos_embed = torch_vit.sinusoid_table(4 * 3 * 2, 384)
    logits = model(jnp.asarray(clip))
    assert logits.shape == (2, 4)
    assert rel_err(logits, torch_logits(tm, clip)) <= 1e-5


def test_drop_path_rates_grow_linearly_and_act_only_in_training():
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=4, num_frames=4, img_size=32, drop_path_rate=0.3, depth=4
    )
    model = vit.create_model(cfg)
    np.testing.assert_allclose([b.drop_rate for b in model.blocks], [0, 0.1, 0.2, 0.3], atol=1e-7)
    x = jnp.asarray(random_clip(16, 4, 32))
    eval_out = model(x)
    np.testing.assert_array_equal(model(x), eval_out)
    a = model(x, train=True, rngs=nnx.Rngs(dropout=0))
    b = model(x, train=True, rngs=nnx.Rngs(dropout=0))
    c = model(x, train=True, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_out) and not np.allclose(a, c)


def test_drop_path_drops_whole_samples_of_each_residual_branch():
    # DropPath as timm's: per sample, the branch is kept and scaled by 1 / (1 - p) over every
    # token and channel, or dropped whole; the residual stream itself is never dropped
    cfg = vit.ViTConfig.from_preset("S", num_classes=4, num_frames=4, img_size=32, depth=1)
    p, n = 0.3, 2000
    y = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (n, 8, 384)), jnp.float32)
    ratio = np.asarray(vit.drop_path(y, p, jax.random.key(3)) / y)
    per_sample = ratio[:, :1, :1]
    np.testing.assert_allclose(ratio, np.broadcast_to(per_sample, ratio.shape), rtol=1e-6)
    kept = np.isclose(per_sample, 1 / (1 - p), rtol=1e-6)
    assert (kept | (per_sample == 0)).all()
    dropped = 1 - kept.mean()
    assert abs(dropped - p) < 5 * np.sqrt(p * (1 - p) / n), dropped  # binomial, 5 sigma
    # a traced rate (the scanned blocks') draws the same samples
    traced = jax.jit(vit.drop_path)(y, jnp.float32(p), jax.random.key(3))
    np.testing.assert_allclose(traced, ratio * np.asarray(y), rtol=1e-6)
    # both branches of a block go through it, the residual stream does not: at rate 1 a
    # training block returns its input unchanged, with finite gradients
    cfg = vit.ViTConfig.from_preset("S", num_classes=4, num_frames=4, img_size=32, depth=1)
    gone = vit.Block(cfg, 1.0, rngs=nnx.Rngs(0), dtype=jnp.float32)
    x = y[:4]
    np.testing.assert_array_equal(gone(x, jax.random.key(0)), x)
    np.testing.assert_array_equal(gone(x, jax.random.key(0), jnp.float32(1.0)), x)
    assert not np.allclose(gone(x), x)  # no key: evaluation
    grad = jax.grad(lambda r: vit.drop_path(x, r, jax.random.key(0)).sum())(jnp.float32(1.0))
    assert np.isfinite(grad)


@pytest.mark.parametrize("policy", vit.REMAT_POLICIES)
def test_remat_gives_identical_outputs_and_gradients(policy):
    cfg = vit.ViTConfig.from_preset("S", num_classes=4, num_frames=4, img_size=32, depth=2)
    plain = vit.create_model(cfg)
    remat = vit.model_from_params(
        dataclasses.replace(cfg, remat=True, remat_policy=policy), vit.params_of(plain)
    )
    x = jnp.asarray(random_clip(2, 4, 32))

    def grads(m):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)

    np.testing.assert_allclose(plain(x), remat(x), rtol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat)), strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(remat=True),
        dict(remat=True, remat_policy="save_dots"),
        dict(cos_attn=True, learned_pos_emb=True, remat=True),
    ],
    ids=["scan", "scan+remat", "scan+remat saving dots", "scan+remat, cosine attention"],
)
def test_scanned_blocks_give_the_numbers_of_the_blocks_one_after_another(options):
    # layer scale and drop path on: the scan hands each block its own rate and key
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=4, num_frames=4, img_size=32, depth=3, init_values=0.1,
        drop_path_rate=0.5, **options,
    )  # fmt: skip
    params = vit.params_of(vit.create_model(cfg))
    # other values per block and parameter, so a block given another's weights would show
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(a.dtype), params)
    x = jnp.asarray(random_clip(4, 4, 32))
    results = {}
    for scan in (False, True):
        model_cfg = dataclasses.replace(cfg, scan_layers=scan)

        def loss(params, key, train, model_cfg=model_cfg):
            model = vit.model_from_params(model_cfg, params)
            return jnp.sum(model(x, train=train, rngs=nnx.Rngs(dropout=key)) ** 2)

        grad = jax.jit(jax.value_and_grad(loss), static_argnums=(2, 3))
        runs = ((0, True), (1, True), (0, False))
        results[scan] = [grad(params, jax.random.key(k), train) for k, train in runs]
    (trained, other_key, evaluated), scanned = results[False], results[True]
    assert not np.isclose(trained[0], other_key[0]) and not np.isclose(trained[0], evaluated[0])
    for (v1, g1), (v2, g2) in zip(results[False], scanned, strict=True):
        np.testing.assert_allclose(v2, v1, rtol=1e-5)
        named = jax.tree_util.tree_leaves_with_path(g1)
        for (path, a), b in zip(named, jax.tree.leaves(g2), strict=True):
            scale = float(np.abs(a).max())  # elements near 0 in a leaf: float32 rounding
            err = jax.tree_util.keystr(path)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale, err_msg=err)


def _kept_activations(cfg, capsys):
    """What the model's backward pass keeps of its activations (what has a token axis), as
    ``(shape, name)``: the name of a checkpoint_name, else ''."""
    graphdef, params = nnx.split(vit.create_model(cfg))
    x = jnp.asarray(random_clip(2, cfg.num_frames, cfg.img_size))
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda p: nnx.merge(graphdef, p)(x).sum(), params)
    kept = []
    for line in capsys.readouterr().out.splitlines():
        shape, how = re.match(r"f32\[([\d,]*)\] (.*)", line).groups()
        dims = tuple(int(n) for n in shape.split(",") if n)
        # weights (the arguments, and their stack in a scan) and fc_norm's (batch, ...) values
        if len(dims) >= 3 and "from the argument" not in how and "_stack" not in how:
            kept.append((dims, (re.match(r"named '(\w+)'", how) or [None, ""])[1]))
    return sorted(kept)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_a_rematerialised_block_keeps_what_its_policy_names(scan, capsys):
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=4, num_frames=4, img_size=32, depth=2, remat=True, scan_layers=scan,
        attention="explicit",
    )  # fmt: skip
    d, mlp, tokens = 384, 1536, 8  # 2 x 2 x 2 patches of 2 x 16 x 16: 1536 values each
    patches = ((2, tokens, 2 * 16 * 16 * 3), "")  # the patch embedding's input
    if scan:  # the scan's outputs: a value per block on a leading axis
        inputs = [((2, 2, tokens, d), "")]
        dots = [((2, 2, tokens, n), "") for n in (3 * d, d, mlp)]
    else:
        inputs = [((2, tokens, d), "")] * 2
        dots = [((2, tokens, n), name) for n, name in ((3 * d, "qkv"), (d, "proj"), (mlp, "fc1"))]
        dots = dots * 2
    # full: each block's input and nothing else of it
    assert _kept_activations(cfg, capsys) == sorted([patches, *inputs])
    # save_dots: also its q/k/v projection, output projection and first MLP layer
    kept = _kept_activations(dataclasses.replace(cfg, remat_policy="save_dots"), capsys)
    assert kept == sorted([patches, *inputs, *dots])
    # without remat a block keeps much more (its layer norms, attention probabilities, GELU)
    assert len(_kept_activations(dataclasses.replace(cfg, remat=False), capsys)) > 20


def test_the_scanned_blocks_body_keeps_the_named_dots(capsys, monkeypatch):
    # a scan's saved values come out nameless; with the scan run as a Python loop over the
    # same body, the names show which three outputs each scanned block keeps
    def loop(body, carry, xs):
        for i in range(len(xs[1])):  # xs: (stacked weights, rates, keys)
            carry, _ = body(carry, jax.tree.map(lambda a, i=i: a[i], xs))
        return carry, None

    monkeypatch.setattr(jax.lax, "scan", loop)
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=4, num_frames=4, img_size=32, depth=2, remat=True, scan_layers=True,
        remat_policy="save_dots", attention="explicit",
    )  # fmt: skip
    named = [(shape, name) for shape, name in _kept_activations(cfg, capsys) if name]
    assert named == sorted(
        [((2, 8, 384 * 3), "qkv"), ((2, 8, 384), "proj"), ((2, 8, 1536), "fc1")] * 2
    )


def test_scanned_blocks_stack_their_weights_in_the_compute_dtype():
    # the stack is the scan's extra copy: bfloat16 where the block casts to it anyway, float32
    # for the layer norms and cosine attention's scale, which the block uses in float32
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=4, num_frames=4, img_size=32, depth=2, dtype="bfloat16",
        scan_layers=True, init_values=0.1, cos_attn=True,
    )  # fmt: skip
    model = vit.create_model(cfg)
    jaxpr = jax.make_jaxpr(lambda x: model(x))(jnp.zeros((1, 4, 32, 32, 3))).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    xs = scan.invars[scan.params["num_consts"] + scan.params["num_carry"] :]
    shapes = sorted((str(v.aval.dtype), v.aval.shape) for v in xs)
    d, mlp = 384, 1536
    half = [(2, d), (2, d), (2, d), (2, d), (2, d), (2, d, d), (2, d, 3 * d), (2, d),
            (2, mlp), (2, d, mlp), (2, mlp, d)]  # fmt: skip
    full = [(2,), (2, d), (2, d), (2, d), (2, d), (2, 6, 1, 1)]  # rates, norms, scale
    assert shapes == sorted([("bfloat16", s) for s in half] + [("float32", s) for s in full])


def test_fresh_head_is_scaled_like_the_original():
    cfg = vit.ViTConfig.from_preset("B", num_classes=2000, num_frames=4, img_size=32, depth=1)
    head = np.asarray(vit.create_model(cfg).head.kernel[...])
    assert head.shape == (768, 2000)
    assert abs(head.std() - 0.02 * 0.001) < 0.02 * 0.001 * 0.02
    assert np.abs(head).max() <= 2 * 0.001


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=15), "num_frames=15 is not divisible by tubelet_size=2"),
        (dict(img_size=100), "img_size=100 is not divisible by patch_size=16"),
        (dict(dtype="float64"), r"dtype must be one of \('float32', 'bfloat16', 'float16'\)"),
        (
            dict(remat=True, remat_policy="dots"),
            r"remat_policy must be one of \('full', 'save_dots'\), got 'dots'",
        ),
        (
            dict(remat_policy="save_dots"),
            "^remat_policy='save_dots' says what a rematerialised block keeps: set remat=True too$",
        ),
    ],
)
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vit.ViTConfig.from_preset("S", **kwargs)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown model preset 'XL'.*S, B, L, H, g"):
        vit.ViTConfig.from_preset("XL")


def test_presets_match_the_published_sizes():
    for name, sizes in {
        "S": (384, 12, 6, 1536, 16),
        "B": (768, 12, 12, 3072, 16),
        "L": (1024, 24, 16, 4096, 16),
        "H": (1280, 32, 16, 5120, 16),
        "g": (1408, 40, 16, 6144, 14),  # vit_giant_patch14_224
    }.items():
        cfg = vit.ViTConfig.from_preset(name)
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size) == sizes
    assert vit.ViTConfig.from_preset("vit_base_patch16_224").preset == "B"
    assert vit.ViTConfig.from_preset("B", num_frames=32).num_patches == 3136
    giant = vit.ViTConfig.from_preset("vit_giant_patch14_224", num_frames=16)
    assert giant.patch_size == 14 and giant.grid == (8, 16, 16)
    assert vit.ViTConfig.from_preset("g", patch_size=16).patch_size == 16  # overrides still win


def test_run_log_names_a_preset_only_with_all_its_sizes():
    from signnet_jax.train import _model_name

    assert _model_name(vit.ViTConfig.from_preset("g")) == "ViT-g"
    assert _model_name(vit.ViTConfig.from_preset("g", patch_size=16)) == (
        "a ViT of 1408d x 40 blocks (16 heads, mlp 6144, patch 16)"
    )


def test_analytic_flops_of_vit_b_32x224():
    from signnet_jax.models.flops import forward_flops

    cfg = vit.ViTConfig.from_preset("B", num_classes=2000, num_frames=32)
    n, d = 3136, 768
    per_block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * 3072
    expected = 2 * n * 1536 * d + 12 * per_block + 2 * d * 2000
    assert forward_flops(cfg) == expected
    # the budget: about 2.7 TFLOP per training clip (3 x forward)
    assert 2.6e12 < 3 * forward_flops(cfg) < 2.8e12


def test_analytic_flops_of_the_giant_use_patch_14():
    from signnet_jax.models.flops import forward_flops

    cfg = vit.ViTConfig.from_preset("g", num_classes=710, num_frames=16)
    n, d, m = 8 * 16 * 16, 1408, 6144
    per_block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * m
    expected = 2 * n * (3 * 2 * 14 * 14) * d + 40 * per_block + 2 * d * 710
    assert forward_flops(cfg) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_explicit_attention_matches_dot_product_attention(dtype):
    assert_attention_kernels_agree("explicit", "dot_product_attention", dtype)
    with pytest.raises(ValueError, match="attention must be one of"):
        vit.ViTConfig.from_preset("S", attention="flash")


def test_analytic_flops_agree_with_the_compiler():
    """MFU's numerator: XLA's own count of the compiled forward and gradient."""
    from signnet_jax.models.flops import forward_flops

    cfg = vit.ViTConfig.from_preset("S", num_classes=10, num_frames=8, img_size=64, depth=2)
    graphdef, params = nnx.split(vit.create_model(cfg), nnx.Param)
    x = jnp.zeros((2, 8, 64, 64, 3))

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x))

    def xla_flops(fn):
        return jax.jit(fn).lower(params, x).compile().cost_analysis()["flops"]

    analytic = 2 * forward_flops(cfg)
    # XLA also counts norms, GELU and softmax (a few percent); the analytic count omits them
    assert 1.0 <= xla_flops(loss) / analytic <= 1.05
    # the gradient costs about twice the forward again (no input gradient for the pixels)
    assert 2.8 <= xla_flops(jax.grad(loss)) / analytic <= 3.05


def test_float16_is_refused_on_tpus_only():
    why = vit.unsupported_dtype("float16", "tpu")
    assert why.startswith("float16 does not run on TPUs") and "ALG_DOT_F16_F16_F32" in why
    for dtype, platform in [("bfloat16", "tpu"), ("float32", "tpu"), ("float16", "gpu"),
                            ("float16", "cpu")]:  # fmt: skip
        assert vit.unsupported_dtype(dtype, platform) is None


@pytest.mark.parametrize(
    ("choice", "backend", "dtype", "capability", "expected"),
    [
        ("auto", "cpu", "float32", None, "explicit"),
        ("auto", "cpu", "bfloat16", None, "explicit"),
        ("auto", "gpu", "bfloat16", "8.0", "cudnn"),  # A100
        ("auto", "gpu", "bfloat16", "8.9", "cudnn"),  # L4
        ("auto", "gpu", "bfloat16", "9.0", "cudnn"),  # H100
        ("auto", "gpu", "bfloat16", "10.0", "cudnn"),  # B200: compared as numbers, not text
        ("auto", "cuda", "bfloat16", "8.6", "cudnn"),
        # T4 (Colab), V100: no bfloat16 tensor cores, and XLA's attention asks for a bfloat16
        # dot with float32 results that their compiler rejects (bench/train.py --topology t4)
        ("auto", "gpu", "bfloat16", "7.5", "explicit"),
        ("auto", "gpu", "bfloat16", "7.0", "explicit"),
        ("auto", "gpu", "float32", "7.5", "dot_product_attention"),
        # float16: cuDNN from Ampere on; on a T4 / V100 XLA's attention (a float16 dot with
        # float32 results, which their tensor cores run)
        ("auto", "gpu", "float16", "8.0", "cudnn"),
        ("auto", "gpu", "float16", "7.5", "dot_product_attention"),
        ("auto", "gpu", "float16", "7.0", "dot_product_attention"),
        ("auto", "cpu", "float16", None, "explicit"),
        ("auto", "gpu", "bfloat16", None, "dot_product_attention"),  # unknown
        ("auto", "gpu", "bfloat16", "gfx90a", "dot_product_attention"),  # not CUDA
        ("auto", "gpu", "float32", "9.0", "dot_product_attention"),
        ("auto", "rocm", "bfloat16", None, "dot_product_attention"),
        ("auto", "tpu", "bfloat16", None, "dot_product_attention"),
        ("explicit", "tpu", "bfloat16", None, "explicit"),
        ("cudnn", "cpu", "float32", None, "cudnn"),
        ("cudnn", "gpu", "bfloat16", "7.5", "cudnn"),  # by name: taken as asked
    ],
)
def test_auto_attention_picks_the_kernel_per_backend(choice, backend, dtype, capability, expected):
    assert vit.attention_implementation(choice, backend, dtype, capability) == expected


def test_auto_attention_follows_the_platform_compiled_for(monkeypatch):
    cfg = vit.ViTConfig.from_preset("S", num_classes=5, num_frames=4, img_size=32, depth=1)
    model = vit.create_model(cfg)
    x = jnp.asarray(random_clip(1, 4, 32, seed=0))

    def kernel_traced():  # the explicit kernel is the only custom_vjp in the forward pass
        return "explicit" if "custom_vjp" in str(jax.make_jaxpr(model)(x)) else "xla"

    # a mesh of this host's devices: this host's kind
    with jax.set_mesh(sharding.make_mesh(1, jax.devices()[:1])):
        assert sharding.mesh_device() is jax.devices()[0]
        assert kernel_traced() == "explicit"
    # compiling for a TPU topology from this host (bench/train.py --topology): its mesh says TPU
    tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
    mesh = types.SimpleNamespace(empty=False, abstract_device=tpu)
    monkeypatch.setattr(jax.sharding, "get_abstract_mesh", lambda: mesh)
    assert sharding.mesh_device() is tpu
    assert kernel_traced() == "xla"


def test_auto_attention_takes_cudnn_for_a_gpu_node_compiled_for(monkeypatch):
    # compiling for GPUs that are not here (bench/train.py --topology h100:8): the mesh's
    # abstract device has no compute capability, the topology's own devices do
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=5, num_frames=4, img_size=32, depth=1, dtype="bfloat16"
    )
    model = vit.create_model(cfg)
    x = jnp.asarray(random_clip(1, 4, 32, seed=0))
    kind = "NVIDIA H100 80GB HBM3"
    abstract = types.SimpleNamespace(platform="gpu", device_kind=kind, num_cores=132)
    mesh = types.SimpleNamespace(empty=False, abstract_device=abstract)
    monkeypatch.setattr(jax.sharding, "get_abstract_mesh", lambda: mesh)
    monkeypatch.setattr(sharding, "_REMEMBERED", {})
    assert sharding.mesh_device() is abstract  # nothing remembered: no cuDNN without a capability
    h100 = types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability="9.0")
    other = types.SimpleNamespace(platform="gpu", device_kind="Tesla T4", compute_capability="7.5")
    assert sharding.remember_devices([h100, other]) == [h100, other]
    assert sharding.mesh_device() is h100
    # cuDNN is asked for (and, on this CPU, falls back to XLA's attention with its warning)
    monkeypatch.setattr(vit, "_CUDNN_WARNED", [])
    with pytest.warns(UserWarning, match="cuDNN flash attention is not available"):
        jax.make_jaxpr(model)(x)


def test_cudnn_attention_falls_back_to_xla_with_one_warning(monkeypatch):
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=5, num_frames=4, img_size=32, depth=2, dtype="bfloat16"
    )
    x = jnp.asarray(random_clip(2, 4, 32, seed=3))
    ref = vit.create_model(dataclasses.replace(cfg, attention="dot_product_attention"))
    params = vit.params_of(ref)
    monkeypatch.setattr(vit, "attention_implementation", lambda *a: "cudnn")
    monkeypatch.setattr(vit, "_CUDNN_WARNED", [])
    auto = vit.model_from_params(cfg, params)
    with pytest.warns(UserWarning, match="cuDNN flash attention is not available") as caught:
        out = auto(x)
    assert len(caught) == 1  # once, though every block asked for it
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref(x)))
    # asked for by name, cuDNN is not replaced behind the user's back
    named = vit.model_from_params(dataclasses.replace(cfg, attention="cudnn"), params)
    with pytest.raises(RuntimeError, match="cuDNN"):
        named(x)


def test_device_peaks_for_mfu():
    from signnet_jax.models.flops import peak_flops

    # device_kind strings as JAX reports them
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA RTX A1000") is None  # "A100" only as a whole word
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40S") is None
    assert peak_flops("Tesla T4") is None  # no bfloat16 tensor cores
    # float16 runs: the float16 tensor-core peak, which the T4 and V100 have too
    assert peak_flops("Tesla T4", "float16") == 65e12
    assert peak_flops("Tesla V100-SXM2-16GB", "float16") == 125e12
    assert peak_flops("Tesla V100-PCIE-32GB", "float16") == 112e12
    assert peak_flops("Tesla V100-SXM2-16GB") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "float16") == 989e12
    assert peak_flops("NVIDIA L4", "float16") == 121e12
    assert peak_flops("TPU v5 lite", "float16") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32") == 989e12  # against bfloat16's
    assert peak_flops("TPU v5 lite") == 197e12  # v5e, not v5p
    assert peak_flops("TPU v5") == 459e12
    assert peak_flops("TPU v5p") == 459e12
    assert peak_flops("TPU v6 lite") == 918e12
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("TPU v4 lite") is None  # v4i: unknown, not v4's peak
    assert peak_flops("TPU v2") == 22.5e12  # one TensorCore, as JAX counts devices
    assert peak_flops("cpu") is None
