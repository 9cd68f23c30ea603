"""Per-condition classifier-free guidance (`nested`, `independent`) and one joint scale, against closed
forms on a Gaussian toy with two conditions whose effects interact, so the two forms differ."""

import pytest
import torch

from diffusion_lab.condition import Condition, Conditions
from diffusion_lab.diffusion.guidance import guidance_terms, guided_model
from diffusion_lab.diffusion.samplers import DPMSolverPP2MSampler
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.diffusion.schedules import NoiseSchedule
from diffusion_lab.errors import ConfigError
from tests.diffusion.gaussian import DIM, GaussianModel, N, assert_gaussian, gen, make_condition

# μ = MU0 + A·p₁ + B·p₂ + C·p₁p₂, pᵢ = 1 when cᵢ is given and 0 when it is null. C (the interaction) is
# what makes nested guidance, which steps from ε(c₁) to ε(c₁, c₂), differ from independent guidance.
MU0, A, B, C = 0.1, 0.4, -0.3, 0.5
S1, S2 = 2.0, 1.5


def mean(p1: float, p2: float) -> float:
    return MU0 + A * p1 + B * p2 + C * p1 * p2


# The guided means, by hand: ε(∅) + s₁(ε(c₁)−ε(∅)) + s₂(ε(c₁,c₂)−ε(c₁)), ε(∅) + s₁(ε(c₁)−ε(∅)) + s₂(ε(c₂)−ε(∅)),
# nested in the other order, and c₁ guided with c₂ in every pass.
NESTED = MU0 + S1 * A + S2 * (B + C)
INDEPENDENT = MU0 + S1 * A + S2 * B
C2_THEN_C1 = MU0 + S2 * B + S1 * (A + C)
C1_ON_C2 = MU0 + B + S1 * (A + C)


class TwoConditionModel(GaussianModel):
    """The exact denoiser of N(mean(p₁, p₂), σ²): E[ε|x_t] is affine in μ, so every guidance combination
    (weights summing to 1) is exactly the denoiser of the same combination of means."""

    def __call__(self, x, t, condition):
        p1, p2 = condition["c1"].pooled, condition["c2"].pooled  # (B, 1): the present flags
        mu = mean(p1, p2)
        return super().__call__(
            x, t, Condition(tokens=mu[:, None], mask=torch.ones_like(mu).bool(), pooled=mu)
        )


def given(p1: float, p2: float, batch: int) -> Conditions:
    return Conditions(c1=make_condition(p1, batch), c2=make_condition(p2, batch))


def null(batch: int = 1) -> Conditions:
    return given(0.0, 0.0, batch)


# --------------------------------------------------------------------------------------------------------
# Sampling reaches the guided mean
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form, mu", [("nested", NESTED), ("independent", INDEPENDENT)])
def test_each_form_samples_its_closed_form_mean_in_one_forward_per_step(form, mu):
    schedule = NoiseSchedule("cosine")
    sampler = DPMSolverPP2MSampler(schedule, num_steps=20, clip_sample=False)
    model = TwoConditionModel(schedule)
    scales = {"c1": S1, "c2": S2}
    x = sample(model, sampler, (N, DIM), given(1, 1, N), null(), scales, generator=gen(), guidance_form=form)
    assert model.batches == [3 * N] * 20  # three passes (∅ and two more), stacked in one batch
    assert_gaussian(x, mu=mu)


# --------------------------------------------------------------------------------------------------------
# The guided output, exactly
# --------------------------------------------------------------------------------------------------------

CASES = {
    # the order of the scales is the order of nested's steps: c₂ first, then c₁ on top of it
    "nested, c2 first": ((1, 1), {"c2": S2, "c1": S1}, "nested", C2_THEN_C1, 3),
    # c₂ not given (null in the condition itself): its difference is zero in both forms
    "nested, c2 not given": ((1, 0), {"c1": S1, "c2": S2}, "nested", MU0 + S1 * A, 3),
    "independent, c2 not given": ((1, 0), {"c1": S1, "c2": S2}, "independent", MU0 + S1 * A, 3),
    # c₂ given but without a scale: in every pass, unguided, and c₁ guided on top of it
    "nested, c2 unguided": ((1, 1), {"c1": S1}, "nested", C1_ON_C2, 2),
    "independent, c2 unguided": ((1, 1), {"c1": S1}, "independent", C1_ON_C2, 2),
    # one number on several conditions: joint CFG, all of them against all null
    "one scale": ((1, 1), 3.0, "nested", MU0 + 3.0 * (mean(1, 1) - MU0), 2),
}


@pytest.mark.parametrize("flags, scale, form, mu, passes", CASES.values(), ids=CASES)
def test_guided_output_is_the_denoiser_of_the_combined_mean(flags, scale, form, mu, passes):
    schedule, n = NoiseSchedule("cosine"), 8
    model, reference = TwoConditionModel(schedule), GaussianModel(schedule)
    predict = guided_model(model, given(*flags, n), null(), scale, n, form)
    x, t = torch.randn(n, DIM, generator=gen()), torch.full((n,), 400)
    torch.testing.assert_close(predict(x, t, True), reference(x, t, make_condition(mu, n)))
    assert model.batches == [passes * n]
    # outside the guidance interval: the conditional pass alone
    torch.testing.assert_close(predict(x, t, False), reference(x, t, make_condition(mean(*flags), n)))
    assert model.batches[-1] == n


def kept(passes, condition, empty) -> list[set[str]]:
    """The names each pass keeps of `condition`; every other name must be `empty`'s null."""
    names = [{name for name in p if p[name] is condition[name]} for p in passes]
    assert all(
        p[name] is empty[name]
        for p, keep in zip(passes, names, strict=True)
        for name in p
        if name not in keep
    )
    return names


def test_guidance_terms_name_the_passes_and_their_differences():
    condition, empty, both = given(1, 1, 4), null(4), {"c1": S1, "c2": S2}
    passes, terms = guidance_terms(condition, empty, both, "nested")
    assert kept(passes, condition, empty) == [set(), {"c1"}, {"c1", "c2"}]
    assert terms == [(S1, 1, 0), (S2, 2, 1)]  # s₁(c₁ − ∅) + s₂(c₁c₂ − c₁)

    passes, terms = guidance_terms(condition, empty, both, "independent")
    assert kept(passes, condition, empty) == [set(), {"c1"}, {"c2"}]
    assert terms == [(S1, 1, 0), (S2, 2, 0)]  # s₁(c₁ − ∅) + s₂(c₂ − ∅)

    passes, terms = guidance_terms(condition, empty, {"c2": S2}, "nested")  # c₁ in every pass
    assert kept(passes, condition, empty) == [{"c1"}, {"c1", "c2"}]
    assert terms == [(S2, 1, 0)]

    passes, terms = guidance_terms(condition, empty, 2.5, "nested")  # one scale: all null, then all given
    assert passes[0] is empty and passes[1] is condition and terms == [(2.5, 1, 0)]


# --------------------------------------------------------------------------------------------------------
# Mistakes
# --------------------------------------------------------------------------------------------------------


def test_a_scale_for_a_condition_the_model_does_not_take_names_it_and_the_real_ones():
    with pytest.raises(ConfigError, match=r"guidance names sketch, .*its conditions are c1, c2"):
        guidance_terms(given(1, 1, 2), null(2), {"c1": 2.0, "sketch": 1.5}, "nested")


def test_a_scale_per_condition_on_a_single_condition_asks_for_one_number():
    with pytest.raises(ConfigError, match=r"needs a model with several conditions.*guidance=2"):
        guidance_terms(make_condition(0.5, 2), make_condition(0.0, 2), {"c1": 2.0}, "nested")


def test_an_unknown_form_lists_the_forms():
    with pytest.raises(ConfigError, match=r"guidance_form='joint'.*nested, independent"):
        guided_model(
            TwoConditionModel(NoiseSchedule("cosine")), given(1, 1, 2), null(), {"c1": 2.0}, 2, "joint"
        )
