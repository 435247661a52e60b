"""Shared set-up of the CIFAR configs whose dense model is trained here (no pretrained weights ship for them)."""

from train.configs.base import get_base_config


def scratch_config(model: str):
  """A CIFAR-10 config for ``model`` whose dense network is pre-trained here: 160 epochs of SGD (lr 0.1, momentum
  0.9, weight decay 5e-4, cosine), the usual CIFAR recipe; point ``dense.source=checkpoint`` at your own weights to
  skip it."""
  config = get_base_config()
  config.model.name = model
  config.dense.source = "pretrain"
  config.dense.path = ""
  config.pretrain.epochs = 160
  config.pretrain.weight_decay = 5e-4
  config.data.mean = (0.4914, 0.4822, 0.4465)
  config.data.std = (0.2023, 0.1994, 0.2010)
  return config
