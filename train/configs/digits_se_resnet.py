"""Your own network through the program: an SE-ResNet written outside the zoo, trained here on the digits and
pruned by APIB to 35% of its MACs.

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
8 epochs of pre-training from scratch, 128 calibration images, APIB's global lambda search within 1% of the target,
8 epochs of fine-tuning with distillation from the dense model, with one change for a network whose channel groups
have several readers: ``calib.consumers = "sum"``. Each stage's residual stream is read by the next block's convs,
its projection and each block's squeeze-excite gate; with ``"first"`` (the base default, which on the zoo's models,
one reader per decision, is the same thing) a decision's X and Y come from its first reader alone, here the SE gate's
``fc1`` on the pooled stream; ``"sum"`` adds one HSIC Lasso problem per reader. Measured (2 seeds, the same dense
model per seed; top-1 on the 355 test digits, after surgery with BatchNorm re-estimated / after fine-tuning):

  ====  =================  =================
  seed  "first"            "sum"
  ====  =================  =================
  0     61.13% / 89.30%    77.18% / 96.06%
  1     78.31% / 94.65%    74.08% / 97.18%
  ====  =================  =================

The target is 35%, not the default's 50%: on this network the widest APIB solution (lambda = 0, where the
nonnegative HSIC Lasso's support is the most it keeps) holds 1.52M of the 3.13M dense MACs (48.6%; 1.26M, 40%, with
``"first"``), so 50% is refused with that range.

Measured (2-core CPU, 2026-12-07, warm compilation cache): 65 s in all (pre-training 17 s, calibration 9 s,
search 15 s, surgery 1 s, fine-tuning 15 s); 9 decisions (each stage's residual stream, each block's inner width,
each SE gate's hidden width); dense 95.77% top-1 at 3.13M MACs, pruned to 1.09M MACs (34.7%) and 31.0K of 80.9K
params: 77.18% right after surgery (BatchNorm re-estimated; 10.70% without), 96.06% after fine-tuning.
"""

from train.configs import digits_apib


def get_config():
  config = digits_apib.get_config()
  config.model.name = "examples.user_cnns:se_resnet"
  config.model.kwargs.width = 16
  config.model.kwargs.blocks_per_stage = 1
  config.model.kwargs.reduction = 4
  config.calib.consumers = "sum"
  config.select.ratio = 0.35
  return config
