"""ITPruner on ResNet-50 / ImageNet: widths from layer importances under 54.9% of the dense MACs.

Command (Cloud TPU or GPU, ImageNet prepared as TFDS ``imagenet2012`` in array_record format)::

  python -m train.main --config=resnet50_itpruner --config.data.data_dir=gs://my-bucket/tfds \
      --config.dense.path=gs://my-bucket/resnet50_dense   # an orbax checkpoint (models.import_torch)
  # a short run (a few epochs): a tenth of the recipe's lr, distilled from the dense model; the long
  # schedule's lr, cut short, ends below the after-surgery accuracy (README, 'Short fine-tunes')
  python -m train.main --config=resnet50_itpruner ... --config.finetune.epochs=2 --config.finetune.lr=0.01 \
      --config.finetune.distill_weight=0.5

Paper setting it reproduces (ITPruner, ResNet-50 / ImageNet, -45.3% FLOPs at 75.75% top-1): 100 calibration
images at 224x224, BatchNorm in batch-statistics mode, linear CKA, beta 2000, the reference's 2.3G budget of its
4187.1M units taken as the ratio 0.549 of the exact dense count; channels kept by L1 norm (the reference's
initialisation of the thin network); ITPruner's ImageNet recipe: SGD, Nesterov momentum 0.9, lr 0.1 per 256
images, one warmup epoch then a per-step cosine, weight decay 4e-5 sparing BN scales and biases, label smoothing
0.1, 120 epochs. The width variables are the 32 inner widths of the bottleneck blocks; the stem and the stage widths
(the reference's other 5 variables) stay dense, since the residual streams tie them across blocks. Precision as
``resnet50_apib``: bfloat16 convolutions and matmuls on a GPU or TPU (``half_precision="auto"``).

Measured: not run end to end here yet, so there is no time or result to report.
"""

from train.configs.base import use_itpruner
from train.configs.resnet50_apib import get_config as apib_config


def get_config():
  config = use_itpruner(apib_config(), budget=2300.5, dense_cost=4187.1, beta=2000.0, num_images=100,
                        batch_size=50, imagenet=True)
  config.finetune.checkpoint_every_steps = 2000
  return config
