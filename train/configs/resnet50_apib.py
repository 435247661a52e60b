"""APIB on ResNet-50 / ImageNet: to 37.9% of the dense MACs (the reference README's 1.55G target), fine-tuned.

Command (Cloud TPU or GPU, ImageNet prepared as TFDS ``imagenet2012`` in array_record format; a TFRecord copy is
converted once with ``python -m train.datasets.convert_tfrecord --data_dir=gs://my-bucket/tfds``)::

  python -m train.main --config=resnet50_apib --config.data.data_dir=gs://my-bucket/tfds \
      --config.dense.path=gs://my-bucket/resnet50_dense   # an orbax checkpoint (models.import_torch)
  # a short run (a few epochs): a tenth of the recipe's lr, distilled from the dense model; the long
  # schedule's lr, cut short, ends below the after-surgery accuracy (README, 'Short fine-tunes')
  python -m train.main --config=resnet50_apib ... --config.finetune.epochs=2 --config.finetune.lr=0.0025 \
      --config.finetune.distill_weight=0.5

Paper setting it reproduces (APIB, ResNet-50 / ImageNet): 64 calibration images at 224x224 (one batch, as the
reference), BatchNorm in batch-statistics mode, omega 1, tolerance 1%, the target 1,550,000,000 of the reference
README taken as a ratio of the dense count (thop adds about 1.1% of BN terms to ResNet-50's 4,089M MACs, so ratios
are what carry over); conv3's target Y is its own output by default (``calib.resnet50_conv3_y="pooled"`` gives the
reference code's pooled feature); fine-tuning with the reference recipe: SGD, momentum 0.9, weight decay 1e-4 on
every parameter, lr 0.025, per-step cosine, batch 64, random-resized-crop + flip; evaluation at 224 after resizing
the shorter side to 256. The paper reports -56% FLOPs at -0.08% top-1 (a different operating point than its README).
Epochs: the reference default 135; on a TPU slice raise the batch and the learning rate together. Precision:
``half_precision="auto"``, bfloat16 convolutions and matmuls on a GPU or TPU (float32 parameters, BatchNorm and
losses) and float32 on a CPU; ``--config.half_precision=False`` for float32 everywhere.

Measured: not run end to end here yet, so there is no time or result to report; the test suite runs its stages
at tiny scale.
"""

from train.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.model.name = "resnet50"
  config.half_precision = "auto"  # bfloat16 convolutions and matmuls on a GPU or TPU, float32 on a CPU
  config.data.name = "imagenet2012"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = 224
  config.data.augment = "imagenet"
  # Grain worker processes decoding and cropping (benchmarks.input_pipeline: about 340 images per CPU-second, so
  # one chip's ~2,000 images/s of ResNet-50 needs about 6 host cores).
  config.data.num_workers = 8
  config.dense.source = "checkpoint"
  config.dense.path = "resnet50_dense"
  config.calib.num_images = 64
  config.calib.batch_size = 64
  config.select.ratio = 0.379
  config.finetune.batch_size = 64
  config.finetune.lr = 0.025
  config.finetune.checkpoint_every_steps = 2000
  config.eval.batch_size = 250
  config.eval.bn_recalibrate_steps = 50
  return config
