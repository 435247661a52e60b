"""Defaults shared by every experiment config; each config file starts from :func:`get_base_config`.

Every knob of the program is here, with its meaning; a config file sets what its experiment changes. Overrides on
the command line use the same names: ``--config.finetune.epochs=2``.
"""

from __future__ import annotations

import ml_collections


def _training(epochs: int, lr: float) -> ml_collections.ConfigDict:
  """SGD with momentum, a cosine schedule and weight decay: the fine-tuning (and pre-training) recipe."""
  t = ml_collections.ConfigDict()
  t.epochs = epochs
  t.batch_size = 128          # global batch, split over all devices
  t.lr = lr                   # peak learning rate (after warmup)
  t.momentum = 0.9
  t.nesterov = False
  t.warmup_epochs = 0.0       # linear warmup from 0, then cosine to 0 (per step)
  t.weight_decay = 1e-4
  t.decay_bn_and_bias = True  # APIB decays every parameter; ITPruner excludes BN scales and biases
  t.label_smoothing = 0.0
  t.distill_weight = 0.0      # knowledge distillation from the dense model: loss = (1 - w) CE + w T^2 KL
  t.distill_temperature = 4.0
  t.eval_every_epochs = 1
  t.checkpoint_every_steps = 200
  t.keep_checkpoints = 2
  t.log_every_steps = 50
  return t


def apib_recipe(epochs: int = 135, lr: float = 0.1) -> ml_collections.ConfigDict:
  """APIB's fine-tuning (its ``train.py``): SGD, momentum 0.9 (not Nesterov), weight decay 1e-4 on every parameter
  (BN and biases included), plain cross-entropy, cosine to 0 without warmup, 135 epochs, batch 128 (64 on
  ImageNet), lr 0.1 (CIFAR) or 0.025 (ResNet-50)."""
  return _training(epochs, lr)


def itpruner_recipe(imagenet: bool = False) -> ml_collections.ConfigDict:
  """ITPruner's training after selection. CIFAR: SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, cosine,
  300 epochs, batch 128, no label smoothing. ImageNet: Nesterov, lr 0.1 per 256 images, 1 warmup epoch then a
  per-step cosine, weight decay 4e-5 sparing BN and biases, label smoothing 0.1, 120 epochs (ResNet-50)."""
  t = _training(120 if imagenet else 300, 0.1)
  t.nesterov = True
  if imagenet:
    t.batch_size = 256
    t.warmup_epochs = 1.0
    t.weight_decay = 4e-5
    t.decay_bn_and_bias = False
    t.label_smoothing = 0.1
  else:
    t.weight_decay = 5e-4
  return t


def use_itpruner(config: ml_collections.ConfigDict, *, budget: float, dense_cost: float, beta: float,
                 num_images: int, batch_size: int, imagenet: bool = False) -> ml_collections.ConfigDict:
  """Sets ITPruner's selection and training on ``config``: ``num_images`` calibration images, importance sharpness
  ``beta``, channels by L1 norm (the reference's fill), and the reference's budget, stated in its own cost units
  (``budget`` of a dense ``dense_cost``), taken as the ratio of the exact dense MACs; then :func:`itpruner_recipe`."""
  config.calib.num_images = num_images
  config.calib.batch_size = batch_size
  config.select.method = "itpruner"
  config.select.criterion = "l1"
  config.select.ratio = budget / dense_cost
  config.select.itpruner.beta = beta
  config.finetune = itpruner_recipe(imagenet=imagenet)
  return config


def get_base_config() -> ml_collections.ConfigDict:
  """The defaults of every field (a CIFAR-10 ResNet-56 pruned by APIB to 45% of its MACs)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Call jax.distributed.initialize() with no arguments first (a TPU slice, a cluster JAX detects); elsewhere give
  # train.main --coordinator_address, --num_processes and --process_id instead, or use python -m train.launch.
  config.distributed = False
  # Mixed precision: True runs every convolution and matmul in bfloat16 (training, evaluation and calibration's
  # forward passes); parameters, optimizer state, BatchNorm statistics, losses and calibration Grams stay float32.
  # "auto": bfloat16 on a GPU or TPU, float32 on a CPU, decided when the program starts (after the multi-host
  # set-up, which must come before anything asks JAX for its backend). False, True or "auto".
  config.half_precision = ml_collections.FieldReference(False, field_type=object)

  config.model = ml_collections.ConfigDict()
  # A zoo name (resnet20/32/44/56/110, vgg16, resnet50, googlenet, mobilenetv2, mobilenetv2_imagenet), or your own
  # network: "package.module:function" or "path/to/file.py:function", a factory returning a Flax NNX model, called
  # with model.kwargs (and num_classes, rngs where it takes them). See the README's "Your own network".
  config.model.name = "resnet56"
  config.model.widths = ml_collections.FieldReference(None, field_type=tuple)  # dense widths; None: the default
  config.model.kwargs = ml_collections.ConfigDict()  # a factory's keyword arguments, e.g. {"width": 16}

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10_folder"
  config.data.data_dir = "~/tensorflow_datasets"
  config.data.source_dir = "../shared/data/cifar10-subset/cifar-10-batches-bin"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.calib_split = "train"
  config.data.image_size = 32
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  config.data.augment = "cifar"
  config.data.val_fraction = 0.1
  config.data.num_workers = 0

  # Where the dense model comes from: "npz" (a zoo model's PyTorch weights, names and layout), "checkpoint" (orbax,
  # as written by models.import_torch, models.checkpoint.save or this program), "pretrain" (trained here with the
  # `pretrain` recipe) or "factory" (a factory model as its factory returns it: the factory loads its weights).
  config.dense = ml_collections.ConfigDict()
  config.dense.source = "npz"
  config.dense.path = "../shared/weights/resnet56_cifar10.npz"

  config.pretrain = _training(epochs=10, lr=0.1)

  config.calib = ml_collections.ConfigDict()
  config.calib.num_images = 128     # n, as in the APIB paper (128 CIFAR, 64 ImageNet)
  config.calib.batch_size = 128     # images per forward pass; problems of the batches add up
  config.calib.seed = 0
  config.calib.bn_mode = "batch"    # "batch": BatchNorm with batch statistics (the reference code), or "running"
  config.calib.augment = False      # the reference draws augmented training images
  config.calib.resnet50_conv3_y = "block"  # ResNet-50 conv3's target: its own output, or "pooled" (reference)
  # A channel group read by several layers (a residual stream read by the next block's convs and a squeeze-excite
  # gate, a concatenation read by two branches): "first" takes X and Y of the first reader in forward order (APIB's
  # choice on the zoo, where each decision has one reader); "sum" adds one problem per reader (every reader's
  # dependence counts).
  config.calib.consumers = "first"

  config.select = ml_collections.ConfigDict()
  # How the widths are set: "apib" (one global HSIC Lasso penalty searched to the target), "itpruner" (layer
  # importances from the normalised HSIC between layers, then an integer allocation under the budget), "uniform"
  # (one kept fraction for every layer) or "global" (one threshold on a criterion's normalised scores).
  config.select.method = "apib"
  # Which channels fill them: "hsic_lasso" (APIB), or a baseline criterion: random, l1, l2, fpgm, bn_scale,
  # taylor, hrank, chip. With method "apib" and another criterion, APIB's widths are filled by that criterion.
  config.select.criterion = "hsic_lasso"
  config.select.global_normalize = "l2"  # per-layer score normalisation of method "global"
  config.select.target = "macs"     # "macs" or "params"
  config.select.ratio = 0.454       # kept fraction of the dense model's count ...
  config.select.absolute = 0.0      # ... or an absolute count (used when > 0)
  config.select.tolerance = 0.01
  # Minimum channels per decision: a count (>= 1), or a float in (0, 1), a fraction of each dense width
  # (ceil(omega * width), e.g. 0.1). A float field, so that either parses from the command line.
  config.select.omega = 1.0
  config.select.round_to = 0        # widths rounded up to a multiple; 0: 8 on GPU/TPU, 1 on CPU
  config.select.positive = True     # False: the reference code's signed Lasso (faithful mode)
  config.select.bandwidth = "apib"  # gamma = 1 / (values per sample), for every channel and the output
  config.select.normalized = False  # Frobenius-normalised Grams (pyHSICLasso); APIB does not normalise
  # APIB variants (defaults: the paper's method). cost_aware: "macs" or "params" weighs each channel's Lasso
  # penalty by what its removal saves at the dense widths (mean weight 1), so that the one global lambda trades
  # kept dependence per unit of cost; "none": every channel's penalty is lambda.
  config.select.cost_aware = "none"
  # How HSIC Lasso fills a width set by another method beyond its support (uniform, ITPruner's widths):
  # "relevance" (by q, the default) or "residual" (greedy by the correlation with the residual q - Q beta, with
  # least-squares refits: see hsic_jax/_fill.py).
  config.select.fill = "relevance"
  config.select.grid = 24
  config.select.max_steps = 40
  config.select.itpruner = ml_collections.ConfigDict()
  config.select.itpruner.beta = 500.0       # a_i = exp(-beta * rhat_i); the reference's value for ResNet-56
  config.select.itpruner.normalize = True   # rhat = r / sum(r) (the reference skips it only when beta == 1)
  config.select.itpruner.kernel = "linear"  # "linear" (linear CKA, the reference) or "gaussian" (median bandwidth)
  config.select.itpruner.params_ratio = 0.0  # > 0: also keep params under this fraction of the dense model's
  # "reference": ITPruner's SLSQP from the dense widths (stops early on its tiny objective: near-uniform widths
  # tilted by importance, the published ones), rounded, then repaired until the budget holds with widths >= omega;
  # "search": the optimum of the same linear objective (most layers end at their minimum or dense width).
  config.select.itpruner.solver = "reference"

  config.finetune = apib_recipe()

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  config.eval.bn_recalibrate = True     # re-estimate BN statistics on training data before the one-shot eval
  config.eval.bn_recalibrate_steps = 20
  return config
