"""APIB with the cost-aware penalty on the pretrained CIFAR-10 ResNet-20, to 50% of its 40.55M MACs.

Command::

  python -m train.main --config=resnet20_apib_costaware
  # a short run on a CPU (a short schedule wants a lower learning rate; see resnet56_apib)
  python -m train.main --config=resnet20_apib_costaware --config.finetune.epochs=10 --config.finetune.lr=0.01 \
      --config.finetune.distill_weight=0.5

``resnet20_apib`` with one change: every channel's Lasso penalty is weighted by the MACs its removal saves
(``select.cost_aware="macs"``), so that the single global lambda trades kept dependence per MAC, the target's own
unit, instead of per channel. Why it is a named config: in the quality study at a real fine-tuning budget (50% of
the MACs removed, 128 calibration images, 10 distilled epochs at lr 0.01, 3 seeds) it beat the paper's APIB on every
seed, 91.47% +- 0.25 (91.18-91.61) against 89.18% +- 1.74 (87.31-90.75) after fine-tuning, and right after surgery
65.02% +- 3.13 against 62.15% +- 0.22, with the highest after-surgery accuracy of all methods there (FPGM at uniform
widths fine-tuned to 92.11% +- 1.08, within the spread). Its widths are more uneven than APIB's, not less (one block
of stage 1 keeps 3 of 16 channels, one of stage 3 keeps 60-62 of 64): it spends the budget where channels are cheap.
Figures: benchmarks README, "Pruning quality at a real fine-tuning budget".

Calibration size: at 128 images (the paper's) the cost-aware selection agrees 0.95 (widths) and 0.88 (channels,
Jaccard) with a 2048-image one; it is stable (both >= 0.9) from 512 images
(``--config.calib.num_images=512``), against 256 for plain APIB.
"""

from train.configs import resnet20_apib


def get_config():
  config = resnet20_apib.get_config()
  config.select.cost_aware = "macs"
  return config
