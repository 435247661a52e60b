"""ITPruner on the pretrained CIFAR-10 ResNet-20: widths from layer importances under 48.1% of the dense MACs.

Command::

  python -m train.main --config=resnet20_itpruner
  # a short run on a CPU:
  python -m train.main --config=resnet20_itpruner --config.finetune.epochs=2 --config.finetune.lr=0.01 \
      --config.finetune.distill_weight=0.5 --workdir=runs/r20_itp

Paper setting it reproduces (ITPruner, ResNet-20 / CIFAR-10): 100 calibration images, linear CKA, beta 246, the
reference's budget of 20M of its 41.57M units taken as the ratio 0.481 of the exact dense count. The same
differences from the reference as ``resnet56_itpruner`` (pretrained weights kept and filled by L1 norm, inner
block widths and activations as the variables and features, the reference's solver repaired to the exact budget).
With ITPruner's own cost model and budget, these importances give back its published widths
``[11, 11, 11, 22, 21, 22, 45, 43, 48]`` exactly (``tests/test_allocation.py``).
Data: as in ``resnet56_apib``; dense weights: the shared PyTorch ResNet-20.
Calibration size: ITPruner's widths barely move with it (benchmarks README, "how many calibration images?"; 50%
removed, seed 0): against 2048 images, widths 0.94 and L1-filled channels 0.96 from 32 images up, so the
reference's 100 images suffice; filled by HSIC Lasso (``select.criterion=hsic_lasso``) the channels need 1024 to
stay >= 0.9 (0.85 at 128).

Measured (2-core CPU, 2026-12-07), the short run above (2 epochs at lr 0.01 with distillation instead of the
recipe's 300): 40.55M -> 19.24M MACs (47.5%, 98.6% of the budget), 0.270M -> 0.132M params; inner widths 7, 7, 7 /
19, 14, 14 / 38, 29, 29; agreement with the dense model on the 465 held-out images 60.86% right after surgery
(BatchNorm re-estimated; 21.51% without), 90.32% after fine-tuning; about a minute in all (fine-tuning 27 s).
"""

from train.configs.base import get_base_config, use_itpruner


def get_config():
  config = get_base_config()
  config.model.name = "resnet20"
  config.dense.source = "npz"
  config.dense.path = "../shared/weights/resnet20_cifar10.npz"
  return use_itpruner(config, budget=20.0, dense_cost=41.57, beta=246.0, num_images=100, batch_size=100)
