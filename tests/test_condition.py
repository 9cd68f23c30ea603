"""`cycle`: labels and prompts stretched to a sample count; `Condition` and `Conditions` (several named
sources): stacking, repeating, one guidance pass's mix of given and null; `take_rows`, `repeat_rows` and `count`."""

from __future__ import annotations

import torch

from diffusion_lab.condition import Condition, Conditions, count, cycle, repeat_rows, stack, take_rows


def test_labels_cycle_to_n_and_stay_a_tensor():
    assert torch.equal(cycle(torch.tensor([3, 7, 1]), 7), torch.tensor([3, 7, 1, 3, 7, 1, 3]))
    assert torch.equal(cycle(torch.tensor([3, 7, 1]), 2), torch.tensor([3, 7]))  # fewer: the first n


def test_prompts_cycle_to_n_and_stay_a_list():
    assert cycle(("a", "b"), 5) == ["a", "b", "a", "b", "a"]
    assert cycle(["a", "b"], 2) == ["a", "b"]


# --------------------------------------------------------------------------- Condition and Conditions


def cond(tokens: list[list[float]], spatial: float | None = None) -> Condition:
    """A Condition of batch 1 whose tokens (L, 1) are `tokens[0]`, pooled their sum, and spatial (when
    given) a 2x2 map of that value plus a present channel of ones."""
    t = torch.tensor(tokens, dtype=torch.float32)[..., None]  # (1, L, 1)
    mask = torch.ones(t.shape[:2], dtype=torch.bool)
    maps = None if spatial is None else torch.stack([torch.full((2, 2), spatial), torch.ones(2, 2)])[None]
    return Condition(tokens=t, mask=mask, pooled=t.sum(1), spatial=maps)


def test_cat_pads_shorter_token_sequences_with_masked_zeros_and_stacks_spatial():
    both = Condition.cat([cond([[1.0, 2.0, 3.0]], spatial=5.0), cond([[4.0]], spatial=6.0)])
    assert both.tokens[..., 0].tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert both.mask.tolist() == [[True, True, True], [True, False, False]]
    assert both.pooled[:, 0].tolist() == [6.0, 4.0] and both.batch_size == 2
    assert both.spatial.shape == (2, 2, 2, 2)
    assert both.spatial[:, 0, 0, 0].tolist() == [5.0, 6.0] and (both.spatial[:, 1] == 1).all()
    assert Condition.cat([cond([[1.0]]), cond([[2.0]])]).spatial is None  # a vector condition stays one


def test_repeat_interleave_repeats_every_field_row_by_row():
    two = Condition.cat([cond([[1.0]], spatial=5.0), cond([[2.0]], spatial=6.0)]).repeat_interleave(3)
    assert two.tokens[:, 0, 0].tolist() == two.pooled[:, 0].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert two.mask.shape == (6, 1) and two.spatial[:, 0, 0, 0].tolist() == [5.0] * 3 + [6.0] * 3


def test_conditions_stack_repeat_and_keep_source_by_source():
    a = Conditions(sketch=cond([[1.0]], spatial=5.0), text=cond([[2.0, 3.0]]))
    b = Conditions(sketch=cond([[4.0]], spatial=6.0), text=cond([[7.0]]))
    both = stack([a, b])
    assert isinstance(both, Conditions) and both.batch_size == 2 and list(both) == ["sketch", "text"]
    assert both["text"].tokens[..., 0].tolist() == [[2.0, 3.0], [7.0, 0.0]]  # padded within its source
    assert both["sketch"].spatial[:, 0, 0, 0].tolist() == [5.0, 6.0]
    assert isinstance(stack([a["text"], b["text"]]), Condition)
    repeated = both.repeat_interleave(2)
    assert isinstance(repeated, Conditions) and repeated["sketch"].pooled[:, 0].tolist() == [
        1.0,
        1.0,
        4.0,
        4.0,
    ]
    kept = a.keeping(b, ["text"])  # one guidance pass: text given, every other source null
    assert kept["text"] is a["text"] and kept["sketch"] is b["sketch"]
    assert all(a.keeping(b, [])[name] is b[name] for name in b)


def test_cycle_take_rows_repeat_rows_and_count_of_maps_and_of_a_mapping():
    maps = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2)  # (3, 1, 2, 2): map i is all i
    cycled = cycle(maps, 5)
    assert cycled.shape == (5, 1, 2, 2) and cycled[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]
    inputs = {"sketch": maps, "caption": ["a", "b", "c"]}
    stretched = cycle(inputs, 4)
    assert stretched["caption"] == ["a", "b", "c", "a"] and stretched["sketch"][:, 0, 0, 0].tolist() == [
        0,
        1,
        2,
        0,
    ]
    assert count(stretched) == 4 and count(maps) == 3 and count(["a"]) == 1
    part = take_rows(stretched, 1, 3)
    assert part["caption"] == ["b", "c"] and part["sketch"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert take_rows(maps, 2, 3)[:, 0, 0, 0].tolist() == [2.0] and take_rows(["a", "b"], 0, 1) == ["a"]
    doubled = repeat_rows(take_rows(inputs, 0, 2), 2)
    assert doubled["caption"] == ["a", "a", "b", "b"] and doubled["sketch"][:, 0, 0, 0].tolist() == [
        0,
        0,
        1,
        1,
    ]
    assert doubled["sketch"].shape == (4, 1, 2, 2) and repeat_rows(torch.tensor([3, 7]), 2).tolist() == [
        3,
        3,
        7,
        7,
    ]
