"""APIB on a CIFAR-10 MobileNetV2 (its 16 expansion widths are the decisions) to 50% of its MACs, fine-tuned.

Command::

  python -m train.main --config=mobilenetv2_apib
  # the fine-tune's lr 0.1 belongs to the paper's long schedule; cut short, it ends below the after-surgery
  # accuracy: a short run takes lr 0.01 with distillation (README, 'Short fine-tunes')
  python -m train.main --config=mobilenetv2_apib --config.pretrain.epochs=2 --config.finetune.epochs=1 \
      --config.finetune.lr=0.01 --config.finetune.distill_weight=0.5

The APIB paper prunes MobileNet-V2 too; its reference code gives no target for it, so this config asks for half the
dense MACs, with APIB's CIFAR recipe otherwise (omega 1, tolerance 1%, 128 calibration images, 135 epochs of SGD).
The dense model is trained here by the `pretrain` stage. Data as in `resnet56_apib`.

Measured: not run end to end here yet, so there is no time or result to report.
"""

from train.configs._cifar_scratch import scratch_config


def get_config():
  config = scratch_config("mobilenetv2")
  config.select.ratio = 0.5
  return config
