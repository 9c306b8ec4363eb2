# Training settings read by tools/lazyconfig_train_net.py (detectron2's configs/common/train.py
# plus `seed`: with seed >= 0 a run is deterministic and resumes exactly).
train = dict(
    output_dir="./output/lazy",
    init_checkpoint="",  # MODEL.WEIGHTS of the yaml configs
    max_iter=90000,
    # precision: "auto" (bf16 on CUDA where supported, else fp16 if enabled, else fp32; fp32 on
    # CPU), "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler): randwire_d2/engine/precision.py
    amp=dict(enabled=False, precision="auto"),
    ddp=dict(  # options for DistributedDataParallel
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    checkpointer=dict(period=5000, max_to_keep=100),  # options for PeriodicCheckpointer
    eval_period=0,  # 0: evaluate once, after training
    log_period=20,
    device="cuda",
    seed=-1,  # < 0: a random seed shared by all processes (kept in the checkpoints)
)
