"""The published configs hold the published recipe ($SIGNNET_SHARED/DESIGN.md, "Facts to match")."""

import importlib

import pytest

from signnet_jax import optim, train

PUBLISHED = ("wlasl2000", "wlasl1000", "wlasl300", "wlasl100", "asl_citizen")


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def _docstring(name):
    return importlib.import_module(f"configs.{name}").__doc__


@pytest.mark.parametrize("name", PUBLISHED)
def test_model_is_vit_b_32_frames_224_px(name):
    m = _config(name).model
    assert (m.preset, m.num_frames, m.img_size) == ("B", 32, 224)
    assert (m.drop_path_rate, m.head_drop_rate, m.init_scale) == (0.3, 0.0, 0.001)
    # no size override: the preset's dimensions
    assert (m.embed_dim, m.depth, m.num_heads, m.mlp_dim) == (0, 0, 0, 0)


@pytest.mark.parametrize("name", PUBLISHED)
def test_model_config_built_from_it_is_the_published_vit_b(name):
    cfg = train.model_config(_config(name), num_classes=2000)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (768, 12, 12, 3072)
    assert (cfg.patch_size, cfg.tubelet_size, cfg.num_frames, cfg.img_size) == (16, 2, 32, 224)
    assert (cfg.drop_path_rate, cfg.init_scale) == (0.3, 0.001)
    # VideoMAEv2 fine-tuning defaults: no layer scale, no cosine attention, fixed sinusoid table
    assert (cfg.init_values, cfg.cos_attn, cfg.learned_pos_emb) == (0.0, False, False)
    # how the step runs is the config's, unrolled blocks by default
    assert (cfg.remat, cfg.remat_policy, cfg.scan_layers) == (False, "full", False)
    config = _config(name)
    config.model.update(remat=True, remat_policy="save_dots", scan_layers=True)
    cfg = train.model_config(config, num_classes=2000)
    assert (cfg.remat, cfg.remat_policy, cfg.scan_layers) == (True, "save_dots", True)
    config.model.remat = False  # a policy is of remat: named with its key
    with pytest.raises(train.TrainingError, match="^config.model: remat_policy='save_dots' .*"
                       "set remat=True too$"):  # fmt: skip
        train.model_config(config, num_classes=2000)


@pytest.mark.parametrize("name", PUBLISHED)
def test_data_recipe(name):
    d = _config(name).data
    assert (d.sampling_rate, d.short_side_size) == (2, 224)
    assert d.repeated_aug == 2
    assert tuple(d.crop_scale) == (0.08, 1.0)
    assert d.flip == "plain"
    assert d.rand_augment == "rand-m7-n4-mstd0.5-inc1"
    assert d.reprob == 0.25
    # the headline "3-crop" test: 3 temporal clips x 1 spatial crop
    assert (d.test_num_segment, d.test_num_crop) == (3, 1)


@pytest.mark.parametrize("name", PUBLISHED)
def test_optimiser_recipe(name):
    c = _config(name)
    o = c.optim
    assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)
    assert (o.weight_decay, o.layer_decay) == (0.1, 0.9)
    assert (o.epochs, o.warmup_epochs) == (50, 5)
    assert (o.clip_grad, o.grad_accum, o.ema_decay) == (0.0, 1, 0.0)
    # The config holds the unscaled rates; train.py scales them by total batch / 256
    # (optim.scaled_lrs), SignNet's 16 videos giving a peak of 6.25e-5.
    assert (o.base_lr, o.min_lr) == (1e-3, 1e-6)
    assert c.data.batch_size == 16
    lr, min_lr, _ = optim.scaled_lrs(o.base_lr, o.min_lr, o.warmup_lr, c.data.batch_size)
    assert (lr, min_lr) == (6.25e-5, 6.25e-8)


@pytest.mark.parametrize("name", PUBLISHED)
def test_loss_recipe(name):
    lo = _config(name).loss
    assert lo.label_smoothing == 0.1
    assert (lo.mixup, lo.cutmix, lo.switch_prob, lo.mixup_prob) == (0.8, 1.0, 0.5, 1.0)


@pytest.mark.parametrize("name", PUBLISHED)
def test_splits_never_select_on_test(name):
    # WLASL's "revised" sets validated on the test split; checkpoints are picked on val only
    c = _config(name)
    assert (c.train_split, c.val_split, c.test_split) == ("train", "val", "test")
    assert c.mode == "train"


@pytest.mark.parametrize("name", PUBLISHED[1:])
def test_variants_change_nothing_but_what_their_docstring_says(name):
    # WLASL100/300/1000 are "the WLASL2000 recipe" (the class count comes from the records);
    # ASL-Citizen only states the head reset (the K710 head has 710 Kinetics classes).
    base, variant = _config("wlasl2000").to_dict(), _config(name).to_dict()
    assert variant == base
    assert _config(name).init_reset_head is True


@pytest.mark.parametrize(
    ("name", "first_line"),
    [
        *[
            (
                f"wlasl{k}",
                f"python -m signnet_jax.main --config configs/wlasl{k}.py "
                f"--workdir runs/wlasl{k} --config.records_dir=records/wlasl{k} "
                "--config.init_from=runs/asl_citizen",
            )
            for k in (100, 300, 1000, 2000)
        ],
        (
            "asl_citizen",
            "python -m signnet_jax.main --config configs/asl_citizen.py "
            "--workdir runs/asl_citizen --config.records_dir=records/asl_citizen "
            "--config.init_from=ckpt/vit_b_k710",
        ),
    ],
)
def test_docstring_command_follows_the_init_chain(name, first_line):
    # K710 distilled ViT-B -> fine-tuned on ASL-Citizen -> fine-tuned on WLASL-K
    doc = _docstring(name)
    assert doc.splitlines()[0] == first_line
    if name == "asl_citizen":
        assert "2,731 glosses" in doc and "vit_b_k710_dl_from_giant.pth" in doc
    elif name != "wlasl2000":
        k = name.removeprefix("wlasl")
        assert f"first {k} glosses of WLASL_v0.3.json): the WLASL2000 recipe" in doc


@pytest.mark.parametrize("name", (*PUBLISHED, "smoke"))
def test_every_config_is_within_the_checked_ranges(name):
    # the start-up range check must accept every shipped config as it is
    for mode in ("train", "eval"):
        train.check_value_ranges(_config(name), mode)
