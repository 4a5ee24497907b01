"""CARE configurations. Choose a preset with `--config=configs/care.py:<preset>` and change
any field with `--config.<field>=<value>`.

Presets: the 16 published settings `r50_100ep` ... `r152_800ep` (trunks r50, r50x2, r101,
r152; 100/200/400/800 epochs), `fmnist_demo` (what `make demo` runs on a CPU),
`fmnist_cpu` (the same network for 14 epochs: learning seen on a CPU), `fmnist_gpu` (what it
runs on a GPU: 100 epochs in bfloat16) and `tiny` (tests);
fine-tuning on 1% or 10% of the labels: `finetune_1pct` and `finetune_10pct` (ImageNet),
`fmnist_finetune_1pct` and `fmnist_finetune_10pct` (Fashion-MNIST).
The default (no preset) is the paper's main setting, `r50_100ep`.
"""
import ml_collections

TRUNKS = {"r50": ("resnet50", 1), "r50x2": ("resnet50", 2), "r101": ("resnet101", 1),
          "r152": ("resnet152", 1)}
EPOCHS = (100, 200, 400, 800)
FINETUNE_PRESETS = ("finetune_1pct", "finetune_10pct", "fmnist_finetune_1pct",
                    "fmnist_finetune_10pct")
PRESETS = (tuple(f"{t}_{e}ep" for t in TRUNKS for e in EPOCHS)
           + ("fmnist_demo", "fmnist_cpu", "fmnist_gpu", "tiny") + FINETUNE_PRESETS)


def paper_config() -> ml_collections.ConfigDict:
  """The release's ImageNet setting (spec): ResNet-50, 100 epochs, batch 1024, SGD."""
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"  # or "linear_eval", "finetune"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      arch="resnet50", width=1, channels=64, stem="auto", hidden_dim=4096,
      projection_dim=256,
      t_stream=dict(num_blocks=5, heads=4, head_dim=128, position_embedding="absolute",
                    # T-stream BatchNorm statistics per group of this many examples (of
                    # each view): the release's plain BatchNorm2d on 128 images per GPU.
                    # <= 0 or >= the batch: the whole batch, as for the `tiny` and
                    # `fmnist_demo` batches (8, 128). Trunk and heads use the whole batch.
                    bn_group_size=128)))
  c.cross_weight = 100.0  # lambda
  c.base_tau = 0.99

  c.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=ml_collections.FieldReference(None, field_type=str),
      folder_root=ml_collections.FieldReference(None, field_type=str), image_size=224,
      train_split="train", eval_split="validation", crop_min_scale=0.08, num_workers=0,
      blur_scale=1.0))  # blur sigma x this (augment.py); 1: the release's at 224 px

  c.global_batch_size = 1024
  c.num_epochs = 100
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.precision = "float32"  # "bfloat16" or "float16" (dynamic loss scaling)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", base_lr=0.05, momentum=0.9, weight_decay=1e-4, warmup_epochs=10.0))

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.profile_steps = 0  # > 0: trace this many steps after the first log period
  c.distributed = False  # call jax.distributed.initialize() (auto-detects SLURM)

  # Watching pretraining learn. With labelled data the online probe (a linear classifier
  # on the stop-gradient trunk features) trains at every step, at negligible cost. Every
  # `every_steps` steps and at the end (0: never), the eval split is classified by
  # weighted kNN (InstDisc's protocol) and by the probe: `knn_top1`, `online_probe_top1`.
  c.monitor = ml_collections.ConfigDict(dict(
      every_steps=0, knn=True, knn_k=200, knn_temperature=0.07,
      knn_bank_size=100_000,  # training examples in the kNN bank (a fixed sample); <= 0: all
      online_probe=True, online_probe_lr=1e-2))  # Adam, cosine to 0

  # Linear evaluation (the release's protocol), run with --config.mode=linear_eval.
  c.linear_eval = ml_collections.ConfigDict(dict(
      pretrained_workdir=ml_collections.FieldReference(None, field_type=str),
      encoder="pretrained",  # or "random_init", "raw_pixels" (baselines)
      augment=True,  # False: train on cached centre-view features (small datasets, fast)
      image_size=-1,  # -1: the pretraining run's; > 0: this resolution instead
      num_epochs=80, global_batch_size=256, base_lr=0.2, momentum=0.9, weight_decay=0.0,
      eval_every_epochs=10))

  # Semi-supervised fine-tuning of the whole trunk with a new linear head, run with
  # --config.mode=finetune. BYOL's protocol (the CARE paper gives none): SGD with Nesterov
  # momentum 0.9, batch 1024, no weight decay, random crops + flips; BYOL swept the lr over
  # {0.005, 0.01, 0.02, 0.05, 0.1} and the epochs over {30, 50} without publishing the
  # choice: 0.05 at batch 1024 and 30 epochs (10%) / 50 epochs (1%) are ours.
  c.finetune = ml_collections.ConfigDict(dict(
      pretrained_workdir=ml_collections.FieldReference(None, field_type=str),
      encoder="pretrained",  # or "random_init" (baseline)
      # "1pct" / "10pct": ImageNet trains on tfds imagenet2012_subset/<labels> (SimCLR's
      # subsets); any other dataset on a class-balanced sample of that fraction of
      # train_split, drawn with label_seed. "all": every training label.
      labels="10pct", label_seed=0,
      image_size=-1,  # -1: the pretraining run's; > 0: this resolution instead
      num_epochs=30, global_batch_size=1024, base_lr=0.0125,  # lr 0.0125 x batch/256
      momentum=0.9, weight_decay=0.0, eval_every_epochs=5))
  return c


def get_config(preset: str = "r50_100ep") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
  c = paper_config()
  if preset == "fmnist_demo":
    _fmnist_demo(c)
  elif preset == "fmnist_cpu":
    _fmnist_cpu(c)
  elif preset == "fmnist_gpu":
    _fmnist_gpu(c)
  elif preset == "tiny":
    _tiny(c)
  elif preset in FINETUNE_PRESETS:
    _finetune(c, preset)
  else:
    trunk, epochs = preset.split("_")
    c.model.arch, c.model.width = TRUNKS[trunk]
    c.num_epochs = int(epochs[:-2])
  return c


def _fmnist_demo(c):
  """Real Fashion-MNIST at its own 28 px, a width-16 ResNet-18: minutes on a CPU.

  The stem's max-pool halves the maps (layer3 4x4, layer4 2x2), which doubles the
  throughput on a CPU. LARS scales each layer's step to 1e-3 x lr of its weights' norm:
  a sub-epoch run needs lr 8 (peak 4 at batch 128) to move them (lr 1 and 24 did worse).
  Crops of at least a quarter of the 28 px image (the release: 8%) did better in the runs
  of docs/fashion_mnist.md. The blur's sigma is scaled by 28/224: the release blurs 224 px
  views by up to 2 px, and 2 px of a 28 px image would wipe out much of a garment's shape.
  The target's EMA starts at tau 0.98, not the paper's 0.99: over runs of a few epochs a
  target that follows the online network faster gave the better probe (two seeds,
  docs/fashion_mnist.md); the 100-epoch fmnist_gpu keeps the paper's.
  """
  c.data.name = "fashion_mnist"
  c.data.image_size = 28
  c.data.eval_split = "test"
  c.data.crop_min_scale = 0.25
  c.data.blur_scale = 28 / 224
  c.model.update(arch="resnet18", channels=16, stem="small_pool", hidden_dim=512,
                 projection_dim=128)
  c.model.t_stream.update(heads=4, head_dim=8)
  c.base_tau = 0.98
  c.global_batch_size = 128
  c.num_train_steps = 200  # 0.43 epoch: a few minutes on a CPU (docs/fashion_mnist.md)
  c.optimizer.update(name="lars", base_lr=8.0, weight_decay=1e-6, warmup_epochs=0.05)
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  # A 10,000-image bank: a sixth of the cost of embedding all 60,000 at each evaluation.
  c.monitor.update(every_steps=100, knn_bank_size=10_000)
  # Features are cached, so the head's epochs cost little: 100 lets it converge. On
  # these unaugmented features lr 0.2 (ImageNet's, on augmented crops) left the head noisy;
  # lr 0.01 was chosen on 10,000 held-out training images (experiments/probe_lr.py).
  c.linear_eval.update(augment=False, num_epochs=100, global_batch_size=256, base_lr=0.01,
                       eval_every_epochs=10)


def _fmnist_cpu(c):
  """The demo's network for 6,560 steps (14 epochs) instead of 200: long enough on a CPU
  for the encoder to pass its random initialisation clearly, sized to finish within 45
  minutes on the project's 2-core AVX-512 VM (longer on older AVX2 ones); why 14 and not
  12: docs/fashion_mnist.md, "Seeing it learn on a CPU".
  Monitors and checkpoints ten times over the run. LARS lr 2 (peak 1 at batch 128), not the
  demo's 8: over 600 steps it gave a better probe and kNN (docs/fashion_mnist.md,
  "Choosing the CPU recipe").
  """
  _fmnist_demo(c)
  c.num_train_steps = 6560
  c.optimizer.base_lr = 2.0
  c.checkpoint_every_steps = 656
  c.monitor.update(every_steps=656)


def _fmnist_gpu(c):
  """CARE on Fashion-MNIST for 100 epochs on one GPU (bfloat16), with the kNN
  monitor and online probe every 10 epochs, then the demo's three linear probes.

  What the paper's setting becomes, and why:
  - Trunk: ResNet-18 at width 32 (layer4 256 channels), `small_pool` stem, 28 px (layer3
    4x4, layer4 2x2): twice the demo's width, so the probe reads 256 features, not 128.
    The T-stream keeps its 5 blocks and the release's proportions: 4 heads of 16 dims
    (= bottleneck width / 4, as 4 x 128 = 2048 / 4). Heads: hidden 1024, output 128.
  - The CARE objective is the paper's: both streams, cross-stream weight 100, tau 0.99 -> 1.
  - Batch 1024 (the paper's), LARS (BYOL's) instead of SGD: base lr 1.0, i.e. peak 4.0,
    the demo's peak step, 10 warm-up epochs of 100 (the paper's ratio), weight decay 1e-6.
    5,800 steps (58 an epoch) keep per-step overheads small on a fast card.
  - Crops of at least 25% of the image and the blur scaled to 28 px (the demo's).
  Budget: `python -m care_jax.summary --config=configs/care.py:fmnist_gpu` counts the
  step's FLOPs; a model this small uses a GPU far less well than R50, so
  experiments/gpu_lease.py measures the step first and sets the epochs to fit its share
  of a lease.
  """
  _fmnist_demo(c)
  c.data.name = "fashion_mnist_idx"  # no tensorflow on the GPU machines
  c.model.update(channels=32, hidden_dim=1024, projection_dim=128)
  c.model.t_stream.update(heads=4, head_dim=16)
  c.precision = "bfloat16"
  c.base_tau = 0.99
  c.global_batch_size = 1024
  c.num_epochs = 100
  c.num_train_steps = -1
  c.optimizer.update(name="lars", base_lr=1.0, weight_decay=1e-6, warmup_epochs=10.0)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1160  # 20 epochs
  c.monitor.update(every_steps=580, knn_bank_size=0)  # every 10 epochs; bank: all 60,000


def _tiny(c):
  """The smallest network that still has every part: for tests only."""
  _fmnist_demo(c)
  c.data.image_size = 16
  c.model.update(channels=4, stem="auto", hidden_dim=32, projection_dim=16)
  c.model.t_stream.update(num_blocks=2, heads=2, head_dim=4)
  c.global_batch_size = 8
  c.num_train_steps = 4
  c.optimizer.update(name="sgd", base_lr=0.05, warmup_epochs=0)
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2


def _finetune(c, preset):
  """Fine-tuning on 1% or 10% of the labels (see c.finetune); on Fashion-MNIST with the
  demo's data settings and a small budget on a CPU."""
  c.mode = "finetune"
  labels = preset.rsplit("_", 1)[1]
  c.finetune.update(labels=labels, num_epochs=50 if labels == "1pct" else 30,
                    eval_every_epochs=10 if labels == "1pct" else 5)
  if preset.startswith("fmnist_"):
    _fmnist_demo(c)
    c.finetune.update(global_batch_size=64 if labels == "1pct" else 256,
                      num_epochs=50 if labels == "1pct" else 20)


# What each field means: docs/config.md is generated from these and the default config
# (`python -m care_jax.config_reference --write`; tests/test_config_reference.py fails when
# a field has no entry here or the page is out of date).
FIELD_HELP = {
    "mode": "'pretrain', 'linear_eval' (a linear probe on a frozen encoder) or 'finetune' "
            "(the whole trunk on 1% / 10% of the labels).",
    "seed": "Initialisation, data order, views and augmentation; a run is a function of it.",
    "model.arch": "Trunk: resnet18, resnet34, resnet50, resnet101 or resnet152.",
    "model.width": "Width multiplier of the bottleneck trunks (2: the paper's R50 2x).",
    "model.channels": "Channels of the stem and of layer1's narrowest convolution.",
    "model.stem": "'imagenet' (7x7 stride 2 + max-pool), 'small' (3x3 stride 1), "
                  "'small_pool' (3x3 + max-pool), or 'auto': small at <= 64 px.",
    "model.hidden_dim": "Hidden width of the projector and predictor MLPs.",
    "model.projection_dim": "Output width of the projector and predictor MLPs.",
    "model.t_stream.num_blocks": "Self-attention blocks of the T-stream (0: none, the "
                                 "T-head on pooled layer3).",
    "model.t_stream.heads": "Attention heads per block.",
    "model.t_stream.head_dim": "Width of each head.",
    "model.t_stream.position_embedding": "'absolute' (the release's) or 'relative'.",
    "model.t_stream.bn_group_size": "T-stream BatchNorm statistics per group of this many "
                                    "examples of each view (the release's per-GPU BN); "
                                    "<= 0 or >= the batch: the whole batch.",
    "cross_weight": "lambda, the weight of the cross-stream term.",
    "base_tau": "Start of the target network's EMA rate, raised to 1 on a cosine.",
    "data.name": "imagenet2012, imagenet2012_subset/1pct or /10pct, fashion_mnist, "
                 "fashion_mnist_idx, image_folder, or another prepared tfds dataset "
                 "(docs/data.md).",
    "data.data_dir": "Where prepared tfds datasets live (None: TFDS_DATA_DIR, else "
                     "~/tensorflow_datasets); for fashion_mnist_idx, the idx files' folder.",
    "data.folder_root": "The root of an image_folder dataset (one folder per split, one "
                        "per class).",
    "data.image_size": "Side of the views in pixels.",
    "data.train_split": "The split pretraining and the probes train on.",
    "data.eval_split": "The split the monitor and the probes evaluate on.",
    "data.crop_min_scale": "Smallest area fraction of a random resized crop.",
    "data.num_workers": "Decoding threads of this process (0: one per core).",
    "data.blur_scale": "The blur's sigma times this (1: the release's at 224 px).",
    "global_batch_size": "Image pairs per step over all devices and processes.",
    "num_epochs": "Pretraining length in epochs.",
    "num_train_steps": "> 0: pretraining length in steps instead of num_epochs.",
    "precision": "'float32', 'bfloat16', or 'float16' with dynamic loss scaling.",
    "optimizer.name": "'sgd' (the release's) or 'lars'.",
    "optimizer.base_lr": "Learning rate at batch 256; the peak is base_lr x batch / 256.",
    "optimizer.momentum": "Momentum of SGD or LARS.",
    "optimizer.weight_decay": "Weight decay.",
    "optimizer.warmup_epochs": "Linear warm-up before the cosine decay, in epochs.",
    "log_every_steps": "Steps between metric lines (and divergence checks).",
    "checkpoint_every_steps": "Steps between checkpoints (and at the end, and on a stop).",
    "keep_checkpoints": "Checkpoints kept; older ones are deleted.",
    "profile_steps": "> 0: trace this many steps after the first log period.",
    "distributed": "Call jax.distributed.initialize() (detects SLURM and other clusters).",
    "monitor.every_steps": "Steps between kNN / online-probe evaluations (0: never; also at "
                           "the end when > 0).",
    "monitor.knn": "Report weighted-kNN top-1 (knn_top1).",
    "monitor.knn_k": "Neighbours of the kNN vote.",
    "monitor.knn_temperature": "Temperature of the kNN vote's weights.",
    "monitor.knn_bank_size": "Training examples in the kNN bank (a fixed sample; <= 0: all).",
    "monitor.online_probe": "Train a linear probe on the stop-gradient features at every "
                            "step (online_probe_top1).",
    "monitor.online_probe_lr": "The online probe's Adam learning rate (cosine to 0).",
    "linear_eval.pretrained_workdir": "The pretraining run whose encoder is evaluated.",
    "linear_eval.encoder": "'pretrained', or the baselines 'random_init' and 'raw_pixels'.",
    "linear_eval.augment": "Train on random crops + flips (the release's); False: on cached "
                           "centre-view features (fast, small datasets).",
    "linear_eval.image_size": "-1: the pretraining run's resolution; > 0: this one.",
    "linear_eval.num_epochs": "Epochs of the linear head.",
    "linear_eval.global_batch_size": "Examples per step.",
    "linear_eval.base_lr": "Learning rate at batch 256 (cosine to 0).",
    "linear_eval.momentum": "SGD momentum.",
    "linear_eval.weight_decay": "Weight decay.",
    "linear_eval.eval_every_epochs": "Epochs between evaluations (and at the end).",
    "finetune.pretrained_workdir": "The pretraining run whose trunk is fine-tuned.",
    "finetune.encoder": "'pretrained', or the baseline 'random_init'.",
    "finetune.labels": "'1pct', '10pct' (ImageNet: SimCLR's subsets; else a class-balanced "
                       "sample) or 'all'.",
    "finetune.label_seed": "Seed of the class-balanced sample (datasets other than "
                           "ImageNet).",
    "finetune.image_size": "-1: the pretraining run's resolution; > 0: this one.",
    "finetune.num_epochs": "Epochs of fine-tuning.",
    "finetune.global_batch_size": "Examples per step.",
    "finetune.base_lr": "Learning rate at batch 256 (cosine to 0; Nesterov SGD).",
    "finetune.momentum": "Nesterov momentum.",
    "finetune.weight_decay": "Weight decay.",
    "finetune.eval_every_epochs": "Epochs between evaluations (and at the end).",
}
