"""Speculative generation on token trees for Hugging Face causal LMs.

``tokprune.spec.generate(model, input_ids, drafter=...)`` with drafters
:class:`TokenRecyclingDrafter`, :class:`DraftModelDrafter` and :class:`LayerSkipDrafter`, and the
tree builders of :mod:`tokprune.spec.trees` (``tree_depths`` is :func:`tokprune.ops.tree_depths`: padding
nodes -1). :mod:`tokprune.spec.cost` holds the measured tree-size cost model. The ops (masks, positions, verification) live in
:mod:`tokprune.ops.spec`.
"""

from tokprune.spec.drafters import (DraftContext, DraftModelDrafter, Drafter, LayerSkipDrafter,
                                    TokenRecyclingDrafter, layer_skip_model)
from tokprune.spec._linear import release_packed
from tokprune.spec.generate import SpecStats, generate
from tokprune.spec.trees import (PAPER_TEMPLATE_NAME, DraftTree, RecyclingTemplate, ancestor_matrix, beam_tree,
                                 dyspec_tree, init_adjacency, named_template, paper_template, recycling_template,
                                 sampled_tree, token_recycling_tree, tree_depths, update_adjacency)

__all__ = ["generate", "SpecStats", "Drafter", "DraftContext", "TokenRecyclingDrafter", "DraftModelDrafter",
           "LayerSkipDrafter", "layer_skip_model", "DraftTree", "RecyclingTemplate", "dyspec_tree", "sampled_tree",
           "token_recycling_tree", "recycling_template", "init_adjacency", "update_adjacency", "tree_depths",
           "ancestor_matrix", "beam_tree", "paper_template", "named_template", "PAPER_TEMPLATE_NAME",
           "release_packed"]
