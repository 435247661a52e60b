"""The project's TFDS datasets, prepared into array_record files without TensorFlow.

* ``hsic_digits`` (:class:`Digits`): scikit-learn's bundled digits, 32x32 RGB;
* ``hsic_cifar10_folder`` / ``hsic_cifar100_folder`` (:class:`Cifar10Folder`, :class:`Cifar100Folder`): a local
  folder in the official CIFAR-10 / CIFAR-100 binary layout;
* :func:`make_fake_imagenet`: a tiny fake ``imagenet2012`` in the real dataset's format, for tests (or ImageNet-sized
  natural-looking JPEGs, for measuring the input pipeline);
* :mod:`train.datasets.convert_tfrecord` (``python -m train.datasets.convert_tfrecord``): a TFDS dataset prepared
  as TFRecord given array_record shards, through :mod:`train.datasets.tfrecord` (the framing and CRC32C, no
  TensorFlow).

Importing this package registers the three builders with TFDS (so ``tfds.data_source("hsic_digits",
data_dir=...)`` reads a prepared copy); :mod:`train.data` is the interface the program uses.
"""

from __future__ import annotations

from train.datasets.cifar_folder import Cifar10Folder, Cifar100Folder
from train.datasets.digits import Digits
from train.datasets.fake_imagenet import make_fake_imagenet

__all__ = ["Cifar100Folder", "Cifar10Folder", "Digits", "make_fake_imagenet"]
