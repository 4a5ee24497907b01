"""CARE configurations. Choose a preset with `--config=configs/care.py:<preset>` and change
any field with `--config.<field>=<value>`.

Presets: the 16 published settings `r50_100ep` ... `r152_800ep` (trunks r50, r50x2, r101,
r152; 100/200/400/800 epochs), `fmnist_demo` (what `make demo` runs) and `tiny` (tests).
The default (no preset) is the paper's main setting, `r50_100ep`.
"""
import ml_collections

TRUNKS = {"r50": ("resnet50", 1), "r50x2": ("resnet50", 2), "r101": ("resnet101", 1),
          "r152": ("resnet152", 1)}
EPOCHS = (100, 200, 400, 800)
PRESETS = tuple(f"{t}_{e}ep" for t in TRUNKS for e in EPOCHS) + ("fmnist_demo", "tiny")


def paper_config() -> ml_collections.ConfigDict:
  """The release's ImageNet setting (spec): ResNet-50, 100 epochs, batch 1024, SGD."""
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"  # or "linear_eval"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      arch="resnet50", width=1, channels=64, stem="auto", hidden_dim=4096,
      projection_dim=256,
      t_stream=dict(num_blocks=5, heads=4, head_dim=128, position_embedding="absolute")))
  c.cross_weight = 100.0  # lambda
  c.base_tau = 0.99

  c.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=ml_collections.FieldReference(None, field_type=str),
      folder_root=ml_collections.FieldReference(None, field_type=str), image_size=224,
      train_split="train", eval_split="validation", crop_min_scale=0.08, num_workers=0))

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

  # Linear evaluation (the release's protocol), run with --config.mode=linear_eval.
  c.linear_eval = ml_collections.ConfigDict(dict(
      pretrained_workdir=ml_collections.FieldReference(None, field_type=str),
      encoder="pretrained",  # or "random_init", "raw_pixels" (baselines)
      augment=True,  # False: train on cached centre-view features (small datasets, fast)
      num_epochs=80, global_batch_size=256, base_lr=0.2, momentum=0.9, weight_decay=0.0,
      eval_every_epochs=10))
  return c


def get_config(preset: str = "r50_100ep") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
  c = paper_config()
  if preset == "fmnist_demo":
    _fmnist_demo(c)
  elif preset == "tiny":
    _tiny(c)
  else:
    trunk, epochs = preset.split("_")
    c.model.arch, c.model.width = TRUNKS[trunk]
    c.num_epochs = int(epochs[:-2])
  return c


def _fmnist_demo(c):
  """Real Fashion-MNIST at its own 28 px, a width-16 ResNet-18: minutes on a CPU.

  The stem's max-pool halves the maps (layer3 4x4, layer4 2x2), which doubles the
  throughput on a CPU. LARS scales each layer's step to 1e-3 x lr of its weights' norm:
  a sub-epoch run needs lr 8 (peak 4 at batch 128) to move them; lr 1 and 24 did worse.
  Crops of at least a quarter of the 28 px image (the release: 8%): 0.79 against 0.74 in
  one run each, though runs vary by up to 15 points with the seed (README).
  """
  c.data.name = "fashion_mnist"
  c.data.image_size = 28
  c.data.eval_split = "test"
  c.data.crop_min_scale = 0.25
  c.model.update(arch="resnet18", channels=16, stem="small_pool", hidden_dim=512,
                 projection_dim=128)
  c.model.t_stream.update(heads=4, head_dim=8)
  c.global_batch_size = 128
  c.num_train_steps = 200  # ~3.5 minutes with compilation on 2 CPU cores (0.43 epoch)
  c.optimizer.update(name="lars", base_lr=8.0, weight_decay=1e-6, warmup_epochs=0.05)
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  # Features are cached, so the head's epochs cost little: 100 lets it converge.
  c.linear_eval.update(augment=False, num_epochs=100, global_batch_size=256, base_lr=0.2,
                       eval_every_epochs=10)


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
