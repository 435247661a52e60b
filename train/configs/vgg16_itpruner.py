"""ITPruner on a CIFAR-10 VGG-16-BN: widths from layer importances under 31.7% of the dense MACs.

Command::

  python -m train.main --config=vgg16_itpruner
  # a short run on a CPU (the dense model is trained here first):
  # the fine-tune's lr 0.1 belongs to the paper's long schedule; cut short, it ends below the after-surgery
  # accuracy: a short run takes lr 0.01 with distillation (README, 'Short fine-tunes')
  python -m train.main --config=vgg16_itpruner --config.pretrain.epochs=2 --config.finetune.epochs=1 \
      --config.finetune.lr=0.01 --config.finetune.distill_weight=0.5

Paper setting it reproduces (ITPruner, VGG-16 / CIFAR-10): 1024 calibration images (taken 128 per forward pass),
each conv's post-ReLU output as its layer's feature (taken as the next layer's input, so after the max pool where
one follows, and average-pooled for the last conv, whose consumer is the classifier), linear CKA, beta 231, the
reference's budget of 100M of its 315.18M units taken as the ratio 0.317 of the exact dense count; channels kept by
L1 norm (the reference's initialisation of the thin VGG) and ITPruner's CIFAR training recipe. Widths by the
reference's solver (``select.itpruner.solver``), repaired to the budget: the published widths break it by 0.6% in
its own units. No pretrained weights ship for it, so the dense model is trained here by the ``pretrain`` stage (see
``_cifar_scratch``).

Measured: not run end to end here yet, so there is no time or result to report.
"""

from train.configs._cifar_scratch import scratch_config
from train.configs.base import use_itpruner


def get_config():
  return use_itpruner(scratch_config("vgg16"), budget=100.0, dense_cost=315.18, beta=231.0, num_images=1024,
                      batch_size=128)
