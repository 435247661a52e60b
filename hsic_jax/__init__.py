"""HSIC-JAX: channel pruning of CNNs by HSIC Lasso (APIB) and normalised HSIC (ITPruner), in JAX.

The top level holds what users call; each module does one thing and is a namespace of its own for the rest
(``hj.kernels.center``, ``hj.surgery.mask``, ``hj.solver.objective``, ...):

- :mod:`hsic_jax.kernels`: Gaussian / linear / delta Gram matrices, centering, HSIC, CKA, the layer HSIC matrix.
- :mod:`hsic_jax.problem`: the HSIC Lasso quadratic form (Q, q) built blockwise from Grams or features.
- :mod:`hsic_jax.solver`: FISTA with restart for the nonnegative (or signed) HSIC Lasso, with duality gaps.
- :mod:`hsic_jax.selection`: ``lasso_select`` and friends (paths, batches, keep exactly k).
- :mod:`hsic_jax.groups`: channel groups (parameter slices that share channels).
- :mod:`hsic_jax.search`: one global penalty for all decisions, searched to a cost target (APIB).
- :mod:`hsic_jax.allocation`: layer importances from normalised HSIC and integer widths under budgets (ITPruner).
- :mod:`hsic_jax.criteria`: baseline channel criteria behind one registry, and widths from their scores.
- :mod:`hsic_jax.surgery`: pure-functional channel removal from parameter, BatchNorm and optimizer state.
- :mod:`hsic_jax.jaxpr_groups`: channel groups derived automatically from a model's jaxpr.
- :mod:`hsic_jax.runtime`: host-side settings for the CPU backend (LAPACK threads).
- :mod:`hsic_jax.weighting`: per-channel penalty weights (weighted HSIC Lasso), e.g. by the cost a channel saves.
"""

from hsic_jax import allocation, criteria, groups, jaxpr_groups, kernels, problem, runtime, search, selection, solver
from hsic_jax import surgery, weighting
from hsic_jax._floor import min_widths
from hsic_jax.allocation import Allocation, allocate_widths, layer_importance
from hsic_jax.criteria import channel_scores, criterion_names, register_criterion
from hsic_jax.groups import ChannelGroup, ChannelSlice
from hsic_jax.jaxpr_groups import GroupDerivationWarning, check_groups, derive_groups, derive_model_groups
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
from hsic_jax.search import SearchPoint, SearchResult, global_lambda_search
from hsic_jax.selection import (
    KSelection,
    lambda_grid,
    lasso_path,
    lasso_select,
    lasso_select_features,
    select_k,
)
from hsic_jax.solver import LassoResult, lambda_max, solve
from hsic_jax.surgery import PrunePlan, PruneResult, apply_plan, prune
from hsic_jax.weighting import cost_weighted_problems, cost_weights, unweight_beta, weighted_problem

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "Bandwidth",
    "ChannelGroup",
    "ChannelSlice",
    "GroupDerivationWarning",
    "KSelection",
    "LassoProblem",
    "LassoResult",
    "PrunePlan",
    "PruneResult",
    "SearchPoint",
    "SearchResult",
    "allocate_widths",
    "allocation",
    "apply_plan",
    "channel_grams",
    "channel_scores",
    "check_groups",
    "cka",
    "combine_problems",
    "cost_weighted_problems",
    "cost_weights",
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
    "min_widths",
    "output_gram",
    "problem",
    "problem_from_features",
    "problem_from_grams",
    "prune",
    "register_criterion",
    "runtime",
    "search",
    "select_k",
    "selection",
    "solve",
    "solver",
    "stack_problems",
    "surgery",
    "unweight_beta",
    "weighted_problem",
    "weighting",
]
