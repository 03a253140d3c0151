"""Speculative generation on token trees for Hugging Face causal LMs.

``tokprune.spec.generate(model, input_ids, drafter=...)`` with drafters
:class:`TokenRecyclingDrafter`, :class:`DraftModelDrafter` and :class:`LayerSkipDrafter`, and the
tree builders of :mod:`tokprune.spec.trees`. The ops (masks, positions, verification) live in
:mod:`tokprune.ops.spec`.
"""

from tokprune.spec.drafters import (DraftContext, DraftModelDrafter, Drafter, LayerSkipDrafter,
                                    TokenRecyclingDrafter, layer_skip_model)
from tokprune.spec.generate import SpecStats, generate
from tokprune.spec.trees import (DraftTree, RecyclingTemplate, ancestor_matrix, dyspec_tree, init_adjacency,
                                 recycling_template, sampled_tree, token_recycling_tree, tree_depths,
                                 update_adjacency)

__all__ = ["generate", "SpecStats", "Drafter", "DraftContext", "TokenRecyclingDrafter", "DraftModelDrafter",
           "LayerSkipDrafter", "layer_skip_model", "DraftTree", "RecyclingTemplate", "dyspec_tree", "sampled_tree",
           "token_recycling_tree", "recycling_template", "init_adjacency", "update_adjacency", "tree_depths",
           "ancestor_matrix"]
