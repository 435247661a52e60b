"""Your own network through the program: an SE-ResNet written outside the zoo, trained here on the digits and
pruned by APIB to half its MACs.

Command::

  python -m train.main --config=digits_se_resnet

The network is ``examples/user_cnns.py``'s :class:`SEResNet` (basic blocks ending in a squeeze-and-excitation gate,
1x1 projection shortcuts between stages), named by its factory, ``model.name = "examples.user_cnns:se_resnet"``,
with ``model.kwargs`` its keyword arguments. Nothing about it is declared to the program: its channel groups,
decisions, calibration taps and costs are read from its jaxpr, and the pruned model is the same class with its
layers resized (``hsic_jax.thin_model``), saved with its factory and plan so that ``models.load_pruned`` rebuilds
it. Point ``model.name`` at your own ``package.module:function`` (or ``path/to/file.py:function``) the same way;
``dense.source = "factory"`` takes the model as your factory returns it (weights you load there), ``"checkpoint"``
one you saved with ``models.checkpoint.save(model, path, factory=...)``.

Everything else is the embedded default's recipe (``digits_apib``): scikit-learn's digits at 16x16 (offline),
8 epochs of pre-training from scratch, 128 calibration images, APIB's global lambda search to 50% of the dense
MACs within 1%, 8 epochs of fine-tuning with distillation from the dense model.
"""

from train.configs import digits_apib


def get_config():
  config = digits_apib.get_config()
  config.model.name = "examples.user_cnns:se_resnet"
  config.model.kwargs.width = 16
  config.model.kwargs.blocks_per_stage = 1
  config.model.kwargs.reduction = 4
  return config
