"""Weight conversion: VideoMAEv2, DeepSpeed, pre-training and HF files -> orbax -> .pth."""

import argparse
import collections
import json
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from signnet_jax import checkpointing, convert
from signnet_jax.models import vit
from tests.helpers import interrupt_after
from tests.models import torch_vit
from tests.models.helpers import random_clip, rel_err, torch_logits, torch_state

FRAMES, SIZE, CLASSES = 4, 32, 5


@pytest.fixture(scope="module")
def tmodel():
    return torch_vit.make("S", CLASSES, num_frames=FRAMES, img_size=SIZE, seed=7)


def _run(*args: str) -> int:
    return convert.main([str(a) for a in args])


def _convert(src, out, model="S", frames=FRAMES, classes=CLASSES, *extra) -> int:
    return _run(
        "--input",
        src,
        "--output",
        out,
        "--model",
        model,
        "--num-frames",
        frames,
        "--num-classes",
        classes,
        *extra,
    )


def _flax_logits(ckpt_dir, clip):
    params, meta = checkpointing.load_model(ckpt_dir)
    model = vit.model_from_params(vit.ViTConfig.from_dict(meta["model"]), params)
    return np.asarray(model(jnp.asarray(clip))), meta


def test_videomae_pth_round_trip_is_exact(tmodel, tmp_path):
    sd = {k: torch.from_numpy(v) for k, v in torch_state(tmodel).items()}
    # a real fine-tuning checkpoint: weights under 'model', plus args and a numpy scalar
    torch.save(
        {"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": np.float64(3)},
        tmp_path / "ft.pth",
    )
    assert _convert(tmp_path / "ft.pth", tmp_path / "ckpt") == 0
    clip = random_clip(2, FRAMES, SIZE)
    out, meta = _flax_logits(tmp_path / "ckpt", clip)
    assert rel_err(out, torch_logits(tmodel, clip)) <= 1e-5
    assert meta["source"]["format"] == "videomae_v2" and meta["model"]["preset"] == "S"

    assert (
        _run("--to-pytorch", "--input", tmp_path / "ckpt", "--output", tmp_path / "back.pth") == 0
    )
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    fresh = torch_vit.make("S", CLASSES, num_frames=FRAMES, img_size=SIZE, seed=99)
    fresh.load_state_dict(back)  # strict: the export loads into the original architecture


def test_deepspeed_model_states_and_ddp_prefix(tmodel, tmp_path):
    sd = {f"module.{k}": torch.from_numpy(v) for k, v in torch_state(tmodel).items()}
    shapes = collections.OrderedDict((k, v.shape) for k, v in sd.items())
    ds = {
        "module": sd,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [shapes],
        "ds_config": {"train_batch_size": 8},
        "ds_version": "0.9.5",
        "args": argparse.Namespace(model="vit_small_patch16_224"),
        "global_steps": 10,
    }
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(ds, path)
    assert _convert(path, tmp_path / "ckpt") == 0
    clip = random_clip(1, FRAMES, SIZE, seed=1)
    assert rel_err(_flax_logits(tmp_path / "ckpt", clip)[0], torch_logits(tmodel, clip)) <= 1e-5


def test_pretraining_checkpoint_drops_decoder_and_initialises_head(tmodel, tmp_path, capsys):
    sd = {
        f"encoder.{k}": torch.from_numpy(v)
        for k, v in torch_state(tmodel).items()
        if not k.startswith(("head", "fc_norm"))
    }
    sd["encoder.norm.weight"] = torch.ones(384)
    sd["encoder.norm.bias"] = torch.zeros(384)
    sd["decoder.blocks.0.mlp.fc1.weight"] = torch.zeros(8, 4)
    sd["encoder_to_decoder.weight"] = torch.zeros(4, 384)
    sd["mask_token"] = torch.zeros(1, 1, 4)
    torch.save({"model": sd}, tmp_path / "pretrain.pth")
    assert _convert(tmp_path / "pretrain.pth", tmp_path / "ckpt", "S", 16, 300) == 0
    params, meta = checkpointing.load_model(tmp_path / "ckpt")
    assert set(meta["source"]["fresh"]) == {
        "head.weight",
        "head.bias",
        "fc_norm.weight",
        "fc_norm.bias",
    }
    assert meta["source"]["pretrain"] is True
    head = params["head"]["kernel"]
    assert head.shape == (384, 300) and 0 < head.std() < 0.02 * 0.001 * 1.1
    np.testing.assert_array_equal(params["fc_norm"]["scale"], np.ones(384, np.float32))
    ref = torch_state(tmodel)["blocks.3.mlp.fc1.weight"].T
    np.testing.assert_array_equal(params["blocks"]["3"]["mlp"]["fc1"]["kernel"], ref)
    assert "dropped 5 pre-training keys" in capsys.readouterr().err


def _hf_config(use_mean_pooling: bool, **kw):
    from transformers import VideoMAEConfig

    return VideoMAEConfig(
        image_size=SIZE,
        num_frames=FRAMES,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        qkv_bias=True,
        use_mean_pooling=use_mean_pooling,
        layer_norm_eps=1e-6,
        **kw,
    )


@pytest.mark.parametrize("safe", [True, False])
def test_huggingface_videomae_matches_transformers_logits(tmp_path, safe):
    from transformers import VideoMAEForVideoClassification

    torch.manual_seed(0)
    hf_cfg = _hf_config(True, num_labels=CLASSES)
    hf = VideoMAEForVideoClassification(hf_cfg).eval()
    with torch.no_grad():  # non-trivial biases, norms and head
        for name, p in hf.named_parameters():
            if p.ndim == 1 or name.startswith("classifier"):
                p.add_(torch.randn_like(p) * 0.05)
    if safe:
        hf.save_pretrained(tmp_path / "hf")
        src = tmp_path / "hf" / "model.safetensors"
    else:  # the older .bin format: a pickled state dict (transformers 5 no longer writes it)
        (tmp_path / "hf").mkdir()
        src = tmp_path / "hf" / "pytorch_model.bin"
        torch.save(hf.state_dict(), src)
    assert src.is_file()
    assert _convert(src, tmp_path / "ckpt") == 0
    clip = random_clip(2, FRAMES, SIZE, seed=2)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(clip).permute(0, 1, 4, 2, 3)).logits.numpy()
    out, meta = _flax_logits(tmp_path / "ckpt", clip)
    assert meta["source"]["format"] == "huggingface"
    assert rel_err(out, ref) <= 1e-5


def test_huggingface_pretraining_checkpoint_with_encoder_layernorm(tmp_path, capsys):
    # MCG-NJU/videomae-base: VideoMAEForPreTraining with use_mean_pooling=False, whose encoder
    # ends in `videomae.layernorm` (VideoMAEv2's `norm`, dropped like the decoder)
    from transformers import VideoMAEForPreTraining

    torch.manual_seed(0)
    cfg = _hf_config(
        False,
        decoder_num_hidden_layers=1,
        decoder_hidden_size=64,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=128,
    )
    hf = VideoMAEForPreTraining(cfg)
    assert "videomae.layernorm.weight" in hf.state_dict()
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert _convert(tmp_path / "hf" / "model.safetensors", tmp_path / "ckpt", "S", 16, 300) == 0
    err = capsys.readouterr().err
    # decoder: 1 layer of 15 tensors, its norm (2) and head (2); encoder_to_decoder (1, no bias);
    # mask_token (1); the encoder's layernorm (2)
    assert "dropped 23 pre-training keys (decoder, mask token, encoder norm)" in err
    params, meta = checkpointing.load_model(tmp_path / "ckpt")
    assert meta["source"]["pretrain"] is True
    assert meta["source"]["fresh"] == ["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"]
    ref = hf.state_dict()["videomae.encoder.layer.3.intermediate.dense.weight"].numpy().T
    np.testing.assert_array_equal(params["blocks"]["3"]["mlp"]["fc1"]["kernel"], ref)


def test_huggingface_encoder_with_layernorm_and_no_classifier_is_a_backbone(tmp_path, capsys):
    from transformers import VideoMAEModel

    torch.manual_seed(0)
    hf = VideoMAEModel(_hf_config(False))
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert _convert(tmp_path / "hf" / "model.safetensors", tmp_path / "ckpt") == 0
    assert "dropped 2 pre-training keys" in capsys.readouterr().err
    params, meta = checkpointing.load_model(tmp_path / "ckpt")
    assert meta["source"]["fresh"] == ["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"]
    # the encoder's weights themselves, in the Flax layouts (kernels input-first, channels last)
    hf_sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    np.testing.assert_array_equal(
        params["patch_embed"]["proj"]["kernel"],
        hf_sd["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 4, 1, 0),
    )
    np.testing.assert_array_equal(
        params["blocks"]["5"]["mlp"]["fc1"]["kernel"],
        hf_sd["encoder.layer.5.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        params["blocks"]["11"]["norm2"]["scale"], hf_sd["encoder.layer.11.layernorm_after.weight"]
    )


def test_a_model_folder_names_its_weights_file_and_suffixes_may_be_upper_case(tmp_path, capsys):
    from transformers import VideoMAEModel

    torch.manual_seed(0)
    hf = VideoMAEModel(_hf_config(False))
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert _convert(tmp_path / "hf", tmp_path / "ckpt") == 1
    assert capsys.readouterr().err == (
        f"error: input checkpoint {tmp_path / 'hf'} is a folder; give the weights file in it: "
        f"{tmp_path / 'hf' / 'model.safetensors'}\n"
    )
    assert not (tmp_path / "ckpt").exists()
    upper = tmp_path / "MODEL.SAFETENSORS"  # as some file systems and downloads name it
    (tmp_path / "hf" / "model.safetensors").rename(upper)
    assert _convert(upper, tmp_path / "ckpt") == 0
    out = tmp_path / "BACK.PTH"
    assert _run("--to-pytorch", "--input", tmp_path / "ckpt", "--output", out) == 0
    # the Hugging Face weights, back in VideoMAEv2's names and layouts
    back, hf_sd = torch.load(out, weights_only=True), hf.state_dict()

    def exact(a, b):
        assert torch.equal(a, b)

    exact(back["patch_embed.proj.weight"], hf_sd["embeddings.patch_embeddings.projection.weight"])
    query, key, value = (hf_sd[f"encoder.layer.7.attention.attention.{n}.weight"]
                         for n in ("query", "key", "value"))  # fmt: skip
    exact(back["blocks.7.attn.qkv.weight"], torch.cat([query, key, value]))
    exact(back["blocks.7.attn.q_bias"], hf_sd["encoder.layer.7.attention.attention.query.bias"])
    assert len(back) == len(torch_vit.make("S", CLASSES, FRAMES, SIZE).state_dict())


@pytest.mark.parametrize("direction", ["forward", "to-pytorch"])
def test_an_output_that_cannot_be_created_is_named_before_reading(
    tmodel, tmp_path, capsys, direction, monkeypatch
):
    torch.save(tmodel.state_dict(), tmp_path / "ft.pth")
    assert _convert(tmp_path / "ft.pth", tmp_path / "ckpt") == 0
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(convert, "read_checkpoint", lambda p: pytest.fail("input read"))
    monkeypatch.setattr(checkpointing, "load_model", lambda *a: pytest.fail("input read"))
    capsys.readouterr()
    out = tmp_path / "file" / "sub" / ("x.pth" if direction == "to-pytorch" else "x")
    if direction == "forward":
        code = _convert(tmp_path / "ft.pth", out)
    else:
        code = _run("--to-pytorch", "--input", tmp_path / "ckpt", "--output", out)
    assert code == 1
    assert capsys.readouterr().err == (
        f"error: cannot write --output {out}: {tmp_path / 'file'} is a file, not a folder; "
        "choose a folder you can write to\n"
    )


def test_hht_settings_are_recorded_for_predict(tmodel, tmp_path, capsys):
    from signnet_jax.hht.settings import HHTSettings

    torch.save(tmodel.state_dict(), tmp_path / "ft.pth")
    # none by default: predict then notes that it uses its defaults
    assert _convert(tmp_path / "ft.pth", tmp_path / "none") == 0
    assert "hht" not in checkpointing.load_model(tmp_path / "none")[1]
    for value, expected in [
        ("faithful", HHTSettings(faithful=True)),
        ("default", HHTSettings()),
    ]:
        out = tmp_path / value
        assert _convert(tmp_path / "ft.pth", out, "S", FRAMES, CLASSES, "--hht", value) == 0
        assert checkpointing.load_model(out)[1]["hht"] == expected.to_dict()
    # a records folder (or its dataset_info.json): the settings its records were built with
    records = tmp_path / "records"
    records.mkdir()
    built = HHTSettings(layout="strip", quadrants=(True, False, True, True))
    info = {"hht_settings": built.to_dict(), "splits": {}, "classes": []}
    (records / "dataset_info.json").write_text(json.dumps(info))
    for given in (records, records / "dataset_info.json"):
        out = tmp_path / f"from_{given.name}"
        assert _convert(tmp_path / "ft.pth", out, "S", FRAMES, CLASSES, "--hht", given) == 0
        assert checkpointing.load_model(out)[1]["hht"] == built.to_dict()
    capsys.readouterr()
    sizes = ("S", FRAMES, CLASSES)
    assert _convert(tmp_path / "ft.pth", tmp_path / "x", *sizes, "--hht", "fast") == 1
    assert capsys.readouterr().err == (
        "error: --hht fast: give 'faithful', 'default' or a records folder; "
        "fast/dataset_info.json does not exist\n"
    )
    info["hht_settings"] = {"layout": "ring"}
    (records / "dataset_info.json").write_text(json.dumps(info))
    assert _convert(tmp_path / "ft.pth", tmp_path / "x", *sizes, "--hht", records) == 1
    assert capsys.readouterr().err.startswith(
        f"error: --hht {records}: no usable H&HT settings (invalid HHTSettings: layout must be"
    )
    del info["hht_settings"]
    (records / "dataset_info.json").write_text(json.dumps(info))
    assert _convert(tmp_path / "ft.pth", tmp_path / "x", *sizes, "--hht", records) == 1
    assert capsys.readouterr().err == (
        f"error: --hht {records}: no usable H&HT settings ({records / 'dataset_info.json'} "
        "records none)\n"
    )
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:  # the export writes weights only
        _run("--to-pytorch", "--input", tmp_path / "faithful", "--output", tmp_path / "b.pth",
             "--hht", "faithful")  # fmt: skip
    assert e.value.code == 2
    assert "--hht: not used by --to-pytorch" in capsys.readouterr().err


def test_huggingface_classifier_without_mean_pooling_is_refused(tmp_path, capsys):
    # use_mean_pooling=False: layernorm over the tokens, then the classifier on token 0 (there
    # is no CLS token) -- not the mean pool -> fc_norm -> head this model has
    from transformers import VideoMAEForVideoClassification

    hf = VideoMAEForVideoClassification(_hf_config(False, num_labels=CLASSES))
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    src = tmp_path / "hf" / "model.safetensors"
    assert _convert(src, tmp_path / "ckpt") == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {src} is a classifier fine-tuned with use_mean_pooling=False: its head reads "
        "the first token after the encoder's final LayerNorm (videomae.layernorm), while this "
        "model (VideoMAEv2 / SignNet) mean-pools the tokens into fc_norm -> head; that head is "
        "not supported. Convert the pre-training checkpoint it started from, or re-save the "
        "file without its classifier to use the encoder alone\n"
    )
    assert not (tmp_path / "ckpt").exists()


def test_other_class_count_reinitialises_head_with_warning(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "ft.pth")
    assert _convert(tmp_path / "ft.pth", tmp_path / "ckpt", "S", FRAMES, 2000) == 0
    assert (
        "head re-initialised: checkpoint has 5 classes, --num-classes is 2000"
        in capsys.readouterr().err
    )
    params, meta = checkpointing.load_model(tmp_path / "ckpt")
    assert params["head"]["kernel"].shape == (384, 2000)
    assert meta["source"]["fresh"] == ["head.weight", "head.bias"]
    np.testing.assert_array_equal(params["fc_norm"]["scale"], torch_state(tmodel)["fc_norm.weight"])


def test_other_frame_count_rebuilds_the_sinusoid_table(tmodel, tmp_path):
    torch.save(tmodel.state_dict(), tmp_path / "ft.pth")
    assert _convert(tmp_path / "ft.pth", tmp_path / "ckpt", "S", 8) == 0
    t8 = torch_vit.make("S", CLASSES, num_frames=8, img_size=SIZE, seed=123)
    t8.load_state_dict(tmodel.state_dict())  # same weights, table for 4 x 2 x 2 tokens
    clip = random_clip(1, 8, SIZE, seed=3)
    out, meta = _flax_logits(tmp_path / "ckpt", clip)
    assert meta["model"]["num_frames"] == 8
    assert rel_err(out, torch_logits(t8, clip)) <= 1e-5


def test_learned_position_table_is_interpolated_in_time():
    # 2 x 1 x 1 grid -> 4 x 1 x 1: linear with half-pixel centres, edges held
    table = np.array([[[0.0, 10.0], [4.0, 30.0]]], np.float32)  # (1, 2 tokens, 2 channels)
    out = convert._resize_pos_embed(table, (2, 1, 1), (4, 1, 1))
    np.testing.assert_allclose(out[0], [[0, 10], [1, 15], [3, 25], [4, 30]], atol=1e-5)


def _torch_resize(table: np.ndarray, src, dst) -> np.ndarray:
    """The reference: PyTorch's interpolate, linear over time, then bicubic over the spatial
    grid as VideoMAEv2's fine-tuning code resizes a position table (align_corners=False)."""
    c = table.shape[-1]
    g = torch.from_numpy(table.reshape(*src, c)).double()  # T, H, W, C
    x = g.permute(1, 2, 3, 0).reshape(-1, 1, src[0])  # (H*W*C, 1, T)
    x = torch.nn.functional.interpolate(x, size=dst[0], mode="linear", align_corners=False)
    x = x.reshape(*src[1:], c, dst[0]).permute(3, 2, 0, 1)  # T', C, H, W
    x = torch.nn.functional.interpolate(x, size=dst[1:], mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, -1, c).numpy()


@pytest.mark.parametrize(
    "src, dst",
    [
        ((8, 7, 7), (8, 14, 14)),  # more pixels
        ((8, 14, 14), (8, 7, 7)),  # fewer: no antialiasing, as PyTorch
        ((8, 14, 14), (16, 16, 16)),  # more frames
        ((4, 14, 14), (2, 10, 10)),  # fewer frames
        ((2, 3, 5), (5, 2, 9)),  # rows and columns apart
    ],
)
def test_learned_position_table_is_resized_as_pytorch_interpolates(src, dst):
    table = np.random.default_rng(0).normal(size=(1, int(np.prod(src)), 8)).astype(np.float32)
    out = convert._resize_pos_embed(table, src, dst)
    assert out.shape == (1, int(np.prod(dst)), 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, _torch_resize(table, src, dst), rtol=0, atol=1e-6)


def test_learned_position_table_checkpoint_converts_to_more_frames(tmp_path):
    t = torch_vit.make("S", CLASSES, num_frames=FRAMES, img_size=SIZE, learned_pos_emb=True)
    torch.save(t.state_dict(), tmp_path / "lp.pth")
    assert (
        _convert(tmp_path / "lp.pth", tmp_path / "ckpt", "S", 8, CLASSES, "--img-size", SIZE) == 0
    )
    params, meta = checkpointing.load_model(tmp_path / "ckpt")
    assert params["pos_embed"].shape == (1, 4 * 2 * 2, 384)
    src = torch_state(t)["pos_embed"].reshape(2, 4, 384)
    # the first and last frames of the new table equal the stored end frames
    np.testing.assert_allclose(params["pos_embed"].reshape(4, 4, 384)[[0, 3]], src, atol=1e-5)


def test_ambiguous_position_table_grid_is_named_and_settled_by_pos_grid(tmp_path, capsys):
    def cfg(frames, size):
        return vit.ViTConfig.from_preset("S", num_frames=frames, img_size=size)

    # 1568 tokens for a 16-frame 112-px model: 32x7x7 (its 7x7 grid) or 8x14x14 (224 px)
    with pytest.raises(convert.ConversionError) as e:
        convert._pos_grid(1568, cfg(16, 112))
    assert str(e.value) == (
        "the checkpoint's 1568-token position table could be a token grid of 32x7x7 or 8x14x14 "
        "(time x rows x columns); say which with --pos-grid T,H,W, e.g. --pos-grid 8,14,14"
    )
    assert convert._pos_grid(1568, cfg(16, 112), (8, 14, 14)) == (8, 14, 14)
    assert convert._pos_grid(1568, cfg(32, 224)) == (8, 14, 14)  # all guesses agree
    assert convert._pos_grid(392, cfg(16, 112)) == (8, 7, 7)  # the model's own grid
    with pytest.raises(convert.ConversionError, match="cannot infer the token grid of the "):
        convert._pos_grid(1000, cfg(16, 112))

    # the whole command: a 16x224 learned table converted for 16 frames of 112 px
    t = torch_vit.make("S", CLASSES, num_frames=FRAMES, img_size=SIZE, learned_pos_emb=True)
    sd = {k: torch.from_numpy(v) for k, v in torch_state(t).items()}
    table = np.random.default_rng(0).normal(size=(1, 1568, 384)).astype(np.float32)
    sd["pos_embed"] = torch.from_numpy(table)
    torch.save(sd, tmp_path / "lp.pth")
    args = ("S", 16, CLASSES, "--img-size", 112)
    assert _convert(tmp_path / "lp.pth", tmp_path / "no", *args) == 1
    assert "say which with --pos-grid T,H,W" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert _convert(tmp_path / "lp.pth", tmp_path / "ckpt", *args, "--pos-grid", "8,14,14") == 0
    assert (
        "learned position table resized from grid (8, 14, 14) to (8, 7, 7)"
        in capsys.readouterr().err
    )
    params, _ = checkpointing.load_model(tmp_path / "ckpt")
    expected = _torch_resize(table, (8, 14, 14), (8, 7, 7))
    np.testing.assert_allclose(params["pos_embed"], expected, rtol=0, atol=1e-6)
    # a grid of another token count, or not a grid at all
    assert _convert(tmp_path / "lp.pth", tmp_path / "x", *args, "--pos-grid", "8,7,7") == 1
    assert capsys.readouterr().err == (
        "error: --pos-grid 8x7x7 is 392 tokens but the checkpoint's position table has 1568\n"
    )
    with pytest.raises(SystemExit) as exit_:
        _convert(tmp_path / "lp.pth", tmp_path / "x", *args, "--pos-grid", "8,14")
    assert exit_.value.code == 2
    assert "--pos-grid: give three positive integers T,H,W, not '8,14'" in capsys.readouterr().err


# --- bad input: clear error, non-zero exit, nothing at --output -----------------------


def _assert_fails(capsys, src, out: pathlib.Path, match: str, model: str = "S"):
    """The conversion of src fails, names the problem and leaves nothing at out."""
    assert _convert(src, out, model) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_truncated_checkpoint(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "ft.pth")
    data = (tmp_path / "ft.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    out = tmp_path / "ckpt"
    _assert_fails(
        capsys,
        tmp_path / "cut.pth",
        out,
        f"cannot read {tmp_path / 'cut.pth'} as a PyTorch checkpoint",
    )


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("hello")
    out = tmp_path / "ckpt"
    _assert_fails(
        capsys,
        tmp_path / "notes.pth",
        out,
        f"{tmp_path / 'notes.pth'} is not a PyTorch checkpoint (neither a torch.save archive "
        "nor a pickle; it starts with b'hell')",
    )
    # a pickle that is no torch checkpoint gets the reading error
    (tmp_path / "none.pth").write_bytes(b"\x80\x02N.")
    _assert_fails(capsys, tmp_path / "none.pth", out, "as a PyTorch checkpoint (RuntimeError")


def _assert_fails_with(capsys, src, out: pathlib.Path, message: str):
    """The conversion of src exits 1 with the one line `error: message` and writes nothing."""
    assert _convert(src, out) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert sorted(p.name for p in out.parent.iterdir()) == [src.name]


def test_a_pth_that_holds_no_state_dict_is_named(tmp_path, capsys):
    src, out = tmp_path / "list.pth", tmp_path / "ckpt"
    torch.save([1], src)
    _assert_fails_with(capsys, src, out, f"{src} does not hold a state dict (found list)")
    src.unlink()
    src = tmp_path / "trainer.pth"  # a training state without the model's tensors
    torch.save({"epoch": 3}, src)
    _assert_fails_with(
        capsys,
        src,
        out,
        f"{src} holds no tensor state dict at the top level or under 'model', 'module' or "
        "'state_dict' (top-level keys: ['epoch'])",
    )


def test_truncated_safetensors(tmp_path, capsys):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 2, 16, 16)}, tmp_path / "m.st")
    data = (tmp_path / "m.st").read_bytes()
    (tmp_path / "m.st").unlink()
    src = tmp_path / "cut.safetensors"
    for cut in (len(data) // 2, 5):  # a download cut in the tensors, and in the header
        src.write_bytes(data[:cut])
        with pytest.raises(SafetensorError) as reason:  # the library's words, in the message
            load_file(src)
        assert "Error while deserializing header" in str(reason.value)
        _assert_fails_with(
            capsys,
            src,
            tmp_path / "ckpt",
            f"cannot read {src} as safetensors ({reason.value}); is the file complete?",
        )


def test_huggingface_layer_without_its_value_weights_is_named(tmp_path, capsys):
    from transformers import VideoMAEModel

    sd = VideoMAEModel(_hf_config(False)).state_dict()
    del sd["encoder.layer.5.attention.attention.value.weight"]
    src = tmp_path / "pytorch_model.bin"
    torch.save(sd, src)
    _assert_fails_with(capsys, src, tmp_path / "ckpt", (
        f"{src}: layer 5 lacks attention weights ['value']: the checkpoint is incomplete or not "
        "a VideoMAE model; download or save it again"
    ))  # fmt: skip


def test_missing_class_list(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    assert _convert(tmp_path / "s.pth", tmp_path / "ckpt", "S", 4, 5, "--class-list", "no.txt") == 1
    assert capsys.readouterr().err == "error: --class-list no.txt not found\n"
    assert not (tmp_path / "ckpt").exists()


def test_class_list_that_is_not_utf8_is_named(tmp_path):
    # saved in a legacy code page (Latin-1 'café'): the file is named, as for other bad lists
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\nbook\n".encode("latin-1"))
    with pytest.raises(convert.ConversionError) as e:
        convert.read_class_list(path)
    assert str(e.value) == (
        f"--class-list {path}: not UTF-8 text (invalid continuation byte at byte 3); "
        "save it as UTF-8"
    )


def test_class_list_of_another_size(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    # the whole wlasl_class_list.txt for a smaller WLASL-K head: how to cut it is named
    (tmp_path / "all.txt").write_text("".join(f"{i}\tgloss{i}\n" for i in range(7)))
    assert _convert(tmp_path / "s.pth", tmp_path / "c", "S", 4, 5, "--class-list",
                    tmp_path / "all.txt") == 1  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: the class list has 7 names but --num-classes is 5; for a WLASL-5 model (the "
        "first 5 glosses of wlasl_class_list.txt) give a list of those: head -n 5 LIST > "
        "classes5.txt"
    )
    (tmp_path / "few.txt").write_text("a\nb\n")
    assert _convert(tmp_path / "s.pth", tmp_path / "c", "S", 4, 5, "--class-list",
                    tmp_path / "few.txt") == 1  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: the class list has 2 names but --num-classes is 5"
    )
    assert not (tmp_path / "c").exists()


def test_export_takes_a_training_workdir_and_never_overwrites(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    assert _convert(tmp_path / "s.pth", tmp_path / "run" / "checkpoints") == 0
    out = tmp_path / "new" / "folder" / "s.pth"  # folders are made, as for the orbax side
    assert _run("--to-pytorch", "--input", tmp_path / "run", "--output", out) == 0
    assert set(torch.load(out, weights_only=True)) == set(tmodel.state_dict())
    capsys.readouterr()
    before = out.read_bytes()
    assert _run("--to-pytorch", "--input", tmp_path / "run", "--output", out) == 1
    assert f"output {out} already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert _run("--to-pytorch", "--input", tmp_path / "run", "--output", tmp_path / "c7") == 1
    assert "--output " + str(tmp_path / "c7") + ": give a .pth" in capsys.readouterr().err
    step = tmp_path / "run" / "checkpoints" / "0"
    assert _run("--to-pytorch", "--input", step, "--output", tmp_path / "x.pth") == 1
    err = capsys.readouterr().err
    assert f"{step} is one step of the checkpoint" in err and "--step 0" in err
    # and the advice works
    args = ["--to-pytorch", "--input", tmp_path / "run", "--output", tmp_path / "x.pth"]
    assert _run(*args, "--step", "0") == 0
    assert _run(*args[:-1], tmp_path / "y.pth", "--step", "3") == 1
    assert "has no step 3; it holds steps [0]" in capsys.readouterr().err
    # the run or its checkpoints given without --to-pytorch: the flag is named
    for given in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        assert _convert(given, tmp_path / "z") == 1
        assert capsys.readouterr().err == (
            f"error: input checkpoint {given} is a folder, a signnet_jax checkpoint (orbax); to "
            "write it as a PyTorch state dict, add --to-pytorch and give --output FILE.pth\n"
        )
    # a step: the whole command that exports it (its folder and --step)
    assert _convert(step, tmp_path / "z") == 1
    assert capsys.readouterr().err == (
        f"error: input checkpoint {step} is a folder, one step of a signnet_jax checkpoint "
        "(orbax); to write it as a PyTorch state dict: --to-pytorch --input "
        f"{step.parent} --step 0 --output FILE.pth\n"
    )
    assert not (tmp_path / "z").exists()
    # and that command works
    assert (
        _run("--to-pytorch", "--input", step.parent, "--step", "0", "--output", tmp_path / "z.pth")
        == 0
    )


def test_without_pytorch_both_directions_say_what_to_install(tmodel, tmp_path, capsys, monkeypatch):
    # pip install -e . brings no torch: the export was a ModuleNotFoundError traceback
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    assert _convert(tmp_path / "s.pth", tmp_path / "ckpt") == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert _convert(tmp_path / "s.pth", tmp_path / "again") == 1
    assert capsys.readouterr().err == (
        f"error: reading {tmp_path / 's.pth'} needs PyTorch: pip install 'signnet_jax[convert]'\n"
    )
    out = tmp_path / "back.pth"
    assert _run("--to-pytorch", "--input", tmp_path / "ckpt", "--output", out) == 1
    assert capsys.readouterr().err == (
        f"error: writing {out}, a PyTorch state dict, needs PyTorch: pip install "
        "'signnet_jax[convert]'\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "s.pth"]


def test_export_writes_the_class_names_beside_the_state_dict(tmodel, tmp_path, capsys):
    """A .pth holds tensors only; the head rows' names go to NAME.classes.txt, which
    --class-list reads back, so .pth -> orbax -> .pth -> orbax keeps them."""
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    names = ["thank you", "3 weeks", "book", "drink", "computer"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    assert _convert(tmp_path / "s.pth", tmp_path / "a", "S", 4, 5, "--class-list",
                    tmp_path / "classes.txt") == 0  # fmt: skip
    capsys.readouterr()
    assert _run("--to-pytorch", "--input", tmp_path / "a", "--output", tmp_path / "b.pth") == 0
    side = tmp_path / "b.classes.txt"
    assert capsys.readouterr().out == (
        f"wrote 162 tensors of step 0 to {tmp_path / 'b.pth'} and the 5 class names to {side} "
        "(give it to --class-list when converting back)\n"
    )
    assert side.read_text() == "0\tthank you\n1\t3 weeks\n2\tbook\n3\tdrink\n4\tcomputer\n"
    assert _convert(tmp_path / "b.pth", tmp_path / "c", "S", 4, 5, "--class-list", side) == 0
    assert checkpointing.load_meta(tmp_path / "c")["classes"] == names
    # an existing class list is not overwritten either, and then no .pth is written
    assert _run("--to-pytorch", "--input", tmp_path / "c", "--output", tmp_path / "b2.pth") == 0
    before = side.read_bytes()
    (tmp_path / "b.pth").unlink()
    assert _run("--to-pytorch", "--input", tmp_path / "c", "--output", tmp_path / "b.pth") == 1
    assert f"output {side} already exists" in capsys.readouterr().err
    assert side.read_bytes() == before and not (tmp_path / "b.pth").exists()
    # a checkpoint without names: the state dict alone, as before
    assert _convert(tmp_path / "s.pth", tmp_path / "u") == 0
    capsys.readouterr()
    assert _run("--to-pytorch", "--input", tmp_path / "u", "--output", tmp_path / "u.pth") == 0
    assert capsys.readouterr().out == f"wrote 162 tensors of step 0 to {tmp_path / 'u.pth'}\n"
    assert not (tmp_path / "u.classes.txt").exists()


def test_a_failed_export_leaves_neither_file(tmodel, tmp_path, monkeypatch):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    assert _convert(tmp_path / "s.pth", tmp_path / "a", "S", 4, 5, "--class-list",
                    tmp_path / "classes.txt") == 0  # fmt: skip

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    # the class names cannot be written: no .pth without them is left
    with monkeypatch.context() as m:
        m.setattr(convert.files, "atomic_write", lambda path, data: full_disk(data, path))
        with pytest.raises(convert.ConversionError, match="No space left on device"):
            convert.export_pytorch(tmp_path / "a", tmp_path / "out" / "b.pth")
    assert list((tmp_path / "out").iterdir()) == []  # a rerun is not refused
    # the state dict cannot be written: its names are removed again
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(convert.ConversionError, match="No space left on device"):
        convert.export_pytorch(tmp_path / "a", tmp_path / "out" / "b.pth")
    assert list((tmp_path / "out").iterdir()) == []


def test_non_videomae_state_dict(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    out = tmp_path / "ckpt"
    _assert_fails(
        capsys, tmp_path / "other.pth", out, "not a VideoMAEv2 or Hugging Face VideoMAE checkpoint"
    )


def test_checkpoint_of_another_preset_lists_keys(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    out = tmp_path / "ckpt"
    assert _convert(tmp_path / "s.pth", out, "B") == 1
    err = capsys.readouterr().err
    assert "does not fit preset B (it looks like preset S)" in err
    assert (
        "mis-shaped keys: patch_embed.proj.weight: checkpoint (384, 3, 2, 16, 16), "
        "model needs (768, 3, 2, 16, 16)" in err
    )
    assert "choose the matching --model preset" in err
    assert not out.exists()


def test_missing_and_unexpected_keys_are_named(tmodel, tmp_path, capsys):
    sd = tmodel.state_dict()
    del sd["blocks.2.attn.q_bias"]
    sd["blocks.2.attn.k_bias"] = torch.zeros(384)
    torch.save(sd, tmp_path / "odd.pth")
    assert _convert(tmp_path / "odd.pth", tmp_path / "ckpt") == 1
    err = capsys.readouterr().err
    assert "missing keys: blocks.2.attn.q_bias" in err
    assert "unexpected keys: blocks.2.attn.k_bias" in err


def test_giant_checkpoint_is_recognised_by_its_patch_14_embedding(monkeypatch):
    d, depth = 1408, 40
    sd = {"patch_embed.proj.weight": np.zeros((d, 3, 2, 14, 14), np.float32)}
    sd.update({f"blocks.{i}.norm1.weight": np.zeros(1, np.float32) for i in range(depth)})
    assert convert._guess_preset(sd) == "preset g"
    sd["patch_embed.proj.weight"] = np.zeros((d, 3, 2, 16, 16), np.float32)
    assert convert._guess_preset(sd) == "no preset (embed dim 1408, 40 blocks, patch 16)"

    # the whole conversion, with the giant shrunk to a small width and depth but its patch 14,
    # against the PyTorch reference at patch 14
    small = dict(embed_dim=64, depth=2, num_heads=4, mlp_dim=128, patch_size=14)
    monkeypatch.setitem(vit.PRESETS, "g", small)
    tm = torch_vit.make("g", CLASSES, FRAMES, 28, seed=3, dims=(64, 2, 4, 128), patch=14)
    source = convert.Source(torch_state(tm), "videomae_v2", False, [])
    assert source.state["patch_embed.proj.weight"].shape == (64, 3, 2, 14, 14)
    cfg, params, report = convert.to_flax(source, "vit_giant_patch14_224", FRAMES, CLASSES, 28)
    assert (cfg.preset, cfg.patch_size, cfg.grid) == ("g", 14, (2, 2, 2))
    assert params["patch_embed"]["proj"]["kernel"].shape == (2, 14, 14, 3, 64)
    assert report.fresh == [] and report.warnings == []
    clip = random_clip(2, FRAMES, 28, seed=5)
    logits = vit.model_from_params(cfg, params)(jnp.asarray(clip))
    assert rel_err(logits, torch_logits(tm, clip)) <= 1e-5


def test_unknown_preset(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    out = tmp_path / "ckpt"
    _assert_fails(capsys, tmp_path / "s.pth", out, "unknown model preset 'XL'", model="XL")


class _Exploit:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_pickled_code_is_never_run(tmp_path, capsys):
    exploit = _Exploit()
    exploit.target = str(tmp_path / "pwned")
    torch.save({"model": {"x": torch.zeros(1)}, "payload": exploit}, tmp_path / "evil.pth")
    out = tmp_path / "ckpt"
    _assert_fails(capsys, tmp_path / "evil.pth", out, "outside the allow-list")
    assert not (tmp_path / "pwned").exists()


def test_existing_output_is_not_overwritten(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    assert _convert(tmp_path / "s.pth", tmp_path / "ckpt") == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "mine"


def test_class_list_travels_with_the_checkpoint(tmodel, tmp_path, shared_dir):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    classes = shared_dir / "datasets" / "wlasl" / "wlasl_class_list.txt"
    assert (
        _convert(tmp_path / "s.pth", tmp_path / "ckpt", "S", 4, 2000, "--class-list", classes) == 0
    )
    _, meta = checkpointing.load_model(tmp_path / "ckpt")
    assert len(meta["classes"]) == 2000 and meta["classes"][:3] == ["book", "drink", "computer"]


def test_class_list_is_read_as_build_records_reads_it(tmodel, tmp_path, capsys):
    """One reader for --class-list on both sides, or the names differ and init_from drops the
    trained head as 'other classes'."""
    from data_prep import manifests

    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    lists = {
        # saved by Excel or Notepad: a byte order mark and CRLF line ends
        "bom.txt": "\ufeffbook\r\ndrink\r\n3 weeks\r\nthank you\r\ncomputer\r\n",
        "bom_indexed.txt": "\ufeff0\tbook\n1\tdrink\n2\t3 weeks\n3\tthank you\n4\tcomputer\n",
    }
    for name, text in lists.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        out = tmp_path / name.replace(".txt", "")
        assert _convert(tmp_path / "s.pth", out, "S", 4, 5, "--class-list", tmp_path / name) == 0
        _, meta = checkpointing.load_model(out)
        assert meta["classes"] == ["book", "drink", "3 weeks", "thank you", "computer"]
        assert meta["classes"] == manifests.load_class_list(tmp_path / name)
    (tmp_path / "dup.txt").write_text("a\nb\nc\nd\na\n")
    assert _convert(tmp_path / "s.pth", tmp_path / "d", "S", 4, 5, "--class-list",
                    tmp_path / "dup.txt") == 1  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --class-list {tmp_path / 'dup.txt'}: duplicate classes ['a']"
    )
    assert not (tmp_path / "d").exists()


def test_cli_exit_code_from_a_fresh_process(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "signnet_jax.convert",
            "--input",
            tmp_path / "no.pth",
            "--output",
            tmp_path / "ckpt",
            "--model",
            "B",
            "--num-frames",
            "16",
            "--num-classes",
            "10",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert f"input checkpoint {tmp_path / 'no.pth'} does not exist" in r.stderr


def test_remote_output_or_input_is_one_line_and_exit_1(tmodel, tmp_path):
    torch.save(tmodel.state_dict(), tmp_path / "ft.pth")
    sizes = ["--model", "S", "--num-frames", FRAMES, "--num-classes", CLASSES]
    write = (
        "error: gs://bucket/x: gs:// paths are not supported; write a local folder, then copy it "
        "with `gsutil -m cp -r LOCAL_DIR gs://bucket/x` "
        "(or `gcloud storage cp -r LOCAL_DIR gs://bucket/x`)\n"
    )
    read = (
        "error: gs://bucket/y: gs:// paths are not supported; copy it to a local folder with "
        "`gsutil -m cp -r gs://bucket/y LOCAL_DIR` "
        "(or `gcloud storage cp -r gs://bucket/y LOCAL_DIR`) and read that\n"
    )
    for args, line in [
        (["--input", tmp_path / "ft.pth", "--output", "gs://bucket/x", *sizes], write),
        (["--input", "gs://bucket/y", "--output", tmp_path / "ckpt", *sizes], read),
        (["--to-pytorch", "--input", "gs://bucket/y", "--output", tmp_path / "o.pth"], read),
        (["--to-pytorch", "--input", tmp_path / "ft.pth", "--output", "gs://bucket/x"], write),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "signnet_jax.convert", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert (r.returncode, r.stderr) == (1, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.pth"]  # no local gs: folder


# --- options: checked before any file is read ------------------------------------------


def _usage_error(capsys, *args) -> str:
    """The last stderr line of a command line argparse refuses (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        _run(*args)
    assert exit_.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("flag", ["--model", "--num-frames", "--num-classes"])
def test_each_required_size_option_is_named_when_left_out(tmp_path, capsys, flag):
    sizes = {"--model": "S", "--num-frames": FRAMES, "--num-classes": CLASSES}
    del sizes[flag]
    args = ["--input", tmp_path / "s.pth", "--output", tmp_path / "ckpt"]
    last = _usage_error(capsys, *args, *[x for kv in sizes.items() for x in kv])
    assert last == f"python -m signnet_jax.convert: error: {flag} is required (unless --to-pytorch)"
    assert list(tmp_path.iterdir()) == []


def test_help_shows_the_required_options_as_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("--help")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    # the usage has them unbracketed, each flag's help says so
    assert "\n      --model PRESET --num-frames N --num-classes N\n" in out
    for flag in ("--model PRESET", "--num-frames N", "--num-classes N"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"  {flag} ")]
        assert line.split(flag)[1].strip().startswith("required: "), line
    assert "--to-pytorch --input DIR --output FILE.pth [--step STEP]" in out


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--num-classes", "0", "--num-classes 0: the head needs at least 1 class"),
        (
            "--num-frames",
            "15",
            "--num-frames 15: give a positive multiple of 2 (the model embeds frames in "
            "groups of 2), e.g. --num-frames 16",
        ),
        (
            "--num-frames",
            "0",
            "--num-frames 0: give a positive multiple of 2 (the model embeds frames in "
            "groups of 2), e.g. --num-frames 2",
        ),
        (
            "--img-size",
            "100",
            "--img-size 100: give a positive multiple of 16 (the patch size of ViT-S), "
            "e.g. --img-size 96",
        ),
    ],
)
def test_sizes_that_make_no_model_are_usage_errors(tmodel, tmp_path, capsys, flag, value, message):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    args = ["--input", tmp_path / "s.pth", "--output", tmp_path / "ckpt"]
    sizes = {"--model": "S", "--num-frames": FRAMES, "--num-classes": CLASSES, flag: value}
    last = _usage_error(capsys, *args, *[x for kv in sizes.items() for x in kv])
    assert last == f"python -m signnet_jax.convert: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pth"]  # nothing written


def test_the_patch_size_is_the_presets(capsys):
    # the giant's patches are 14 px: 224 fits it, 96 does not
    args = ["--input", "x.pth", "--output", "y", "--num-frames", "4", "--num-classes", "5"]
    assert convert._parse([*args, "--model", "g"]).img_size == 224
    with pytest.raises(SystemExit) as exit_:
        convert._parse([*args, "--model", "vit_giant_patch14_224", "--img-size", "96"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m signnet_jax.convert: error: --img-size 96: give a positive multiple of 14 "
        "(the patch size of ViT-g), e.g. --img-size 98"
    )


def test_options_of_the_other_direction_are_refused(tmodel, tmp_path, capsys):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    sizes = ["--model", "S", "--num-frames", FRAMES, "--num-classes", CLASSES]
    last = _usage_error(
        capsys, "--input", tmp_path / "s.pth", "--output", tmp_path / "c", *sizes, "--step", "best"
    )
    assert last == (
        "python -m signnet_jax.convert: error: --step: only with --to-pytorch, to pick the step "
        "of a checkpoint to export (a PyTorch file has one set of weights); leave it out"
    )
    assert _convert(tmp_path / "s.pth", tmp_path / "c") == 0
    export = ["--to-pytorch", "--input", tmp_path / "c", "--output", tmp_path / "c.pth"]
    last = _usage_error(capsys, *export, "--num-classes", "7", "--seed", "1")
    assert last == (
        "python -m signnet_jax.convert: error: --num-classes, --seed: not used by --to-pytorch, "
        "which exports the checkpoint as it is (its model and class names included); leave "
        "them out"
    )
    assert not (tmp_path / "c.pth").exists()
    assert convert._parse(map(str, export)).step == "latest"


# --- Ctrl-C: one line, exit 130, nothing at --output ------------------------------------


def _interrupt_after(target: str, *args) -> subprocess.CompletedProcess:
    return interrupt_after(target, "signnet_jax.convert:main", *args)


@pytest.mark.parametrize(
    "target",
    [
        # the step is being written (orbax saves asynchronously) / written, not yet renamed
        "orbax.checkpoint:CheckpointManager.save",
        "orbax.checkpoint:CheckpointManager.wait_until_finished",
        "os:replace",  # just renamed into place: the checkpoint is whole
    ],
)
def test_ctrl_c_while_converting_is_one_line_and_leaves_nothing(tmodel, tmp_path, target):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    sizes = ["--model", "S", "--num-frames", FRAMES, "--num-classes", CLASSES]
    out = tmp_path / "ckpt"
    r = _interrupt_after(target, "--input", tmp_path / "s.pth", "--output", out, *sizes)
    renamed = target == "os:replace"
    left = f"after {out} was written" if renamed else f"nothing written at {out}"
    assert (r.returncode, r.stderr, r.stdout) == (130, f"interrupted: {left}\n", "")
    # no temporary either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "s.pth"][not renamed :]
    if renamed:
        assert checkpointing.load_meta(out)["model"]["num_classes"] == CLASSES


def test_ctrl_c_while_exporting_is_one_line_and_leaves_neither_file(tmodel, tmp_path):
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    assert _convert(tmp_path / "s.pth", tmp_path / "a", "S", 4, 5, "--class-list",
                    tmp_path / "classes.txt") == 0  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "b.pth"
    for target in ("signnet_jax.files:atomic_write", "torch:save"):  # the class names, the .pth
        r = _interrupt_after(target, "--to-pytorch", "--input", tmp_path / "a", "--output", out)
        assert (r.returncode, r.stderr) == (130, f"interrupted: nothing written at {out}\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    # right after the .pth's rename into place (the class names' is the first): the export is
    # whole, and the message says so
    r = _interrupt_after("os:replace#2", "--to-pytorch", "--input", tmp_path / "a", "--output", out)
    assert (r.returncode, r.stderr) == (130, f"interrupted: after {out} was written\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "b.pth", "b.classes.txt"])
    assert set(torch.load(out, weights_only=True)) == set(tmodel.state_dict())


def test_a_full_disk_in_either_direction_is_one_line_and_leaves_nothing(
    tmodel, tmp_path, capsys, monkeypatch
):
    # the .pth side: torch's zip writer said only "[enforce fail at inline_container.cc:672]"
    # in a traceback; the orbax side printed some 600 lines and could leave its temporary folder
    torch.save(tmodel.state_dict(), tmp_path / "s.pth")
    assert _convert(tmp_path / "s.pth", tmp_path / "run") == 0
    capsys.readouterr()

    def full(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 3200 vs 3094"
        )

    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full)
        assert _run("--to-pytorch", "--input", tmp_path / "run", "--output", out / "x.pth") == 1
    err = capsys.readouterr().err
    assert re.fullmatch(
        re.escape(f"error: cannot write {out / 'x.pth'} ([enforce fail at inline_container.cc:672] "
                  ". unexpected pos 3200 vs 3094); it takes about ")
        + r"\d+ MiB, \d+ MiB are free there: make room, or give another path\n",
        err,
    ), err  # fmt: skip
    assert list(out.iterdir()) == []

    manager = checkpointing.ocp.CheckpointManager

    def no_space(self, *args, **kwargs):
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "blocks.0.attn.proj.bias/0": No space left on '
            "device [os_error_code='28'] [tensorstore_spec='{...}']"
        )

    monkeypatch.setattr(manager, "save", no_space)
    assert _convert(tmp_path / "s.pth", out / "ck") == 1
    assert capsys.readouterr().err == (
        f"error: cannot write a checkpoint in {out / 'ck'} (RESOURCE_EXHAUSTED: Error writing "
        "\"blocks.0.attn.proj.bias/0\": No space left on device [os_error_code='28']); make room "
        "there, or give another path\n"
    )
    assert list(out.iterdir()) == []
