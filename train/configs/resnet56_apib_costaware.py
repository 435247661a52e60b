"""APIB with the cost-aware penalty on the pretrained CIFAR-10 ResNet-56: to 57M MACs, then fine-tuned.

Command::

  python -m train.main --config=resnet56_apib_costaware
  # a short run on a CPU (a short schedule wants a lower learning rate; see resnet56_apib)
  python -m train.main --config=resnet56_apib_costaware --config.finetune.epochs=3 --config.finetune.lr=0.01 \
      --config.finetune.distill_weight=0.5

``resnet56_apib`` with one change: every channel's Lasso penalty is weighted by the MACs its removal saves
(``select.cost_aware="macs"``), so that the single global lambda trades kept dependence per MAC, the target's own
unit, instead of per channel. The evidence for it comes from ResNet-20 (``resnet20_apib_costaware``: better than
APIB after a 10-epoch fine-tune on every one of 3 seeds); on ResNet-56, one seed of the same study (50% of the MACs removed, 128 calibration images, 3 distilled epochs at lr
0.01; the CPU allowed no more) agrees: 89.89% right after surgery and 94.41% after the fine-tune, against APIB's
86.67% / 93.55%, ITPruner's 87.31% / 93.98% and uniform L1's 84.30% / 93.76% (465 validation images: 1 image is
0.22 points, so only the after-surgery gap is clearly more than noise). Figures: benchmarks README, "Pruning quality
at a real fine-tuning budget" (ResNet-20 and ResNet-56 blocks).

Calibration size: on ResNet-20 the cost-aware selection is stable (widths and channels >= 0.9 against 2048 images)
from 512 images, against 256 for plain APIB; ``--config.calib.num_images=512`` for a stable selection.
"""

from train.configs import resnet56_apib


def get_config():
  config = resnet56_apib.get_config()
  config.select.cost_aware = "macs"
  return config
