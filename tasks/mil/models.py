"""Attention-MIL slide classifiers on frozen patch features: ABMIL, ACMIL and a mean-pooling baseline.

A slide is one bag: an ``N x D`` tensor of patch features (batch size 1, as in the paper's protocol, because slides
hold very different numbers of patches). Every model returns a :class:`MILOutput` so the training loop, the
evaluation and the heatmaps treat them alike; :func:`mil_loss` gives each model's training loss.

References (our own implementation, written from these):
- ABMIL: Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018 (arXiv:1802.04712),
  gated attention, eq. 9.
- ACMIL: Zhang et al., "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
  ECCV 2024 (arXiv:2311.07125); reference code github.com/dazhangyu123/ACMIL (``architecture/transformer.py``
  ``ACMIL_GA`` and ``Step3_WSI_classification_ACMIL.py``), whose defaults we keep.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Defaults of the ACMIL reference code and of the PathGen paper's protocol (M = 5, K = 10, p = 0.6).
DEFAULT_HIDDEN_DIM = 256  # ACMIL code: D_inner = 256 for 512-dim features (CLIP ViT-B)
DEFAULT_ATTENTION_DIM = 128  # Ilse et al. and ACMIL code: width of the gated-attention layers
DEFAULT_BRANCHES = 5
DEFAULT_TOP_K = 10
DEFAULT_MASK_PROB = 0.6
DEFAULT_DIVERSITY_WEIGHT = 1.0  # ACMIL code adds the diversity term unweighted


class MILOutput(NamedTuple):
    """One slide's prediction. ``attention`` rows each sum to 1 over the N instances."""

    logits: Tensor  # (C,) slide logits
    attention: Tensor  # (N,) for one attention head (ABMIL, mean), (M, N) for ACMIL's M branches
    branch_logits: Tensor | None = None  # (M, C): ACMIL's per-branch predictions, None for the others


def _as_bag(bag: Tensor, in_dim: int) -> Tensor:
    """Accept ``N x D`` or a DataLoader's ``1 x N x D``; reject anything else with the expected shape."""
    if bag.dim() == 3 and bag.shape[0] == 1:
        bag = bag[0]
    if bag.dim() != 2 or bag.shape[1] != in_dim or bag.shape[0] == 0:
        raise ValueError(
            f"MIL bag has shape {tuple(bag.shape)}; expected (N, {in_dim}) with N >= 1 patch features of one slide "
            f"(or (1, N, {in_dim})); check the features' dimension against the model's in_dim"
        )
    if not bag.is_floating_point():
        raise ValueError(f"MIL bag has dtype {bag.dtype}; pass float features (e.g. bag.float())")
    return bag


def _projection(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """Feature projection before pooling, as in the CLAM and ACMIL code: frozen features are re-embedded into a
    smaller space the attention is learned in."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """Gated attention scores of Ilse et al. (eq. 9): ``w^T (tanh(V h) * sigm(U h))``, one row per head.

    The sigmoid gate lets the model switch off the tanh branch's near-linear response, which Ilse et al. show
    helps learn non-linear instance relevance. Returns raw scores (heads, N); the softmax is the caller's, so
    ACMIL can mask instances before it."""

    def __init__(self, hidden_dim: int, attention_dim: int, n_heads: int) -> None:
        super().__init__()
        self.V = nn.Linear(hidden_dim, attention_dim)
        self.U = nn.Linear(hidden_dim, attention_dim)
        self.w = nn.Linear(attention_dim, n_heads)

    def forward(self, h: Tensor) -> Tensor:
        gated = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        return self.w(gated).transpose(0, 1)


class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse et al. 2018): z = sum_k a_k h_k with a = softmax(gated scores), then a linear
    classifier on z."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        attention_dim: int = DEFAULT_ATTENTION_DIM,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, n_heads=1)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        h = self.project(_as_bag(bag, self.in_dim))
        attention = torch.softmax(self.attention(h)[0], dim=0)
        return MILOutput(logits=self.classifier(attention @ h), attention=attention)


class MeanMIL(nn.Module):
    """Sanity baseline: the mean of the projected features, then a linear classifier. Its "attention" is the
    uniform weight 1/N each instance really gets, so heatmaps of this model are honestly flat."""

    def __init__(
        self, in_dim: int, n_classes: int, *, hidden_dim: int = DEFAULT_HIDDEN_DIM, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        h = self.project(_as_bag(bag, self.in_dim))
        attention = torch.full((h.shape[0],), 1.0 / h.shape[0], dtype=h.dtype, device=h.device)
        return MILOutput(logits=self.classifier(h.mean(dim=0)), attention=attention)


def stochastic_topk_mask(scores: Tensor, top_k: int, mask_prob: float) -> Tensor:
    """ACMIL's stochastic top-K instance masking (STKIM): a boolean (M, N) mask, True where an instance is hidden.

    For each branch, among its ``top_k`` highest-scored instances a random subset of ``floor(top_k * mask_prob)``
    is masked, as the reference code does (so each top-K instance is masked with probability ``mask_prob``, with a
    fixed count). Masking the most-attended instances forces the branch to find other evidence instead of
    over-fitting to a few salient patches. Our one departure from the reference: at least one instance per branch
    always stays visible, since with N <= K and p = 1 the reference masks every instance and its softmax silently
    turns uniform."""
    n_branches, n_instances = scores.shape
    n_candidates = min(top_k, n_instances)
    n_masked = min(math.floor(n_candidates * mask_prob + 1e-9), n_instances - 1)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_masked <= 0:
        return mask
    top = torch.topk(scores, n_candidates, dim=1).indices
    chosen = torch.rand(n_branches, n_candidates, device=scores.device).argsort(dim=1)[:, :n_masked]
    return mask.scatter(1, top.gather(1, chosen), True)


class ACMIL(nn.Module):
    """Attention-challenging MIL (Zhang et al. 2024) on gated attention (the reference's ``ACMIL_GA``).

    Multiple branch attention (MBA): M attention heads share the projection and the gate but each has its own
    scores and its own classifier, and a diversity loss (:func:`attention_diversity_loss`) pushes their attention
    maps apart, so the branches look at different patterns. STKIM (:func:`stochastic_topk_mask`) applies in
    training only. The slide prediction classifies the embedding under the branch-averaged attention."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        attention_dim: int = DEFAULT_ATTENTION_DIM,
        n_branches: int = DEFAULT_BRANCHES,
        top_k: int = DEFAULT_TOP_K,
        mask_prob: float = DEFAULT_MASK_PROB,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_branches < 1 or top_k < 0 or not 0.0 <= mask_prob <= 1.0:
            raise ValueError(
                f"ACMIL needs n_branches >= 1, top_k >= 0 and 0 <= mask_prob <= 1; "
                f"got n_branches={n_branches}, top_k={top_k}, mask_prob={mask_prob}"
            )
        self.in_dim = in_dim
        self.top_k = top_k
        self.mask_prob = mask_prob
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, n_heads=n_branches)
        self.branch_classifiers = nn.ModuleList(nn.Linear(hidden_dim, n_classes) for _ in range(n_branches))
        self.slide_classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        h = self.project(_as_bag(bag, self.in_dim))
        scores = self.attention(h)  # (M, N)
        if self.training and self.top_k > 0 and self.mask_prob > 0:
            scores = scores.masked_fill(stochastic_topk_mask(scores, self.top_k, self.mask_prob), float("-inf"))
        attention = torch.softmax(scores, dim=1)
        branch_embeddings = attention @ h  # (M, hidden)
        heads = zip(self.branch_classifiers, branch_embeddings, strict=True)
        branch_logits = torch.stack([head(z) for head, z in heads])
        slide_logits = self.slide_classifier(attention.mean(dim=0) @ h)
        return MILOutput(logits=slide_logits, attention=attention, branch_logits=branch_logits)


def attention_diversity_loss(attention: Tensor) -> Tensor:
    """ACMIL's diversity term: the mean cosine similarity over all pairs of branch attention maps (M, N).

    0 when the branches attend to disjoint instances, 1 when they all attend alike; 0 for a single branch. As in
    the reference training loop, it is computed on the (masked) attention the branches actually used."""
    n_branches = attention.shape[0]
    if n_branches < 2:
        return attention.new_zeros(())
    unit = F.normalize(attention, dim=1)
    similarity = unit @ unit.T
    pairs = torch.triu_indices(n_branches, n_branches, offset=1, device=attention.device)
    return similarity[pairs[0], pairs[1]].mean()


def mil_loss(output: MILOutput, label: Tensor, diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT) -> Tensor:
    """Training loss of one slide: cross-entropy of the slide logits; for ACMIL also the mean cross-entropy of the
    branch predictions (each branch must classify on its own) plus ``diversity_weight`` x the diversity term, as in
    the reference ``train_one_epoch``. ``label`` is a 0-dim class-index tensor."""
    target = label.reshape(1).long()
    loss = F.cross_entropy(output.logits.unsqueeze(0), target)
    if output.branch_logits is not None:
        branch_targets = target.expand(output.branch_logits.shape[0])
        loss = loss + F.cross_entropy(output.branch_logits, branch_targets)
        loss = loss + diversity_weight * attention_diversity_loss(output.attention)
    return loss


MIL_MODELS: dict[str, type[nn.Module]] = {"abmil": ABMIL, "acmil": ACMIL, "mean": MeanMIL}


def build_mil_model(name: str, in_dim: int, n_classes: int, **hyper: object) -> nn.Module:
    """The MIL model called ``name`` with its hyper-parameters; unknown names or hyper-parameters are a clear
    error listing what is allowed (a typo must not silently fall back to a default)."""
    if name not in MIL_MODELS:
        raise ValueError(f"unknown MIL model {name!r}; choose one of {', '.join(sorted(MIL_MODELS))}")
    model_class = MIL_MODELS[name]
    allowed = [p for p in inspect.signature(model_class).parameters if p not in ("in_dim", "n_classes")]
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        raise ValueError(
            f"MIL model {name!r} has no hyper-parameter {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    if in_dim < 1 or n_classes < 2:
        raise ValueError(f"MIL model {name!r} needs in_dim >= 1 and n_classes >= 2; got {in_dim} and {n_classes}")
    return model_class(in_dim, n_classes, **hyper)
