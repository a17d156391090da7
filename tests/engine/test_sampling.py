"""SamplingParams validation and the Sampler's choices, on CPU (and CUDA when present)."""

from __future__ import annotations

import math

import pytest
import torch

from services.engine import sampler as sampler_module
from services.engine.sampler import Sampler, SamplerOutput, make_generator
from services.engine.sampling_params import SamplingParams, SamplingParamsError

# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", True),
        ("max_tokens", 4.0),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", 0),
        ("top_k", -1),
        ("top_k", True),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", 1.5),
        ("seed", 2**64),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3),
        ("frequency_penalty", math.nan),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("stop", ["x"]),
        ("stop", ("",)),
        ("stop", (3,)),
        ("stop_token_ids", [1]),
        ("stop_token_ids", (-1,)),
        ("ignore_eos", 1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("skip_special_tokens", "yes"),
    ],
)
def test_invalid_field_is_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: value})


def test_error_message_states_range() -> None:
    with pytest.raises(SamplingParamsError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_error_is_a_value_error() -> None:
    assert issubclass(SamplingParamsError, ValueError)


def test_defaults_are_valid_and_boundaries_accepted() -> None:
    SamplingParams()
    SamplingParams(
        max_tokens=1,
        temperature=0,
        top_p=1.0,
        top_k=1,
        min_p=1.0,
        seed=-(2**63),
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=0.5,
        stop=("\n",),
        stop_token_ids=(0, 7),
        logprobs=20,
    )


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0.8, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.8, top_k=2).is_greedy


def test_create_normalizes_loose_values() -> None:
    params = SamplingParams.create(
        max_tokens=None,
        temperature=0,
        top_k=-1,
        top_p=None,
        stop="END",
        stop_token_ids=[2, 3],
        seed=None,
        logprobs=None,
    )
    assert params == SamplingParams(temperature=0.0, stop=("END",), stop_token_ids=(2, 3))
    assert isinstance(params.temperature, float)
    assert SamplingParams.create(top_k=0).top_k is None
    assert SamplingParams.create(top_k=5).top_k == 5
    assert SamplingParams.create(stop=["a", "b"]).stop == ("a", "b")


def test_create_still_validates() -> None:
    with pytest.raises(SamplingParamsError, match="top_k"):
        SamplingParams.create(top_k=-2)
    with pytest.raises(SamplingParamsError, match="stop"):
        SamplingParams.create(stop=["ok", ""])
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        SamplingParams.create(max_tokens=0)
    with pytest.raises(SamplingParamsError, match="best_of"):
        SamplingParams.create(best_of=2)


# ---------------------------------------------------------------- Sampler helpers

VOCAB = 64


def _run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplerOutput:
    batch = logits.shape[0]
    return Sampler()(
        logits,
        params,
        generators if generators is not None else [None] * batch,
        prompts if prompts is not None else [[] for _ in range(batch)],
        outputs if outputs is not None else [[] for _ in range(batch)],
    )


def _make_logits(batch: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator) * scale


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


# ---------------------------------------------------------------- greedy


def test_greedy_equals_argmax() -> None:
    logits = _make_logits(8)
    out = _run(logits, [SamplingParams(temperature=0.0)] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_fast_path_does_no_softmax_sort_or_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fast path must not call this")

    for name in ("softmax", "sort", "multinomial", "log_softmax"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(sampler_module, "_sample", refuse)  # the general (copying) path
    logits = _make_logits(4)
    out = _run(logits, [SamplingParams(temperature=0.0)] * 4)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_fast_path_equals_slow_path() -> None:
    logits = _make_logits(16, seed=3)
    fast = _run(logits, [SamplingParams(temperature=0.0)] * 16).token_ids
    # A neutral-but-present penalty (no tokens seen) forces the general path.
    slow = _run(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.5)] * 16).token_ids
    # A sampled neighbour also forces the general path for the greedy rows.
    mixed = _run(
        torch.cat([logits, _make_logits(1, seed=9)]),
        [SamplingParams(temperature=0.0)] * 16 + [SamplingParams(temperature=1.0)],
    ).token_ids[:16]
    assert fast == slow == mixed == logits.argmax(dim=-1).tolist()


def test_empty_batch() -> None:
    out = _run(torch.empty(0, VOCAB), [])
    assert out.token_ids == [] and out.logprobs == []


def test_top_k_one_equals_greedy() -> None:
    logits = _make_logits(32, seed=4)
    torch.manual_seed(0)
    out = _run(logits, [SamplingParams(temperature=1.5, top_k=1)] * 32)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("device", _devices())
def test_tiny_top_p_equals_greedy(device: str) -> None:
    logits = _make_logits(32, seed=5).to(device)
    torch.manual_seed(0)
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 32
    generators = [make_generator(i, device) if i % 2 else None for i in range(32)]
    out = _run(logits, params, generators)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------- seeds


def _seeded_sequence(
    target: SamplingParams, position: int, neighbours: list[SamplingParams], device: str
) -> list[int]:
    """Tokens drawn for one seeded row placed at `position` among `neighbours`, step by step."""
    params = list(neighbours)
    params.insert(position, target)
    generators = [make_generator(p.seed, device) for p in params]
    tokens = []
    for step in range(12):
        logits = _make_logits(len(params), seed=1000 + step, scale=1.0).to(device)
        # The target row's logits depend only on the step, never on its neighbours.
        logits[position] = _make_logits(1, seed=step, scale=1.0)[0].to(device)
        tokens.append(_run(logits, params, generators).token_ids[position])
    return tokens


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(temperature=1.0, seed=42),  # sorts only when a neighbour needs it
        SamplingParams(temperature=0.8, top_p=0.95, min_p=0.01, seed=42),
    ],
)
def test_same_seed_same_tokens_whatever_the_batch(target: SamplingParams, device: str) -> None:
    alone = _seeded_sequence(target, 0, [], device)
    assert alone == _seeded_sequence(target, 0, [], device)
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, seed=7, min_p=0.1),
        SamplingParams(temperature=1.0, presence_penalty=1.0),
    ]
    torch.manual_seed(123)
    assert alone == _seeded_sequence(target, 2, neighbours, device)
    torch.manual_seed(456)
    assert alone == _seeded_sequence(target, 4, neighbours[:1] * 4, device)
    assert len(set(alone)) > 3  # the sequence is really drawn, not constant


def test_different_seeds_differ_on_flat_distribution() -> None:
    logits = torch.zeros(2, 1000)
    params = [SamplingParams(seed=1), SamplingParams(seed=2)]
    generators = [make_generator(p.seed, "cpu") for p in params]
    draws = [_run(logits, params, generators).token_ids for _ in range(20)]
    first, second = [d[0] for d in draws], [d[1] for d in draws]
    assert first != second
    assert len(set(first)) > 15 and len(set(second)) > 15


def test_make_generator_without_seed_is_none() -> None:
    assert make_generator(None, "cpu") is None


# ---------------------------------------------------------------- distributions


def test_temperature_frequencies_match_softmax() -> None:
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature = 0.7
    draws = 40_000
    torch.manual_seed(0)
    out = _run(row.repeat(draws, 1), [SamplingParams(temperature=temperature)] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).double()
    expected = torch.softmax(row.double() / temperature, dim=-1) * draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    # 4 degrees of freedom: P(chi2 > 30) < 1e-5, while temperature 1.0 gives a chi2 in the
    # thousands at this sample size. The seed is fixed, so this is deterministic anyway.
    assert chi_square < 30.0
    wrong = torch.softmax(row.double(), dim=-1) * draws
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 300.0


def test_min_p_never_picks_below_threshold() -> None:
    row = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.09, 0.06, 0.05]))
    min_p = 0.3  # threshold 0.12: tokens 0, 1, 2 allowed
    draws = 5_000
    torch.manual_seed(1)
    out = _run(row.repeat(draws, 1), [SamplingParams(min_p=min_p)] * draws)
    assert set(out.token_ids) == {0, 1, 2}
    generator = make_generator(5, "cpu")
    seeded = [
        _run(row[None], [SamplingParams(min_p=min_p, seed=5)], [generator]).token_ids[0]
        for _ in range(300)
    ]
    assert set(seeded) == {0, 1, 2}


def test_top_k_and_top_p_restrict_the_support() -> None:
    row = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    draws = 5_000
    torch.manual_seed(2)
    top_k = _run(row.repeat(draws, 1), [SamplingParams(top_k=2)] * draws).token_ids
    assert set(top_k) == {0, 1}
    # Mass before token 2 is 0.8 >= 0.75, so the smallest set reaching 0.75 is {0, 1}.
    top_p = _run(row.repeat(draws, 1), [SamplingParams(top_p=0.75)] * draws).token_ids
    assert set(top_p) == {0, 1}
    top_p = _run(row.repeat(draws, 1), [SamplingParams(top_p=0.85)] * draws).token_ids
    assert set(top_p) == {0, 1, 2}


# ---------------------------------------------------------------- penalties


def _greedy_choice(row: list[float], prompt: list[int], output: list[int], **penalty: float) -> int:
    logits = torch.tensor([row])
    params = [SamplingParams(temperature=0.0, **penalty)]
    return _run(logits, params, prompts=[prompt], outputs=[output]).token_ids[0]


def test_repetition_penalty_divides_positive_logits() -> None:
    row = [2.0, 1.5, 0.0]
    # 2.0 / 1.3 = 1.54 > 1.5 keeps token 0; 2.0 / 1.5 = 1.33 < 1.5 flips to token 1.
    assert _greedy_choice(row, [0], [], repetition_penalty=1.3) == 0
    assert _greedy_choice(row, [0], [], repetition_penalty=1.5) == 1
    assert _greedy_choice(row, [], [0], repetition_penalty=1.5) == 1  # output counts too
    assert _greedy_choice(row, [2], [], repetition_penalty=1.5) == 0  # unseen token 0 untouched


def test_repetition_penalty_multiplies_negative_logits() -> None:
    row = [-1.0, -1.2, -5.0]
    # -1.0 * 1.1 = -1.1 > -1.2 keeps token 0; -1.0 * 1.3 = -1.3 < -1.2 flips to token 1.
    assert _greedy_choice(row, [0], [], repetition_penalty=1.1) == 0
    assert _greedy_choice(row, [0], [], repetition_penalty=1.3) == 1
    # A penalty below 1 rewards: -1.2 * 0.5 = -0.6 beats -1.0.
    assert _greedy_choice(row, [1], [], repetition_penalty=0.5) == 1


def test_presence_penalty_counts_output_only() -> None:
    row = [1.0, 0.5]
    assert _greedy_choice(row, [], [0, 0, 0], presence_penalty=0.4) == 0  # 0.6 > 0.5
    assert _greedy_choice(row, [], [0], presence_penalty=0.6) == 1  # 0.4 < 0.5
    assert _greedy_choice(row, [0, 0], [], presence_penalty=2.0) == 0  # prompt ignored


def test_frequency_penalty_scales_with_count() -> None:
    row = [1.0, 0.5]
    assert _greedy_choice(row, [], [0, 0, 0], frequency_penalty=0.15) == 0  # 1 - 0.45 = 0.55
    assert _greedy_choice(row, [], [0, 0, 0], frequency_penalty=0.2) == 1  # 1 - 0.6 = 0.4
    assert _greedy_choice(row, [], [0], frequency_penalty=0.4) == 0  # 1 - 0.4 = 0.6
    # Both together: 1 - 0.2 - 2 * 0.1 = 0.6 keeps 0; 1 - 0.2 - 3 * 0.15 = 0.35 flips.
    assert _greedy_choice(row, [], [0, 0], presence_penalty=0.2, frequency_penalty=0.1) == 0
    assert _greedy_choice(row, [], [0, 0, 0], presence_penalty=0.2, frequency_penalty=0.15) == 1


def test_out_of_range_token_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="token ids"):
        _greedy_choice([1.0, 0.5], [], [5], presence_penalty=1.0)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_with_sorted_top_k() -> None:
    logits = _make_logits(3, seed=11)
    params = [
        SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.8, seed=3),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0),
    ]
    generators = [make_generator(p.seed, "cpu") for p in params]
    out = _run(logits, params, generators, prompts=[[1, 2, 3], [], []])
    expected = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(float(expected[0, out.token_ids[0]]), abs=1e-6)
    values, ids = torch.topk(expected[0], 5)
    assert first.top_token_ids == ids.tolist()
    assert first.top_logprobs == pytest.approx(values.tolist(), abs=1e-6)
    assert first.top_logprobs == sorted(first.top_logprobs, reverse=True)
    second = out.logprobs[1]
    assert second is not None and second.top_token_ids == [] and second.top_logprobs == []
    assert second.logprob == pytest.approx(float(expected[1].max()), abs=1e-6)
    assert out.logprobs[2] is None


def test_logprobs_on_fast_path() -> None:
    logits = _make_logits(2, seed=12)
    out = _run(logits, [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0)])
    first = out.logprobs[0]
    assert first is not None and first.top_token_ids[0] == out.token_ids[0]
    assert len(first.top_token_ids) == 2 and out.logprobs[1] is None


# ---------------------------------------------------------------- mixed batch


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = _make_logits(6, seed=13)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=0.0, frequency_penalty=0.5),
        SamplingParams(temperature=0.9, seed=21),
        SamplingParams(temperature=0.8, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.05),
    ]
    generators = [make_generator(p.seed, "cpu") for p in params]
    torch.manual_seed(0)
    out = _run(logits, params, generators)
    argmax = logits.argmax(dim=-1).tolist()
    assert out.token_ids[0] == argmax[0]
    assert out.token_ids[1] in torch.topk(logits[1], 3).indices.tolist()
    assert out.token_ids[2] == argmax[2]  # no output yet, so the penalty changes nothing
    assert out.token_ids[4] == argmax[4]
    alone = _run(logits[3:4], params[3:4], [make_generator(21, "cpu")]).token_ids[0]
    assert out.token_ids[3] == alone
    assert all(0 <= t < VOCAB for t in out.token_ids)
