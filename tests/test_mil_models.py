"""The attention-MIL models (ABMIL, ACMIL, mean pooling): shapes, gated attention, ACMIL's stochastic top-K masking
and diversity term, the losses, the factory, and that each model learns a synthetic witness-instance task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tasks.mil.models import (
    ABMIL,
    ACMIL,
    MeanMIL,
    MILOutput,
    attention_diversity_loss,
    build_mil_model,
    mil_loss,
    stochastic_topk_mask,
)

IN_DIM, N_CLASSES = 12, 3


def _small(name: str, hidden_dim: int = 16, attention_dim: int = 8) -> dict[str, int]:
    """Small widths keep the tests fast; the mean baseline has no attention layer to size."""
    return {"hidden_dim": hidden_dim} if name == "mean" else {"hidden_dim": hidden_dim, "attention_dim": attention_dim}


def _bag(n: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, IN_DIM, generator=torch.Generator().manual_seed(seed))


def _model(name: str, seed: int = 0, **hyper: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_mil_model(name, IN_DIM, N_CLASSES, **{**_small(name), **hyper})


def _scores(model: ACMIL, bag: torch.Tensor) -> torch.Tensor:
    """ACMIL's raw branch scores before masking (dropout is 0, so train and eval modes agree)."""
    with torch.no_grad():
        return model.attention(model.project(bag))


# -- shapes and the common interface -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["abmil", "acmil", "mean"])
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes_and_attention_sums_to_one(name: str, train: bool) -> None:
    model = _model(name).train(train)
    out = model(_bag(30))
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (N_CLASSES,)
    if name == "acmil":
        assert out.attention.shape == (5, 30)  # M = 5 branches by default
        assert out.branch_logits is not None and out.branch_logits.shape == (5, N_CLASSES)
    else:
        assert out.attention.shape == (30,)
        assert out.branch_logits is None
    assert torch.allclose(out.attention.sum(dim=-1), torch.ones(out.attention.shape[:-1]), atol=1e-6)
    assert (out.attention >= 0).all() and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", ["abmil", "acmil", "mean"])
def test_dataloader_batch_of_one_slide_is_accepted(name: str) -> None:
    model = _model(name).eval()
    bag = _bag(10)
    assert torch.equal(model(bag.unsqueeze(0)).logits, model(bag).logits)


@pytest.mark.parametrize("bad", [torch.randn(5, IN_DIM + 1), torch.randn(0, IN_DIM), torch.randn(2, 5, IN_DIM)])
def test_bag_of_the_wrong_shape_is_a_clear_error(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=rf"expected \(N, {IN_DIM}\)"):
        _model("abmil")(bad)


def test_integer_bag_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="float features"):
        _model("mean")(torch.ones(4, IN_DIM, dtype=torch.long))


# -- ABMIL: gated attention ----------------------------------------------------------------------------------


def test_abmil_attention_is_the_gated_formula_of_ilse_et_al() -> None:
    model = _model("abmil").eval()
    bag = _bag(20)
    with torch.no_grad():
        h = model.project(bag)
        att = model.attention
        scores = (torch.tanh(h @ att.V.weight.T + att.V.bias) * torch.sigmoid(h @ att.U.weight.T + att.U.bias)) @ (
            att.w.weight.T
        ) + att.w.bias
        expected = torch.softmax(scores[:, 0], dim=0)
        out = model(bag)
    assert torch.allclose(out.attention, expected, atol=1e-6)
    assert torch.allclose(out.logits, model.classifier(expected @ h), atol=1e-6)


def test_abmil_gate_matters() -> None:
    model = _model("abmil").eval()
    bag = _bag(20)
    with torch.no_grad():
        before = model(bag)
        model.attention.U.weight.zero_()
        model.attention.U.bias.zero_()  # the gate is now a constant 0.5: scores halve, the softmax flattens
        after = model(bag)
    assert not torch.allclose(before.attention, after.attention, atol=1e-4)
    assert not torch.allclose(before.logits, after.logits, atol=1e-5)
    assert after.attention.std() < before.attention.std()


@pytest.mark.parametrize("name", ["abmil", "acmil", "mean"])
def test_attention_is_permutation_equivariant_and_logits_invariant(name: str) -> None:
    model = _model(name).eval()
    bag = _bag(25)
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, shuffled = model(bag), model(bag[perm])
    assert torch.allclose(shuffled.attention, out.attention[..., perm], atol=1e-6)
    assert torch.allclose(shuffled.logits, out.logits, atol=1e-5)


# -- ACMIL: stochastic top-K instance masking ----------------------------------------------------------------


def test_acmil_eval_masks_nothing_and_is_deterministic() -> None:
    model = _model("acmil").eval()
    bag = _bag(30)
    with torch.no_grad():
        first, second = model(bag), model(bag)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.attention, second.attention)
    assert (first.attention > 0).all()
    assert torch.allclose(first.attention, torch.softmax(_scores(model, bag), dim=1), atol=1e-6)


def test_acmil_branch_and_slide_predictions_follow_the_reference() -> None:
    """Branch i classifies its own attention-pooled embedding; the slide head classifies the embedding under the
    branch-averaged attention (reference ``ACMIL_GA.forward``)."""
    model = _model("acmil").eval()
    bag = _bag(30)
    with torch.no_grad():
        out = model(bag)
        h = model.project(bag)
        branch = torch.stack([head(a @ h) for head, a in zip(model.branch_classifiers, out.attention, strict=True)])
        slide = model.slide_classifier(out.attention.mean(dim=0) @ h)
    assert torch.allclose(out.branch_logits, branch, atol=1e-6)
    assert torch.allclose(out.logits, slide, atol=1e-6)
    assert not torch.allclose(out.branch_logits[0], out.branch_logits[1])  # separate heads, separate weights


def test_acmil_train_with_p1_hides_exactly_each_branchs_top_k() -> None:
    model = _model("acmil", top_k=4, mask_prob=1.0).train()
    bag = _bag(30)
    top = torch.topk(_scores(model, bag), 4, dim=1).indices
    expected_hidden = torch.zeros(5, 30, dtype=torch.bool).scatter(1, top, True)
    assert expected_hidden.any(dim=0).sum() > 4  # the branches differ, so the mask is per branch
    attention = model(bag).attention
    assert torch.equal(attention == 0, expected_hidden)
    assert torch.allclose(attention.sum(dim=1), torch.ones(5), atol=1e-6)


def test_acmil_train_with_p0_hides_nothing() -> None:
    model = _model("acmil", top_k=10, mask_prob=0.0).train()
    bag = _bag(30)
    attention = model(bag).attention
    assert (attention > 0).all()
    assert torch.allclose(attention, torch.softmax(_scores(model, bag), dim=1), atol=1e-6)


def test_acmil_default_masking_hides_six_of_the_top_ten_at_random() -> None:
    """The paper's K = 10, p = 0.6: as in the reference code, floor(10 x 0.6) = 6 of each branch's top 10."""
    model = _model("acmil").train()  # defaults: top_k=10, mask_prob=0.6
    bag = _bag(40)
    top = torch.topk(_scores(model, bag), 10, dim=1).indices
    in_top = torch.zeros(5, 40, dtype=torch.bool).scatter(1, top, True)
    torch.manual_seed(1)
    patterns = set()
    for _ in range(5):
        hidden = model(bag).attention == 0
        assert hidden.sum(dim=1).tolist() == [6] * 5
        assert not (hidden & ~in_top).any()
        patterns.add(tuple(hidden.flatten().tolist()))
    assert len(patterns) > 1  # stochastic: the hidden subset changes between steps


@pytest.mark.parametrize("n", [1, 2, 4, 10])
def test_acmil_small_bag_always_keeps_one_instance_visible(n: int) -> None:
    """Decision pinned here: with N <= K and p = 1 the reference would hide every instance (its softmax then turns
    silently uniform); we hide a random N - 1 of them, so each branch still attends one real instance."""
    model = _model("acmil", top_k=10, mask_prob=1.0).train()
    attention = model(_bag(n)).attention
    assert torch.isfinite(attention).all()
    assert ((attention == 0).sum(dim=1) == n - 1).all()
    assert torch.allclose(attention.sum(dim=1), torch.ones(5), atol=1e-6)


def test_acmil_small_bag_with_default_p_masks_as_the_reference() -> None:
    """Below the cap nothing changes: N = 4 < K = 10, p = 0.6 hides floor(4 x 0.6) = 2 per branch, as the reference."""
    model = _model("acmil").train()
    assert ((model(_bag(4)).attention == 0).sum(dim=1) == 2).all()


def test_stochastic_topk_mask_counts() -> None:
    torch.manual_seed(0)
    scores = torch.arange(20.0).repeat(3, 1)  # instances 10..19 are every branch's top 10
    mask = stochastic_topk_mask(scores, top_k=10, mask_prob=0.6)
    assert mask.sum(dim=1).tolist() == [6, 6, 6]
    assert not mask[:, :10].any()
    assert not stochastic_topk_mask(scores, top_k=0, mask_prob=1.0).any()
    assert stochastic_topk_mask(scores, top_k=10, mask_prob=0.25).sum(dim=1).tolist() == [2, 2, 2]  # floor(2.5)


@pytest.mark.parametrize(
    "hyper", [{"n_branches": 0}, {"top_k": -1}, {"mask_prob": 1.5}, {"mask_prob": -0.1}], ids=lambda h: str(h)
)
def test_acmil_bad_hyper_parameters_are_clear_errors(hyper: dict) -> None:
    with pytest.raises(ValueError, match="ACMIL needs"):
        _model("acmil", **hyper)


# -- ACMIL: diversity term and loss --------------------------------------------------------------------------


def test_diversity_is_zero_for_disjoint_and_one_for_identical_attention() -> None:
    orthogonal = torch.eye(5, 8)  # each branch attends one different instance
    assert attention_diversity_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    identical = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).repeat(5, 1)
    assert attention_diversity_loss(identical).item() == pytest.approx(1.0, abs=1e-6)


def test_diversity_values_on_handcrafted_attention() -> None:
    a, b = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    # cos(a, b) = 0.25 / (sqrt(0.5) * sqrt(0.5)) = 0.5
    assert attention_diversity_loss(torch.stack([a, b])).item() == pytest.approx(0.5, abs=1e-6)
    # three branches a, a, e3: pairs (a,a)=1, (a,e3)=0, (a,e3)=0 -> mean 1/3
    e3 = torch.tensor([0.0, 0.0, 1.0])
    assert attention_diversity_loss(torch.stack([a, a, e3])).item() == pytest.approx(1 / 3, abs=1e-6)
    assert attention_diversity_loss(a.unsqueeze(0)).item() == 0.0  # one branch: nothing to diversify


def test_acmil_loss_is_slide_ce_plus_branch_ce_plus_weighted_diversity() -> None:
    model = _model("acmil").eval()
    out = model(_bag(30))
    label = torch.tensor(2)
    slide = F.cross_entropy(out.logits.unsqueeze(0), label.reshape(1))
    branches = torch.stack([F.cross_entropy(b.unsqueeze(0), label.reshape(1)) for b in out.branch_logits]).mean()
    diversity = attention_diversity_loss(out.attention)
    assert diversity.item() > 0.5  # untrained branches attend alike
    assert mil_loss(out, label).item() == pytest.approx((slide + branches + diversity).item(), rel=1e-5)
    weighted = mil_loss(out, label, diversity_weight=0.1).item()
    assert weighted == pytest.approx((slide + branches + 0.1 * diversity).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["abmil", "mean"])
def test_single_head_loss_is_cross_entropy(name: str) -> None:
    out = _model(name).eval()(_bag(30))
    expected = F.cross_entropy(out.logits.unsqueeze(0), torch.tensor([1]))
    assert mil_loss(out, torch.tensor(1)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_acmil_loss_backpropagates_into_every_branch() -> None:
    model = _model("acmil").train()
    mil_loss(model(_bag(30)), torch.tensor(0)).backward()
    assert all(head.weight.grad is not None and head.weight.grad.abs().sum() > 0 for head in model.branch_classifiers)
    assert model.attention.w.weight.grad.abs().sum(dim=1).gt(0).all()


# -- the factory ---------------------------------------------------------------------------------------------


def test_factory_builds_each_model_with_its_defaults() -> None:
    assert isinstance(build_mil_model("abmil", 512, 2), ABMIL)
    assert isinstance(build_mil_model("mean", 512, 2), MeanMIL)
    acmil = build_mil_model("acmil", 512, 2)
    assert isinstance(acmil, ACMIL)
    assert (len(acmil.branch_classifiers), acmil.top_k, acmil.mask_prob) == (5, 10, 0.6)  # the paper's M, K, p


def test_factory_unknown_model_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown MIL model 'transmil'; choose one of abmil, acmil, mean"):
        build_mil_model("transmil", 512, 2)


def test_factory_unknown_hyper_parameter_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"'abmil' has no hyper-parameter top_k; allowed: hidden_dim"):
        build_mil_model("abmil", 512, 2, top_k=10)
    with pytest.raises(ValueError, match="n_classes >= 2"):
        build_mil_model("mean", 512, 1)


# -- learnability on synthetic witness-instance bags ---------------------------------------------------------


def _witness_bags(n_bags: int, n_instances: int, n_witnesses: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Half the bags are positive: ``n_witnesses`` of their instances come from a shifted Gaussian, the rest of
    every bag from N(0, I). The witnesses are the first instances so the test knows where they are."""
    gen = torch.Generator().manual_seed(seed)
    shift = 1.5 * torch.ones(IN_DIM)
    bags = []
    for i in range(n_bags):
        bag = torch.randn(n_instances, IN_DIM, generator=gen)
        label = i % 2
        if label:
            bag[:n_witnesses] += shift
        bags.append((bag, label))
    return bags


@pytest.mark.parametrize("name", ["abmil", "acmil", "mean"])
def test_each_model_learns_witness_bags_and_attends_to_the_witnesses(name: str) -> None:
    """200 single-slide Adam steps (~8 epochs of 24 bags). Sized so all three models pass on 20 of 20 seeds: with
    fewer witnesses or steps ACMIL sometimes (1 seed in 10 at 4/40 witnesses, 100 steps) lets its diversity term
    push 4 of 5 branches off the only discriminative pattern before the slide head has learnt it."""
    n_instances, n_witnesses = 40, 8
    bags = _witness_bags(24, n_instances, n_witnesses, seed=7)
    torch.manual_seed(0)
    model = build_mil_model(name, IN_DIM, 2, **_small(name, hidden_dim=32, attention_dim=16))
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3, weight_decay=1e-4)
    model.train()
    for step in range(200):
        bag, label = bags[step % len(bags)]
        optimiser.zero_grad()
        mil_loss(model(bag), torch.tensor(label)).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        outputs = [(model(bag), label) for bag, label in bags]
    accuracy = sum(int(out.logits.argmax()) == label for out, label in outputs) / len(outputs)
    assert accuracy >= 0.9, f"{name} train accuracy {accuracy:.2f}"
    if name == "mean":
        return  # its attention is uniform by construction: the witnesses get exactly their share
    share = n_witnesses / n_instances
    masses = [float(out.attention.reshape(-1, n_instances).mean(dim=0)[:n_witnesses].sum()) for out, y in outputs if y]
    assert min(masses) > share and sum(masses) / len(masses) > 2 * share, (name, masses)
    assert not math.isnan(sum(masses))
