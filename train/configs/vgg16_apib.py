"""APIB on a CIFAR-10 VGG-16-BN to 126M MACs (of 313.46M), then fine-tuned.

Command::

  python -m train.main --config=vgg16_apib
  # a short run on a CPU (the dense model is trained here first):
  # the fine-tune's lr 0.1 belongs to the paper's long schedule; cut short, it ends below the after-surgery
  # accuracy: a short run takes lr 0.01 with distillation (README, 'Short fine-tunes')
  python -m train.main --config=vgg16_apib --config.pretrain.epochs=2 --config.finetune.epochs=1 \
      --config.finetune.lr=0.01 --config.finetune.distill_weight=0.5

Paper setting it reproduces (APIB, VGG-16-BN / CIFAR-10, -60% FLOPs): the reference README's target 126,000,000,
omega 1, tolerance 1%, 128 calibration images with BatchNorm in batch-statistics mode, fine-tuning with the
reference recipe (SGD, momentum 0.9, weight decay 1e-4 on every parameter, lr 0.1, cosine, 135 epochs, batch
128). No pretrained weights ship for it, so the dense model is trained here by the `pretrain` stage (see
`_cifar_scratch`).
Data: a local CIFAR-10 binary folder (default: the shared subset), as in `resnet56_apib`.

Measured: not run end to end here yet, so there is no time or result to report.
"""

from train.configs._cifar_scratch import scratch_config


def get_config():
  config = scratch_config("vgg16")
  config.select.absolute = 126e6
  return config
