"""SamplingParams validation and the batched sampler (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from replica.sampling import (
    SamplingParams,
    TokenHistory,
    all_allowed_bitmask,
    make_generator,
    sample,
    sampling_probs,
)

V = 64


def _logits(batch: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=gen) * 3


def _run(steps: int, logits_rows: list[torch.Tensor], params: list[SamplingParams], gens) -> list:
    """Sample ``steps`` times from fixed logits; returns per-row token lists."""
    logits = torch.stack(logits_rows)
    out = [sample(logits, params, gens).token_ids.tolist() for _ in range(steps)]
    return [list(col) for col in zip(*out)]


# --- SamplingParams -----------------------------------------------------------------------------


def test_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p) == (16, 1.0, 0, 1.0)
    assert p.stop == () and p.stop_token_ids == () and p.logprobs is None and not p.greedy
    q = SamplingParams(stop="END", stop_token_ids=[3, 4], top_k=-1, temperature=0)
    assert q.stop == ("END",) and q.stop_token_ids == (3, 4) and q.top_k == 0
    assert isinstance(q.temperature, float) and q.greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    hash(q)  # frozen with tuple fields: usable as a key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_p", 0),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("top_p", math.nan),
        ("seed", 1.0),
        ("seed", 1 << 64),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", 5),
        ("ignore_eos", 1),
        ("logprobs", 21),
        ("logprobs", -1),
        ("logprobs", True),
    ],
)
def test_validation_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_valid_edges() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_k=1, top_p=1.0, logprobs=0)
    SamplingParams(top_p=1e-6, logprobs=20, seed=-(1 << 63))
    SamplingParams(seed=(1 << 64) - 1)


# --- sampler ------------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = _logits(8)
    res = sample(logits, [SamplingParams(temperature=0)] * 8, [None] * 8)
    assert torch.equal(res.token_ids, logits.argmax(-1))
    assert res.token_ids.dtype == torch.int64 and res.logprobs is None


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    logits = _logits(6)
    params = [SamplingParams(temperature=0 if i % 2 else 1.5, top_p=0.9) for i in range(6)]
    for _ in range(20):
        ids = sample(logits, params, [None] * 6).token_ids
        assert torch.equal(ids[1::2], logits.argmax(-1)[1::2])


def test_low_precision_logits() -> None:
    logits = _logits(4).to(torch.bfloat16)
    ids = sample(logits, [SamplingParams(top_k=5, top_p=0.8)] * 4, [None] * 4).token_ids
    assert ids.shape == (4,) and ids.dtype == torch.int64


def test_temperature_to_zero_limit() -> None:
    # Distinct logits with gaps >= 0.05: at T = 1e-3 the runner-up has probability <= e^-50.
    gen = torch.Generator().manual_seed(1)
    logits = torch.stack([torch.randperm(V, generator=gen).float() * 0.05 for _ in range(16)])
    for temp in (1e-3, 1e-4, 1e-6):  # 1e-6 is below GREEDY_TEMPERATURE: greedy path
        params = [SamplingParams(temperature=temp)] * 16
        gens = [make_generator(i, "cpu") for i in range(16)]
        assert torch.equal(sample(logits, params, gens).token_ids, logits.argmax(-1))
    # At high temperature the same rows do not all collapse to the argmax.
    hot = [SamplingParams(temperature=100.0)] * 16
    assert not torch.equal(sample(logits, hot, [None] * 16).token_ids, logits.argmax(-1))


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(32)
    for temp in (0.5, 1.0, 3.0):
        params = [SamplingParams(temperature=temp, top_k=1)] * 32
        assert torch.equal(sample(logits, params, [None] * 32).token_ids, logits.argmax(-1))
        # Also through the sort path, when a neighbouring row uses top-p.
        mixed = params[:-1] + [SamplingParams(top_p=0.5)]
        got = sample(logits, mixed, [None] * 32).token_ids
        assert torch.equal(got[:-1], logits.argmax(-1)[:-1])


def test_top_k_never_draws_masked_tokens() -> None:
    probs = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    n = 20_000
    logits = probs.log().expand(n, -1).contiguous()
    torch.manual_seed(0)
    ids = sample(logits, [SamplingParams(top_k=2)] * n, [None] * n).token_ids
    counts = torch.bincount(ids, minlength=6).float() / n
    assert set(ids.unique().tolist()) == {1, 3}
    assert counts[1] == pytest.approx(0.3 / 0.55, abs=0.02)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    n = 20_000
    logits = probs.log().expand(n, -1).contiguous()
    torch.manual_seed(0)
    # Sorted: 0.4, 0.3 (0.7), 0.15 (0.85), 0.1, 0.05. p = 0.65 -> {1, 3}; p = 0.8 -> {1, 3, 4}.
    for top_p, kept in ((0.65, [1, 3]), (0.8, [1, 3, 4]), (0.3, [1])):
        ids = sample(logits, [SamplingParams(top_p=top_p)] * n, [None] * n).token_ids
        freq = torch.bincount(ids, minlength=5).float() / n
        assert sorted(ids.unique().tolist()) == kept
        expected = probs[kept] / probs[kept].sum()
        assert torch.allclose(freq[kept], expected, atol=0.02)


def test_top_k_then_top_p_and_temperature() -> None:
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    logits = probs.log()[None]
    # top_k=3 leaves {1, 3, 4} renormalised to (.47, .35, .18); top_p=0.6 then keeps {1, 3}.
    got = sampling_probs(logits, [SamplingParams(top_k=3, top_p=0.6)])[0]
    assert (got > 0).nonzero().flatten().tolist() == [1, 3]
    assert torch.allclose(got[[1, 3]], torch.tensor([4 / 7, 3 / 7]), atol=1e-6)
    # Temperature 2 flattens the distribution before top-p: p ∝ sqrt(probs).
    hot = sampling_probs(logits, [SamplingParams(temperature=2.0)])[0]
    assert torch.allclose(hot, probs.sqrt() / probs.sqrt().sum(), atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    probs=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=12),
    top_p=st.floats(0.01, 1.0),
)
@example(probs=[0.9999999999999999, 1.0], top_p=0.25)  # equal in float32: the tie keeps index order
def test_top_p_mask_is_minimal_prefix(probs: list[float], top_p: float) -> None:
    p = torch.tensor(probs, dtype=torch.float64)
    p = p / p.sum()
    logits = p.log().float()
    got = sampling_probs(logits[None], [SamplingParams(top_p=top_p)])[0]
    # The order the sampler sees: probabilities distinct in float64 may tie in float32 (e.g.
    # 0.9999999999999999 and 1.0), and ties keep their index order.
    order = torch.argsort(logits, descending=True, stable=True)
    cum = torch.cumsum(p[order], 0)
    # Skip cases where the boundary is within float32 rounding of p.
    if ((cum - top_p).abs() < 1e-5).any():
        return
    n_keep = int((cum < top_p).sum()) + 1
    assert (got > 0).sum().item() == n_keep
    assert (got[order[:n_keep]] > 0).all()


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    row = _logits(1, seed=7)[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    alone = _run(30, [row], [params], [make_generator(42, "cpu")])[0]
    others = _logits(4, seed=8)
    batch_params = [
        SamplingParams(temperature=0.7),
        params,
        SamplingParams(temperature=0),
        SamplingParams(top_k=3, seed=5),
        SamplingParams(temperature=2.0, top_p=0.5),
    ]
    gens = [None, make_generator(42, "cpu"), None, make_generator(5, "cpu"), None]
    torch.manual_seed(123)  # the default RNG state must not matter either
    batched = _run(30, [others[0], row, others[1], others[2], others[3]], batch_params, gens)
    assert batched[1] == alone
    # A seed reproduces from scratch too.
    assert _run(30, [row], [params], [make_generator(42, "cpu")])[0] == alone


def test_different_seeds_differ() -> None:
    row = _logits(1, seed=3)[0]
    runs = [
        _run(40, [row], [SamplingParams(seed=s)], [make_generator(s, "cpu")])[0] for s in range(4)
    ]
    assert len({tuple(r) for r in runs}) == 4


def test_default_rng_follows_manual_seed() -> None:
    logits = _logits(8)
    params = [SamplingParams()] * 8
    torch.manual_seed(9)
    a = sample(logits, params, [None] * 8).token_ids
    torch.manual_seed(9)
    b = sample(logits, params, [None] * 8).token_ids
    assert torch.equal(a, b)


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(5)
    params = [
        SamplingParams(temperature=0.3, top_k=4, logprobs=3),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=2.0, logprobs=20),
        SamplingParams(temperature=0, logprobs=1),
    ]
    res = sample(logits, params, [None] * 5)
    ref = torch.log_softmax(logits, -1)
    assert res.logprobs is not None and res.top_ids is not None and res.top_logprobs is not None
    assert torch.allclose(res.logprobs, ref.gather(1, res.token_ids[:, None]).squeeze(1))
    assert res.num_top == (3, 0, 0, 20, 1)
    top = ref.topk(20, -1)
    assert torch.equal(res.top_ids, top.indices)
    assert torch.allclose(res.top_logprobs, top.values)

    host = res.to_host()
    assert host.token_ids == res.token_ids.tolist()
    assert host.logprobs == pytest.approx(res.logprobs.tolist())
    assert host.top_logprobs is not None
    assert [len(t) for t in host.top_logprobs] == [3, 0, 0, 20, 1]
    assert host.top_logprobs[4][0][0] == host.token_ids[4]  # greedy: the chosen token is best
    assert host.top_logprobs[0][0] == (top.indices[0, 0].item(), pytest.approx(top.values[0, 0]))


def test_no_logprobs_unless_asked() -> None:
    res = sample(_logits(3), [SamplingParams()] * 3, [None] * 3)
    assert res.logprobs is None and res.top_ids is None
    host = res.to_host()
    assert host.logprobs is None and host.top_logprobs is None and len(host.token_ids) == 3
    only_chosen = sample(_logits(2), [SamplingParams(logprobs=0)] * 2, [None] * 2).to_host()
    assert only_chosen.top_logprobs == [[], []] and only_chosen.logprobs is not None


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        sample(_logits(2), [SamplingParams()], [None, None])
    with pytest.raises(ValueError):
        sample(torch.zeros(V), [SamplingParams()], [None])


def test_masked_logits_never_drawn() -> None:
    # -inf logits (e.g. from a grammar mask) stay impossible, including with exponential noise.
    logits = _logits(64)
    logits[:, ::2] = -math.inf
    ids = sample(logits, [SamplingParams(temperature=1.5)] * 64, [None] * 64).token_ids
    assert (ids % 2 == 1).all()


# --- logit adjustments: bias, penalties, min-p, grammar bitmask ----------------------------------


def test_adjustment_params_are_validated_and_normalised() -> None:
    p = SamplingParams(logit_bias={"7": 5, 3: -100}, presence_penalty=1, min_p=0)
    assert p.logit_bias == ((3, -100.0), (7, 5.0)) and p.presence_penalty == 1.0
    assert p.penalized and not SamplingParams(min_p=0.5, logit_bias={1: 2}).penalized
    assert SamplingParams(repetition_penalty=1.3).penalized
    for field, value in [
        ("presence_penalty", 2.5),
        ("frequency_penalty", math.nan),
        ("repetition_penalty", 0),
        ("min_p", 1.5),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {1: 101}),
        ("logit_bias", {-1: 1}),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})


def test_logit_bias_minus_100_removes_a_token_and_plus_100_forces_one() -> None:
    logits = _logits(16)
    best = logits.argmax(-1)
    # -100 on every row's argmax: greedy never picks it; sampled rows at T = 1 almost never can.
    banned = [SamplingParams(temperature=0, logit_bias={int(t): -100}) for t in best]
    got = sample(logits, banned, [None] * 16).token_ids
    assert (got != best).all()
    assert torch.equal(got, logits.scatter(1, best[:, None], -math.inf).argmax(-1))
    forced = [SamplingParams(temperature=1.0, logit_bias={5: 100}, seed=i) for i in range(16)]
    gens = [make_generator(i, "cpu") for i in range(16)]
    for _ in range(10):
        assert (sample(logits, forced, gens).token_ids == 5).all()


def _penalized_run(params: SamplingParams, logits: torch.Tensor, steps: int) -> list[int]:
    """Greedy/sampled decoding of one row whose logits never change: only the penalties (fed by
    the history of sampled tokens) can move it off its favourite tokens."""
    history = TokenHistory(V, "cpu", capacity=1)
    history.add("r", [1, 2, 3])
    gen = make_generator(params.seed, "cpu") if params.seed is not None else None
    tokens = []
    for _ in range(steps):
        result = sample(logits[None], [params], [gen], history, [history.row("r")])
        history.record([history.row("r")], result.token_ids)
        tokens.append(int(result.token_ids[0]))
    history.check_invariants()
    return tokens


def test_a_penalty_changes_a_repetitive_output() -> None:
    logits = _logits(1, seed=11)[0]
    plain = _penalized_run(SamplingParams(temperature=0), logits, 12)
    assert len(set(plain)) == 1  # fixed logits, greedy: one token forever
    for params in (
        SamplingParams(temperature=0, frequency_penalty=2.0),
        SamplingParams(temperature=0, presence_penalty=2.0),
        SamplingParams(temperature=0, repetition_penalty=5.0),
    ):
        tokens = _penalized_run(params, logits, 12)
        assert tokens[0] == plain[0] and len(set(tokens)) > 1, params
    # Presence subtracts p once: the counts of the history equal the tokens generated.
    history = TokenHistory(V, "cpu", capacity=1)
    row = history.add("r", [])
    history.record([row], torch.tensor([4]))
    history.record([row], torch.tensor([4]))
    assert history.output_counts[row, 4] == 2 and history.output_counts[row].sum() == 2
    x = _logits(1)
    expected = x.clone()
    expected[0, 4] -= 0.5 + 2 * 0.25
    got = sampling_probs(
        x,
        [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)],
        history,
        [row],
    )
    assert torch.allclose(got, expected.softmax(-1), atol=1e-6)


def test_repetition_penalty_covers_the_prompt_and_divides_positive_logits() -> None:
    history = TokenHistory(V, "cpu")
    row = history.add("r", [0, 1])
    logits = torch.zeros(1, V)
    logits[0, 0], logits[0, 1], logits[0, 2] = 4.0, -4.0, 3.0
    got = sampling_probs(logits, [SamplingParams(repetition_penalty=2.0)], history, [row])
    expected = logits.clone()
    expected[0, 0], expected[0, 1] = 2.0, -8.0  # the prompt's tokens only; token 2 unseen
    assert torch.allclose(got, expected.softmax(-1), atol=1e-6)


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    got = sampling_probs(probs.log()[None], [SamplingParams(min_p=0.2)])[0]
    # 0.2 * 0.5 = 0.1: tokens 0, 1, 2 stay, renormalised.
    assert (got > 0).nonzero().flatten().tolist() == [0, 1, 2]
    assert torch.allclose(got[:3], probs[:3] / probs[:3].sum(), atol=1e-6)


def test_bitmask_allows_exactly_its_tokens() -> None:
    logits = _logits(3)
    mask = all_allowed_bitmask(3, V)
    mask[0] = 0
    mask[0, 1] = 1 << 3  # row 0: only token 35
    mask[1, 0] = 0  # row 1: tokens 32..63
    for temperature in (0, 1.0):
        params = [SamplingParams(temperature=temperature)] * 3
        for _ in range(20):
            ids = sample(logits, params, [None] * 3, bitmask=mask).token_ids
            assert ids[0] == 35 and ids[1] >= 32
    assert torch.equal(
        sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3, bitmask=mask).token_ids[2],
        logits[2].argmax(),
    )


def test_adjusted_batches_equal_one_by_one() -> None:
    """Each row's tokens are those it gets sampled alone: bias, penalties, min-p, masks and seeds
    are per row."""
    logits = _logits(5, seed=21)
    params = [
        SamplingParams(temperature=0.9, seed=1, frequency_penalty=0.7, logit_bias={3: 4}),
        SamplingParams(temperature=0, repetition_penalty=1.5),
        SamplingParams(temperature=1.2, seed=3, min_p=0.1, top_k=20),
        SamplingParams(temperature=0, logit_bias={int(logits[3].argmax()): -100}),
        SamplingParams(temperature=0.7, seed=5, presence_penalty=1.0, top_p=0.9),
    ]
    mask = all_allowed_bitmask(5, V)
    mask[2, 0], mask[2, 1] = 0x0F0F0F0F, 0  # row 2: tokens 0-3, 8-11, 16-19, 24-27

    def run(rows: list[int]) -> list[list[int]]:
        history = TokenHistory(V, "cpu", capacity=1)
        keys = [f"r{i}" for i in rows]
        hrows = [
            history.add(k, [i, 2 * i]) if params[i].penalized else None for k, i in zip(keys, rows)
        ]
        gens = [make_generator(params[i].seed, "cpu") if params[i].seed else None for i in rows]
        out: list[list[int]] = [[] for _ in rows]
        for _ in range(15):
            ids = sample(
                logits[rows], [params[i] for i in rows], gens, history, hrows, mask[rows]
            ).token_ids
            history.record(hrows, ids)
            for j, t in enumerate(ids.tolist()):
                out[j].append(t)
        return out

    batched = run(list(range(5)))
    assert [run([i])[0] for i in range(5)] == batched
    assert all(
        t in range(0, 4) or t in range(8, 12) or t in range(16, 20) or t in range(24, 28)
        for t in batched[2]
    )


def test_history_rows_are_reused_and_grow() -> None:
    history = TokenHistory(V, "cpu", capacity=1)
    a = history.add("a", [5])
    history.record([a], torch.tensor([9]))
    b = history.add("b", [])  # grows to 2 rows, keeping a's
    assert history.capacity == 2 and history.output_counts[a, 9] == 1 and history.in_prompt[a, 5]
    history.release("a")
    c = history.add("c", [])
    assert c == a and history.output_counts[c].sum() == 0 and not history.in_prompt[c].any()
    with pytest.raises(ValueError):
        history.add("b", [])
    history.check_invariants()
    assert b != c
