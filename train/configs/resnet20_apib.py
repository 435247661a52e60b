"""APIB on the pretrained CIFAR-10 ResNet-20, to 50% of its 40.55M MACs, then fine-tuned.

Command::

  python -m train.main --config=resnet20_apib
  # a short run on a CPU (see resnet56_apib: a short schedule wants a lower learning rate)
  python -m train.main --config=resnet20_apib --config.finetune.epochs=2 --config.finetune.lr=0.01 \
      --config.finetune.distill_weight=0.5

APIB's paper has no ResNet-20 setting; this applies its ResNet-56 recipe (omega 1, tolerance 1%, 128 calibration
images, BatchNorm in batch-statistics mode, 135 epochs of SGD at lr 0.1) at half the MACs. Dense weights: the shared
PyTorch ResNet-20 (91.78% on the CIFAR-10 test set as published). Data as in ``resnet56_apib``.

Calibration size: ``calib.num_images`` stays the paper's 128, which is below where APIB's selection stops moving on
this network (benchmarks README, "how many calibration images?"; 50% removed, seed 0): against a 2048-image
selection, the channels agree 0.85 (Jaccard, mean over layers) and the widths 0.94 at 128, and both stay >= 0.9
from 256 images. ``--config.calib.num_images=256`` is the smallest stable choice; with normalised problems
(``select.normalized=True``) it takes 1024.

Measured: not run end to end here yet, so there is no time or result to report.
"""

from train.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.model.name = "resnet20"
  config.dense.source = "npz"
  config.dense.path = "../shared/weights/resnet20_cifar10.npz"
  config.select.ratio = 0.5
  return config
