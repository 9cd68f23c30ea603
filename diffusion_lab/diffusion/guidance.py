"""Classifier-free guidance: one scale, or one scale per named condition in two documented forms.

Every form is a base pass plus scaled differences of passes, all run as ONE forward on the stacked batch:
- one scale s (diffusers/DiT convention):  ε(∅) + s·(ε(c) − ε(∅));
- `nested` (InstructPix2Pix, Brooks et al. 2023), in the order the scales are given:
      ε(∅) + s₁·(ε(c₁) − ε(∅)) + s₂·(ε(c₁, c₂) − ε(c₁)) + …
- `independent` (composable diffusion, Liu et al. 2022):  ε(∅) + Σᵢ sᵢ·(ε(cᵢ) − ε(∅)).
Here ∅ keeps every given condition that has no scale of its own (it is in every pass, unguided), and a
condition that was not given is the null condition in every pass. It is applied to the raw model output,
which is linear in x̂₀ and ε̂ for every prediction type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from diffusion_lab.condition import Condition, Conditions, stack
from diffusion_lab.errors import ConfigError

FORMS = ("nested", "independent")


def guidance_terms(
    condition: Condition | Conditions,
    null: Condition | Conditions,
    scale: float | Mapping[str, float],
    form: str,
) -> tuple[list[Condition | Conditions], list[tuple[float, int, int]]]:
    """(passes, terms): the guided output is passes[0]'s output + Σ s·(out[i] − out[j]) over terms (s, i, j)."""
    if not isinstance(scale, Mapping):
        return [null, condition], [(float(scale), 1, 0)]
    if form not in FORMS:
        raise ConfigError(f"guidance_form={form!r}: expected one of {', '.join(FORMS)}")
    if not isinstance(condition, Conditions):
        raise ConfigError(
            f"guidance={dict(scale)}: one scale per condition needs a model with several conditions; "
            "this one has one, so give one number (guidance=2)"
        )
    unknown = [name for name in scale if name not in condition]
    if unknown:
        raise ConfigError(
            f"guidance names {', '.join(unknown)}, which this model does not take; its conditions are "
            f"{', '.join(condition)}"
        )
    guided = list(scale)
    base = [name for name in condition if name not in scale]
    if form == "nested":
        passes = [condition.keeping(null, base + guided[:k]) for k in range(len(guided) + 1)]
        terms = [(float(scale[name]), k + 1, k) for k, name in enumerate(guided)]
    else:
        passes = [condition.keeping(null, base)] + [condition.keeping(null, base + [n]) for n in guided]
        terms = [(float(scale[name]), k + 1, 0) for k, name in enumerate(guided)]
    return passes, terms


def guided_model(
    model,
    condition,
    null_condition,
    scale: float | Mapping[str, float],
    batch: int,
    form="nested",
    weak_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
):
    """`predict(x, t_batch, guide)`: the model's output, guided where `guide` is true (else the conditional
    pass alone). With `weak_model` it is autoguidance instead of CFG (`autoguided_model`).

    One scale s = 1 is the conditional model alone (null pass skipped), s = 0 the unconditional one
    (conditional pass skipped); every other case runs all its passes as one forward on the stacked batch.
    A `null_condition` of batch 1 is repeated to the batch size. Without a condition or a null condition
    every step is the plain `model(x, t_batch, condition)`.
    """
    single = not isinstance(scale, Mapping)
    if weak_model is not None:
        return autoguided_model(model, condition, weak_model, scale)
    if condition is None or null_condition is None or (single and scale == 1.0):
        return lambda x, t_batch, guide: model(x, t_batch, condition)
    if null_condition.batch_size == 1 and batch > 1:
        null_condition = null_condition.repeat_interleave(batch)
    if single and scale == 0.0:
        return lambda x, t_batch, guide: model(x, t_batch, null_condition if guide else condition)
    passes, terms = guidance_terms(condition, null_condition, scale, form)
    stacked, k = stack(passes), len(passes)  # built once, reused at every step

    def predict(x: torch.Tensor, t_batch: torch.Tensor, guide: bool) -> torch.Tensor:
        if not guide:
            return model(x, t_batch, condition)
        outs = model(torch.cat([x] * k), torch.cat([t_batch] * k), stacked).chunk(k)
        guided = outs[0]
        for s, i, j in terms:
            guided = guided + s * (outs[i] - outs[j])
        return guided

    return predict


def autoguided_model(model, condition, weak_model, scale: float | Mapping[str, float]):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    D₀ + s·(D₁ − D₀), with D₁ the model and D₀ = `weak_model(x, t_batch)` a weaker model of the same task
    (an earlier checkpoint, a smaller net) on the same condition.

    The scale is written as CFG's, so s = 1 is the model alone and a sweep reads the same on both axes; the
    paper's w is this s, and "D₁ + s′·(D₁ − D₀)" is s′ = s − 1. Like CFG it is applied to the raw outputs,
    which is exact when both models share the schedule and prediction type (the caller checks that).
    """
    if isinstance(scale, Mapping):
        raise ConfigError(
            f"guidance={dict(scale)}: autoguidance (guidance_model=) takes one scale for the whole condition, "
            "e.g. guidance=2"
        )
    s = float(scale)

    def predict(x: torch.Tensor, t_batch: torch.Tensor, guide: bool) -> torch.Tensor:
        strong = model(x, t_batch, condition)
        if not guide or s == 1.0:
            return strong
        weak = weak_model(x, t_batch)
        return weak + s * (strong - weak)

    return predict
