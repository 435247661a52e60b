"""ITPruner on the pretrained CIFAR-10 ResNet-56: widths from layer importances under 46.9% of the dense MACs.

Command::

  python -m train.main --config=resnet56_itpruner
  # a short run on a CPU, as for resnet56_apib:
  python -m train.main --config=resnet56_itpruner --config.finetune.epochs=2 --config.finetune.lr=0.01 \
      --config.finetune.distill_weight=0.5 --workdir=runs/r56_itp
  # the combined mode: ITPruner's widths, filled by HSIC Lasso (select_k per layer) instead of L1 norms
  python -m train.main --config=resnet56_itpruner --config.select.criterion=hsic_lasso

Paper setting it reproduces (ITPruner, ResNet-56 / CIFAR-10): 100 calibration images with BatchNorm in
batch-statistics mode; linear CKA between the activations of every pair of layers; importance
``a_i = exp(-beta * r_i / sum_k r_k)`` with ``r_i = sum_{j != i} CKA_ij`` and beta 500; widths maximising
``sum_i a_i w_i / c_i`` under a MACs budget. The reference's budget is 60M in its own units, of a dense 127.88M
(its units mix conv MACs with BN and ReLU ops), so the ratio 60 / 127.88 = 0.469 of the dense count is the target
here, counted exactly. Differences, by design:
- the reference trains its thin network from scratch (300 epochs, with 1x1-conv shortcuts wherever widths differ);
  this program keeps the pretrained weights: the kept channels are the ones with the largest L1 norms (the
  reference's own initialisation for ImageNet and VGG), and fine-tunes with ITPruner's CIFAR recipe (SGD, Nesterov
  momentum 0.9, lr 0.1, weight decay 5e-4, cosine, batch 128);
- the width variables are the prunable widths of the pretrained network, one per residual block (each block's
  inner width), and a block's feature is its inner activation (the second conv's input, after BN and ReLU), not
  the block output; the residual streams keep their widths, since a block's output width is shared by every
  block of its stage through the identity shortcuts;
- the widths come from the reference's own SLSQP (``select.itpruner.solver="reference"``), then are repaired until
  the exact count holds the budget with every width >= 1 (the reference's rounding can break the budget and can
  give widths of 0). ``solver="search"`` solves the same problem to optimality instead, which sets most blocks to
  width 1 or dense: see the pruning-quality study.
Data: as in ``resnet56_apib``.

Measured: see the README's pruning-quality study for this network under this method.
"""

from train.configs.base import get_base_config, use_itpruner


def get_config():
  config = get_base_config()
  config.model.name = "resnet56"
  config.dense.source = "npz"
  config.dense.path = "../shared/weights/resnet56_cifar10.npz"
  return use_itpruner(config, budget=60.0, dense_cost=127.88, beta=500.0, num_images=100, batch_size=100)
