"""python -m signnet_jax.main --config configs/wlasl2000.py --workdir runs/wlasl2000 --config.records_dir=records/wlasl2000 --config.init_from=runs/asl_citizen

SignNet on WLASL2000: the published recipe (VideoMAEv2 ViT-B, 32 frames, sampling
rate 2, 224 px), warm-started from a model fine-tuned on ASL-Citizen. Every
other config imports this one and overrides what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"  # train (train, periodic val, final multi-view test) | eval
    c.seed = 0
    c.records_dir = ""  # output of data_prep.build_records (local or gs://)
    c.train_split = "train"
    c.val_split = "val"
    c.test_split = "test"
    c.init_from = ""  # a converted or trained checkpoint dir (warm start)
    # Which step to read from a checkpoint folder: init_from's in train mode, the workdir's
    # (else init_from's) in eval mode. 'latest', 'best' (highest val top-1, the earlier step
    # on a tie) or a number.
    c.load_step = "latest"
    # Start a new head when init_from has other classes (ASL-Citizen -> WLASL). With the
    # same class names in another order the head rows are permuted instead.
    c.init_reset_head = True
    # The synthetic smoke dataset (data_prep/synthetic.py), generated into records_dir
    # on first use when enabled.
    c.smoke = ml_collections.ConfigDict()
    c.smoke.enabled = False
    c.smoke.classes = 10
    c.smoke.train_per_class = 24
    c.smoke.val_per_class = 6
    c.smoke.test_per_class = 6
    c.smoke.frames = 24
    c.smoke.size = 64

    c.model = ml_collections.ConfigDict()
    c.model.preset = "B"
    c.model.num_frames = 32
    c.model.img_size = 224
    c.model.drop_path_rate = 0.3
    c.model.head_drop_rate = 0.0
    c.model.init_scale = 0.001
    # compute dtype; parameters stay float32. float16 (with loss scaling, optim.loss_scale)
    # for GPUs whose tensor cores have no bfloat16: T4, V100
    c.model.dtype = "bfloat16"
    # recompute each block in the backward pass: less memory for more work. remat_policy: what
    # a rematerialised block keeps, nothing but its input (full) or also its matmuls' outputs
    # (save_dots: the attention runs again, not the matmuls with weights; README: Device memory)
    c.model.remat = False
    c.model.remat_policy = "full"
    # run the blocks as one scan over their stacked weights: XLA compiles one block instead of
    # all of them (a v5e compiles ViT-B's step in 0.28x the time, ViT-L's in 0.15x), the same
    # numbers (within rounding in bfloat16), one more copy of the blocks' weights and gradients
    # in the step (in the compute dtype); with remat only (README: The model)
    c.model.scan_layers = False
    # attention kernel: auto (per backend) | dot_product_attention | cudnn | splash | explicit
    c.model.attention = "auto"
    # architecture overrides for non-preset sizes (0: the preset's)
    c.model.embed_dim = 0
    c.model.depth = 0
    c.model.num_heads = 0
    c.model.mlp_dim = 0

    c.data = ml_collections.ConfigDict()
    # videos per optimizer update, over all devices and processes: 16 in SignNet's launch
    # scripts (2 a GPU on 8 GPUs, 4 a GPU on 4), so the lr is 1e-3 x 16 / 256 = 6.25e-5
    c.data.batch_size = 16
    c.data.sampling_rate = 2
    c.data.repeated_aug = 2  # augmented clips per video per step
    c.data.crop_scale = (0.08, 1.0)  # random resized crop area range
    c.data.flip = "plain"  # plain (as published) | hht (mirror quadrants, swap hands)
    c.data.rand_augment = "rand-m7-n4-mstd0.5-inc1"
    c.data.reprob = 0.25
    c.data.short_side_size = 224
    c.data.test_num_segment = 3
    c.data.test_num_crop = 1
    c.data.eval_batch_size = 64  # views per eval step, over all devices
    # views each device takes through the model at once in evaluation: its share of an eval
    # batch runs in chunks of this many, so this (not eval_batch_size) sets the eval step's
    # memory; 0: all of the share at once
    c.data.eval_views_per_device = 4
    c.data.num_workers = 8  # grain worker processes per host
    c.data.num_threads = 2
    c.data.prefetch = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1e-3  # scaled by batch_size / 256, as are min_lr and warmup_lr
    c.optim.min_lr = 1e-6
    # The original warms up from 0: its run_class_finetuning.py scales --warmup_lr (1e-8) but
    # never passes it to utils.cosine_scheduler, whose start_warmup_value defaults to 0.
    c.optim.warmup_lr = 0.0
    c.optim.warmup_epochs = 5
    c.optim.epochs = 50
    c.optim.weight_decay = 0.1
    c.optim.layer_decay = 0.9
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_grad = 0.0  # 0: no clipping
    c.optim.grad_accum = 1  # micro-batches per update (batch_size must divide)
    c.optim.ema_decay = 0.0  # 0: no EMA of the weights
    # model.dtype float16 only: dynamic loss scaling as DeepSpeed's, with VideoMAEv2's fp16
    # settings (SignNet's runs). An update whose gradients overflow is skipped; the scale
    # starts at loss_scale, halves when an overflow finds no hysteresis allowance left (each
    # overflow spends one; minimum 1), doubles (the allowance restored) every window updates
    # after the last overflow.
    c.optim.loss_scale = 128.0  # 2 ** initial_scale_power
    c.optim.loss_scale_window = 128
    c.optim.loss_scale_hysteresis = 2

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.1
    c.loss.mixup = 0.8
    c.loss.cutmix = 1.0
    c.loss.mixup_prob = 1.0
    c.loss.switch_prob = 0.5
    # Clips mixed together, each group with its own lambda and cutmix box, as one GPU's batch
    # in the original; 0: the whole (micro-)batch. Clips per device keeps mixing on each device
    # (no clip crosses devices) but makes the trajectory depend on the device count.
    c.loss.mixup_group_size = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1  # >1: shard parameters and optimizer state over this many devices
    c.mesh.num_devices = 0  # 0: every device of every process; N: the first N (debugging)
    # logical parameter axis -> mesh axis ('' keeps the axis replicated)
    c.mesh.rules = ml_collections.ConfigDict(
        dict(embed="fsdp", mlp="", qkv="", heads="", classes="", norm="")
    )

    c.train = ml_collections.ConfigDict()
    c.train.max_steps = 0  # >0: stop after this many updates (the schedule still spans epochs)
    # >0: a jax.profiler trace of this many steps after step profile_start (or after the
    # first step of a run resumed past it) into WORKDIR/tensorboard/plugins/profile
    c.train.profile_steps = 0
    c.train.profile_start = 10
    c.train.log_every = 50
    c.train.val_every_epochs = 1
    c.train.checkpoint_every_steps = 0  # 0: once per epoch
    c.train.keep_checkpoints = 2  # latest N are kept, plus the best by val top-1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # jax.distributed.initialize() (TPU pods, multi-node GPU)
    c.distributed.coordinator_address = ""  # empty: let JAX detect it (TPU, SLURM)
    c.distributed.num_processes = 0  # 0: let JAX detect it
    c.distributed.process_id = -1  # -1: let JAX detect it
    c.distributed.local_device_ids = ""  # e.g. "0" (one process per GPU); empty: JAX's choice
    return c
