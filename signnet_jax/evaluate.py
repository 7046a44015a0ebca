"""Evaluation: the published multi-view test protocol on the mesh.

Softmax probabilities of every view (``test_num_segment`` clips x
``test_num_crop`` crops) are averaged per video; per-instance and per-class
top-1 / top-5 follow (both published per-class definitions, named). ``mode=eval``
of main evaluates the checkpoint in the workdir, or ``config.init_from``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from signnet_jax import checkpointing, metrics, sharding
from signnet_jax.data import device, pipeline
from signnet_jax.models import vit


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, from process 0 only."""
    if jax.process_index() == 0:
        metrics.write_metrics_json(path, obj)


def eval_step(setup, views_per_device: int = 0):
    """The evaluation step: ``(params, views) -> probabilities`` of a batch of uint8 views
    (``(B, T, S, S, 3)``, split over the mesh), jitted once per set-up.

    Each device takes its share of the batch through the model ``views_per_device`` views at a
    time (``data.eval_views_per_device``; 0: all at once), so the step's memory is set by that,
    not by B (XLA's attention holds every view's full score matrix). A share that the chunk
    size does not divide runs its last chunk overlapping the one before (no padding, no copy).
    """
    if setup.eval_fn is None or setup.eval_fn[0] != views_per_device:
        graphdef, dtype, devices = setup.graphdef, jnp.dtype(setup.model_cfg.dtype), setup.mesh.size

        def forward(params, clip):
            logits = nnx.merge(graphdef, params)(device.normalize(clip, dtype))
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        def probs(params, clip):
            share = clip.shape[0] // devices
            n, size = eval_chunks(share, views_per_device)
            if n == 1:
                return forward(params, clip)
            view = clip.shape[1:]
            # (devices, share, ...): each device's rows on its own, sliced without moving them
            local = jax.lax.with_sharding_constraint(
                clip.reshape(devices, share, *view), sharding.batch_sharding(setup.mesh, 6)
            )

            def chunk(start):
                part = jax.lax.dynamic_slice_in_dim(local, start, size, axis=1)
                part = jax.lax.with_sharding_constraint(
                    part.reshape(devices * size, *view), sharding.batch_sharding(setup.mesh, 5)
                )
                return forward(params, part).reshape(devices, size, -1)

            # the last chunk starts at share - size, repeating the previous chunk's last rows
            starts = jnp.asarray([min(i * size, share - size) for i in range(n)], jnp.int32)
            out = jax.lax.map(chunk, starts)  # (n, devices, size, K)
            head = jnp.swapaxes(out[:-1], 0, 1).reshape(devices, (n - 1) * size, -1)
            rows = jnp.concatenate([head, out[-1][:, n * size - share :]], axis=1)
            return rows.reshape(clip.shape[0], -1)

        fn = jax.jit(
            probs,
            in_shardings=(setup.param_sh, sharding.batch_sharding(setup.mesh, 5)),
            out_shardings=sharding.batch_sharding(setup.mesh, 2),
        )
        setup.eval_fn = (views_per_device, fn)
    return setup.eval_fn[1]


def eval_chunks(share: int, views_per_device: int) -> tuple[int, int]:
    """``(chunks, views per chunk)`` of a device's ``share`` of an eval batch: at most
    ``views_per_device`` views a chunk (0: one chunk), as few chunks as that allows, sized as
    evenly as possible (6 views at 4: 2 chunks of 3)."""
    if views_per_device <= 0 or share <= views_per_device:
        return 1, share
    n = -(-share // views_per_device)
    return n, -(-share // n)


def compile_eval_steps(setup, config: ml_collections.ConfigDict, params, resident=None) -> None:
    """Compiles the evaluation step for the validation and the test views (both when their
    sizes differ) before training starts: the first validation comes only after an epoch, and a
    step that does not fit the device stops the run now, with ``eval_memory_advice``. The
    validation and the test then run these executables (JAX reuses them).

    Args:
      params: the parameters as ShapeDtypeStructs with their shardings.
      resident: what stays on the devices while evaluating (the training state, the same
        kind of tree): on an accelerator that says its memory, the step must fit beside it.
    """
    from signnet_jax import train

    cfg = setup.model_cfg
    sizes: dict[int, str] = {}  # view size -> the first split with views of that size
    if config.val_split:
        sizes[cfg.img_size] = config.val_split
    if config.test_split:
        sizes.setdefault(config.data.short_side_size, config.test_split)
    fn = eval_step(setup, config.data.eval_views_per_device)
    for size, split in sizes.items():
        views = jax.ShapeDtypeStruct(
            (config.data.eval_batch_size, cfg.num_frames, size, size, 3),
            jnp.uint8,
            sharding=sharding.batch_sharding(setup.mesh, 5),
        )
        with eval_memory_advice(setup, config, split):
            compiled, done, _ = train.timed_compile(
                lambda views=views: fn.lower(params, views).compile(),
                f"eval step ({size}x{size} views of the {split} split)",
            )
        mem = compiled.memory_analysis()
        train._log(
            done
            + (
                f": temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB per device"
                if mem is not None
                else ""
            )
        )
        if mem is not None and resident is not None:
            _check_fits_beside(setup, config, split, resident, views, mem.temp_size_in_bytes)


def _check_fits_beside(setup, config, split: str, resident, views, temps: int) -> None:
    """Raises when evaluating ``split`` needs more than the device's memory beside the
    training state: the step compiles alone, but at run time the state stays. Every host
    raises when one does (the others would wait in the first step's collectives)."""
    from signnet_jax import train

    mine = [d for d in setup.mesh.devices.flat if d.process_index == jax.process_index()]
    limit = sharding.device_memory_limit(mine[0])
    state, views = sharding.bytes_per_device(resident), sharding.bytes_per_device(views)
    need = state + views + temps
    over = limit is not None and need > limit
    if jax.process_count() > 1:
        short = np.flatnonzero(multihost_utils.process_allgather(np.int32(over)))
        if len(short) and not over:
            raise train.TrainingError(
                f"evaluating the {split} split needs more device memory than process "
                f"{short[0]} has beside the training state (its message gives the sizes); "
                f"{_eval_fix(setup, config)}"
            )
    if over:
        raise train.TrainingError(
            f"evaluating the {split} split needs more device memory than there is beside the "
            f"training state: {_size(need)} per device ({_size(state)} of training state, "
            f"{_size(views)} of views, {_size(temps)} of temporaries), of {_size(limit)}; "
            f"{_eval_fix(setup, config)}"
        )


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _eval_fix(setup, config: ml_collections.ConfigDict) -> str:
    """What lowers the evaluation step's memory, for the messages."""
    views = config.data.eval_views_per_device
    share = config.data.eval_batch_size // setup.mesh.size
    at_once = eval_chunks(share, views)[1]
    if at_once > 1:
        now = f"now {views}" if views > 0 else f"now 0: all {share} at once"
        fix = f"try a smaller --config.data.eval_views_per_device ({now}; 1 needs the least memory)"
    else:
        fix = "on TPUs try --config.model.attention=splash"
    return f"with {at_once} view{'s' * (at_once != 1)} per device at a time, {fix}"


def eval_memory_advice(setup, config: ml_collections.ConfigDict, split: str):
    """A device out-of-memory error of the evaluation step on ``split`` becomes a TrainingError
    naming what helps: fewer views per device at a time, else splash attention on TPUs."""
    from signnet_jax import train

    return train.memory_advice(f"evaluating the {split} split", _eval_fix(setup, config))


def predict_split(setup, config: ml_collections.ConfigDict, params, split: str, mode: str):
    """Per-video probabilities of a split: (video_probs (N, K), labels (N,))."""
    from signnet_jax import train

    cfg = setup.model_cfg
    ds, info = pipeline.eval_dataset(
        config.records_dir,
        split,
        mode=mode,
        global_batch_size=config.data.eval_batch_size,
        clip_len=cfg.num_frames,
        sampling_rate=config.data.sampling_rate,
        num_segment=config.data.test_num_segment,
        num_crop=config.data.test_num_crop,
        short_side_size=config.data.short_side_size,
        crop_size=cfg.img_size,
        num_workers=config.data.num_workers,
        num_threads=config.data.num_threads,
        prefetch=config.data.prefetch,
    )
    fn = eval_step(setup, config.data.eval_views_per_device)
    merged = metrics.ViewMerger(info.num_videos, len(setup.classes))
    video_labels = np.zeros(info.num_videos, np.int64)
    batches = iter(ds)
    advice = eval_memory_advice(setup, config, split)
    multi_host = jax.process_count() > 1
    side = config.data.short_side_size if mode == "test" else cfg.img_size
    # on several hosts, this host's input failing (a record only it reads) must not leave
    # the others waiting in the next batch's collectives: it goes on with empty views
    # (valid False) and a flag that all hosts gather, so all of them stop together; a Ctrl-C
    # and a SIGTERM likewise
    error = empty = None
    ctrl_c = train.AgreedCtrlC(multi_host)
    preempt = train.Preemption(active=False)  # the flag of the run's own use, if any
    try:
        with ctrl_c, preempt, advice, train.damaged_records(config.records_dir):
            for i in range(info.num_steps):
                if not multi_host and preempt.requested:  # one host: before the next batch
                    raise train.AgreedPreemption
                if error is None:
                    try:
                        batch = next(batches)
                        local = {k: batch[k] for k in ("clip", "video_index", "valid", "label")}
                    except Exception as e:
                        if not multi_host:
                            raise
                        error, n = e, info.batch_size
                        empty = {
                            "clip": np.zeros((n, cfg.num_frames, side, side, 3), np.uint8),
                            "video_index": np.full(n, -1, np.int32),
                            "valid": np.zeros(n, bool),
                            "label": np.zeros(n, np.int32),
                        }
                if error is not None:
                    local = empty
                gb = sharding.global_batch(local, setup.mesh)
                p = fn(params, gb["clip"])
                p, vi, va, la = (
                    np.asarray(multihost_utils.process_allgather(x, tiled=True))
                    for x in (p, gb["video_index"], gb["valid"], gb["label"])
                )
                if multi_host:  # the training loop's stop codes, the highest wins; a Ctrl-C
                    # outranks this host's input error (it reaches the input workers too)
                    code = (
                        train.STOP_INTERRUPTED
                        if ctrl_c.interrupted
                        else train.STOP_FAILED
                        if error is not None
                        else preempt.code
                    )
                    codes = multihost_utils.process_allgather(np.int32(code))
                    failed = np.flatnonzero(codes == train.STOP_FAILED)
                    if code == train.STOP_FAILED:
                        raise error
                    if len(failed):
                        raise train.TrainingError(
                            f"process {failed[0]} stopped on an error in its input while "
                            f"evaluating the {split} split (its message says what)"
                        )
                    if (codes == train.STOP_INTERRUPTED).any():  # every host at this batch
                        raise train.AgreedInterrupt
                    # after the last batch the pass is done: it is kept, and the training
                    # loop's next step carries the SIGTERM
                    if (codes == train.STOP_PREEMPTED).any() and i < info.num_steps - 1:
                        raise train.AgreedPreemption
                bad = va & ~np.isfinite(p).all(axis=1)
                if bad.any():
                    index = int(vi[bad][0])
                    record = pipeline.record_name(config.records_dir, split, index)
                    raise train.TrainingError(non_finite_message(split, index, record, config))
                merged.add(p, vi, va)
                video_labels[vi[va]] = la[va]
    finally:
        pipeline.release(batches, config.data.num_workers)
    return merged.result(), video_labels


def non_finite_message(
    split: str, video: int, record: str, config: ml_collections.ConfigDict
) -> str:
    """``record``: the video's record, as ``pipeline.record_name`` names it."""
    why = (
        "; in float16 the forward pass overflowed: evaluate with --config.model.dtype=float32 "
        "(or bfloat16)"
        if config.model.dtype == "float16"
        else "; the weights may hold non-finite values"
    )
    return (
        f"the model gave non-finite probabilities for video {video} of the {split} split "
        f"({record}){why}"
    )


def evaluate_split(
    setup,
    config: ml_collections.ConfigDict,
    params,
    split: str,
    mode: str,
    workdir: pathlib.Path | None = None,
) -> dict:
    """Accuracy report of a split; with ``workdir`` also the per-class CSV and confusion PNG."""
    video_probs, labels = predict_split(setup, config, params, split, mode)
    report = metrics.accuracy_report(video_probs, labels, setup.classes)
    report["split"], report["mode"] = split, mode
    if mode == "test":
        report["views_per_video"] = config.data.test_num_segment * config.data.test_num_crop
    if workdir is not None and jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)  # made once there is a result to put in it
        metrics.write_per_class_csv(
            workdir / f"{split}_per_class.csv", video_probs, labels, setup.classes
        )
        metrics.plot_confused_pairs(
            workdir / f"{split}_confused_pairs.png", video_probs, labels, setup.classes
        )
    return report


def summary_line(report: dict) -> str:
    pi = report["per_instance"]
    views = report.get("views_per_video", 1)  # validation: one view
    return (
        f"{report['split']} split ({views} view{'s' * (views > 1)} per video, "
        f"{report['num_videos']} videos): "
        f"P-I top-1 {pi['top1']:.2%} top-5 {pi['top5']:.2%} | "
        f"P-C (SignNet) top-1 {report['per_class_signnet']['top1']:.2%} | "
        f"P-C (NLA-SLR) top-1 {report['per_class_nla']['top1']:.2%}"
    )


def protocol(config: ml_collections.ConfigDict) -> dict:
    """The test settings a result depends on (saved beside it in eval mode)."""
    return {
        "split": config.test_split,
        "test_num_segment": config.data.test_num_segment,
        "test_num_crop": config.data.test_num_crop,
        "num_frames": config.model.num_frames,
        "sampling_rate": config.data.sampling_rate,
        "short_side_size": config.data.short_side_size,
    }


# how a view setting other than the trained one shows in an eval folder's name
_VIEW_SUFFIX = {"data.sampling_rate": "rate", "data.short_side_size": "side"}


def eval_folder_name(
    source: str | os.PathLike,
    step: int,
    own: bool,
    config: ml_collections.ConfigDict,
    other_views: dict[str, Any] | None = None,
) -> str:
    """``step_N_SPLIT_SxC`` (S clips x C crops per video), after the checkpoint's name for
    init_from, and ``_rateR`` / ``_sideS`` for views sampled unlike training.

    A folder of its own per checkpoint, step, split and views, so a training run's
    metrics.json, CSV and PNG and other results are not overwritten (``evaluate`` also
    refuses a folder holding another checkpoint's or protocol's result). An init_from
    checkpoint adds its folder's name (converted checkpoints all hold step 0), or its run's
    name for a run's ``checkpoints`` folder. ``other_views``: ``{key: config value}`` as
    ``check_trained_settings`` returns them.
    """
    views = f"{config.data.test_num_segment}x{config.data.test_num_crop}"
    name = f"step_{step}_{config.test_split}_{views}"
    name += "".join(f"_{_VIEW_SUFFIX[k]}{v}" for k, v in (other_views or {}).items())
    if own:
        return name
    path = pathlib.Path(source).absolute()
    return f"{path.parent.name if path.name == 'checkpoints' else path.name}_{name}"


def _same_checkpoint(stored: Any, source: str) -> bool:
    """Whether a result's checkpoint (as its metrics.json has it) is ``source``: resolved, when
    it was stored whole (a relative one, as older results have it, was relative to a folder
    no longer known: it must match as written)."""
    if stored == source:
        return True
    if not isinstance(stored, str) or not os.path.isabs(stored):
        return False
    return os.path.realpath(stored) == os.path.realpath(source)


def _check_same_result(
    path: pathlib.Path, source: str, step: int, settings: dict, own: bool
) -> None:
    """Refuses to replace a result of another checkpoint or protocol (same folder name).

    ``own``: ``source`` is the workdir's own ``checkpoints/``, whose results are named with no
    checkpoint (``step_N_...``): a result there is of this run's step however its path was
    spelled, or after the run was copied or moved.
    """
    from signnet_jax import train

    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # not a result of ours: replaced
    before = (old.get("checkpoint"), old.get("step"), old.get("protocol"))
    same = own or _same_checkpoint(before[0], source)
    if not same or before[1:] != (step, settings):
        raise train.TrainingError(
            f"{path.parent} holds the result of checkpoint {before[0]} step {before[1]} with "
            f"protocol {before[2]}, not of {source} step {step} with {settings}; move it "
            f"away, or give another --workdir with --config.init_from={source}"
        )


def check_trained_settings(
    config: ml_collections.ConfigDict, meta: dict, name: str
) -> tuple[list[str], dict[str, Any]]:
    """Compares the model and clips a checkpoint was trained with to the config's.

    The config builds the model and the views, so a run trained with overrides and tested
    without them gets another model (refused: the preset and dimensions, the clip length and
    frame size, which a converted checkpoint records with its model) or views it never saw (a
    warning: another sampling rate or short side may be a test-time choice, but without one
    the numbers differ from ``predict``'s, which reads these settings from a training run's
    checkpoint). The view counts are the test's own choice.

    Returns:
      ``(warnings for the log, {view setting: config value} where it differs from training)``.

    Raises:
      TrainingError: naming each model setting and the overrides that test it as trained.
    """
    from signnet_jax import train

    src = vit.ViTConfig.from_dict(meta["model"])
    cfg = train.model_config(config, 1)
    model: dict[str, Any] = {}
    if any(getattr(src, k) != getattr(cfg, k) for k in train._ARCH):
        model |= train.arch_overrides(src)
    model |= {"model.num_frames": src.num_frames, "model.img_size": src.img_size}
    clips = meta.get("input") or {}
    views = {f"data.{k}": clips[k] for k in ("sampling_rate", "short_side_size") if clips}

    def differing(trained: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{key: (trained value, config value)}`` where they differ."""
        now = {key: config[key.split(".")[0]][key.split(".")[1]] for key in trained}
        return {k: (v, now[k]) for k, v in trained.items() if now[k] != v}

    def listed(differ: dict[str, tuple[Any, Any]]) -> tuple[str, str]:
        return (
            ", ".join(f"{k}={v!r} (config: {c!r})" for k, (v, c) in differ.items()),
            " ".join(f"--config.{k}={v}" for k, (v, _) in differ.items()),
        )

    differ = differing(model)
    if differ:
        have, add = listed(differ)
        raise train.TrainingError(
            f"eval mode: {name} was trained with {have}; add {add} to test it as trained"
        )
    differ = differing(views)
    if not differ:
        return [], {}
    have, add = listed(differ)
    warning = f"{name} was trained with {have}: testing the config's views; {add} tests it "
    warning += "as trained"
    return [warning], {k: c for k, (_, c) in differ.items()}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Test the checkpoint in ``workdir``, else ``config.init_from`` (step: config.load_step)."""
    from signnet_jax import train

    train.check_workdir(workdir, "eval")
    train.check_eval_batch(config)
    train.check_value_ranges(config, "eval")
    if config.smoke.enabled:
        train.ensure_smoke(config)
    train.check_shared_workdir(workdir)
    workdir_path = pathlib.Path(workdir)
    ckpt_dir = workdir_path / "checkpoints"
    if not config.test_split:
        raise train.TrainingError(
            "eval mode tests config.test_split, which is empty; set --config.test_split=test"
        )
    own = bool(checkpointing.checkpoint_steps(ckpt_dir))
    if own and config.init_from:
        raise train.TrainingError(
            f"eval mode: both {ckpt_dir} and config.init_from={config.init_from} hold a "
            "checkpoint; drop --config.init_from to evaluate the run in the workdir, or give "
            "another --workdir to evaluate init_from"
        )
    source = ckpt_dir if own else config.init_from
    if not source:
        raise train.TrainingError(
            f"nothing to evaluate: {ckpt_dir} holds no checkpoint and config.init_from is empty"
        )
    try:
        if not checkpointing.checkpoint_steps(source):  # a training workdir: its checkpoints/
            source = checkpointing.resolve_checkpoint(source)
        step = checkpointing.select_step(source, config.load_step)
    except checkpointing.CheckpointError as e:
        raise train.TrainingError(f"{e} (config.load_step={config.load_step!r})") from e
    try:
        meta = checkpointing.load_meta(source, step)
    except checkpointing.CheckpointError as e:
        raise train.TrainingError(str(e)) from e
    warnings, other_views = check_trained_settings(config, meta, f"{source} step {step}")
    for warning in warnings:
        train._log(f"warning: {warning}")
    train._log(f"evaluating {source} step {step} (load_step {config.load_step})")
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.init_from = str(source)
    eval_config.load_step = str(step)
    eval_config.init_reset_head = False
    setup = train.prepare(eval_config)
    for warning in setup.warnings:
        train._log(f"warning: {warning}")
    out = workdir_path / "eval" / eval_folder_name(source, step, own, config, other_views)
    _check_same_result(out / "metrics.json", str(source), step, protocol(config), own)
    with jax.set_mesh(setup.mesh):
        params = train.place_params(setup, config.seed)
        report = evaluate_split(setup, eval_config, params, config.test_split, "test", out)
    train._log(summary_line(report))
    # the whole path, so a later run from another folder can tell whether it is the same
    result = {"checkpoint": os.path.abspath(source), "step": step, "protocol": protocol(config)}
    result["test"] = report
    write_json(out / "metrics.json", result)
    train._log(f"wrote {out}/metrics.json, {config.test_split}_per_class.csv and "
               f"{config.test_split}_confused_pairs.png")  # fmt: skip
    return result
