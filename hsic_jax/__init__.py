"""HSIC-JAX: channel pruning of CNNs by HSIC Lasso (APIB) and normalised HSIC (ITPruner), in JAX.

The top level holds what users call most; each public module is a namespace of the names users call (its
``__all__``: ``hj.kernels.center``, ``hj.surgery.mask``, ``hj.solver.objective``, ...):

- :mod:`hsic_jax.kernels`: Gaussian / linear / delta Gram matrices, centering, HSIC, CKA, the layer HSIC matrix.
- :mod:`hsic_jax.problem`: the HSIC Lasso quadratic form (Q, q) built blockwise from Grams or features.
- :mod:`hsic_jax.solver`: FISTA with restart for the nonnegative (or signed) HSIC Lasso, with duality gaps.
- :mod:`hsic_jax.selection`: ``lasso_select`` and friends (paths, batches, keep exactly k).
- :mod:`hsic_jax.costs`: MACs and params of any NNX model from its jaxpr, at any channel widths (``cost_fn``:
  trace once, count many width vectors).
- :mod:`hsic_jax.groups`: channel groups (parameter slices that share channels).
- :mod:`hsic_jax.budget`: widths under a cost budget: the cost-function type, the reachable-range check, rounding
  to a multiple, the one result type every allocator returns, and the uniform and global allocators.
- :mod:`hsic_jax.search`: one global penalty for all decisions, searched to a cost target (APIB).
- :mod:`hsic_jax.allocation`: layer importances from normalised HSIC and integer widths under budgets (ITPruner).
- :mod:`hsic_jax.criteria`: baseline channel criteria behind one registry, and the scores' scale across layers.
- :mod:`hsic_jax.methods`: selection methods (apib, itpruner, uniform, global, your own) behind one registry: the
  evidence each needs, and widths and channels under a cost target.
- :mod:`hsic_jax.surgery`: pure-functional channel removal from parameter, BatchNorm and optimizer state, and
  ``thin_model``: a working model of the same class at the pruned widths.
- :mod:`hsic_jax.jaxpr_groups`: channel groups derived automatically from a model's jaxpr, and the registry of
  channel rules (``register_channel_rule``) that tells derivation how a primitive moves channels.
- :mod:`hsic_jax.taps`: the pruning decisions of any Flax CNN and its calibration taps (each decision's consumer
  input and target), read from the jaxpr by an interpreter, and the problems, activations and layer similarity
  built from them.
- :mod:`hsic_jax.oneshot`: ``prune_model``, any Flax CNN pruned to a cost target in one call (groups, decisions,
  calibration, selection and the thin model).
- :mod:`hsic_jax.runtime`: host-side settings for the CPU backend (LAPACK threads).
- :mod:`hsic_jax.weighting`: per-channel penalty weights (weighted HSIC Lasso), e.g. by the cost a channel saves.

What these modules share lives in ``_``-prefixed modules (no module reaches into a neighbour's ``_``-names):
``_gram`` (Gram building blocks), ``_lasso`` (the problem type, its assembly, float64 reference and checks),
``_fista`` (the traced solver core, its result type and tolerances), ``_jaxpr_context`` and ``_jaxpr_rules`` (the
state of a derivation and the built-in rules), ``_jaxpr_walk`` (jaxpr traversal), ``_checks`` (argument checks) and
``_sharding`` (how inputs split over a mesh); ``_fill`` is :func:`select_k`'s residual fill.
"""

from hsic_jax import allocation, budget, costs, criteria, groups, jaxpr_groups, kernels, methods, problem, runtime
from hsic_jax import oneshot, search, selection, solver, surgery, taps, weighting
from hsic_jax.allocation import allocate_widths, layer_importance
from hsic_jax.budget import BudgetPoint, BudgetResult, allocate_global, allocate_uniform, min_widths
from hsic_jax.costs import Cost, LayerCost, cost_fn, count_macs
from hsic_jax.criteria import channel_scores, criterion_names, register_criterion
from hsic_jax.groups import ChannelGroup, ChannelSlice
from hsic_jax.jaxpr_groups import GroupDerivationWarning, check_groups, derive_groups, derive_model_groups
from hsic_jax.oneshot import GroupWidth, PruneModelResult, prune_model
from hsic_jax.methods import Evidence, method_names, method_needs, register_method, select, unregister_method
from hsic_jax.kernels import (
    Bandwidth,
    channel_grams,
    cka,
    delta_gram,
    gaussian_cka,
    gaussian_gram,
    hsic,
    hsic_matrix,
    linear_cka,
    linear_gram,
)
from hsic_jax.problem import (
    LassoProblem,
    combine_problems,
    output_gram,
    problem_from_features,
    problem_from_grams,
    stack_problems,
)
from hsic_jax.runtime import limit_lapack_threads
from hsic_jax.search import global_lambda_search
from hsic_jax.selection import (
    KSelection,
    lambda_grid,
    lasso_path,
    lasso_select,
    lasso_select_features,
    select_k,
)
from hsic_jax.solver import LassoResult, lambda_max, solve
from hsic_jax.surgery import PrunePlan, PruneResult, apply_plan, prune, thin_model
from hsic_jax.weighting import cost_weighted_problems, cost_weights, unweight_beta, weighted_problem

__version__ = "0.1.0"

__all__ = [
    "Bandwidth",
    "BudgetPoint",
    "BudgetResult",
    "ChannelGroup",
    "ChannelSlice",
    "Cost",
    "Evidence",
    "GroupDerivationWarning",
    "GroupWidth",
    "KSelection",
    "LayerCost",
    "LassoProblem",
    "LassoResult",
    "PrunePlan",
    "PruneModelResult",
    "PruneResult",
    "allocate_global",
    "allocate_uniform",
    "allocate_widths",
    "allocation",
    "apply_plan",
    "budget",
    "channel_grams",
    "channel_scores",
    "check_groups",
    "cka",
    "combine_problems",
    "cost_fn",
    "cost_weighted_problems",
    "cost_weights",
    "costs",
    "count_macs",
    "criteria",
    "criterion_names",
    "delta_gram",
    "derive_groups",
    "derive_model_groups",
    "gaussian_cka",
    "gaussian_gram",
    "global_lambda_search",
    "groups",
    "hsic",
    "hsic_matrix",
    "jaxpr_groups",
    "kernels",
    "lambda_grid",
    "lambda_max",
    "lasso_path",
    "lasso_select",
    "lasso_select_features",
    "layer_importance",
    "limit_lapack_threads",
    "linear_cka",
    "linear_gram",
    "method_names",
    "method_needs",
    "methods",
    "min_widths",
    "output_gram",
    "problem",
    "problem_from_features",
    "problem_from_grams",
    "oneshot",
    "prune",
    "prune_model",
    "register_criterion",
    "register_method",
    "runtime",
    "search",
    "select",
    "select_k",
    "selection",
    "solve",
    "solver",
    "stack_problems",
    "surgery",
    "taps",
    "thin_model",
    "unregister_method",
    "unweight_beta",
    "weighted_problem",
    "weighting",
]
