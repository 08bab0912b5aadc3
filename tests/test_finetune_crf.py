"""CRF decoding and likelihood against brute-force enumeration on short sequences."""

import itertools

import pytest
import torch

from finetune.crf import CRF


def _brute_scores(crf, emissions, length):
    """Score of every tag sequence of ``length`` for one sequence's emissions [T, K]."""
    out = {}
    for tags in itertools.product(range(crf.num_tags), repeat=length):
        s = crf.start_transitions[tags[0]] + emissions[0, tags[0]]
        for t in range(1, length):
            s = s + crf.transitions[tags[t - 1], tags[t]] + emissions[t, tags[t]]
        out[tags] = s + crf.end_transitions[tags[-1]]
    return out


@pytest.fixture
def crf_batch():
    torch.manual_seed(0)
    crf = CRF(3)
    with torch.no_grad():  # larger transitions than the init so they matter for the argmax
        crf.transitions.normal_(0, 1.5)
        crf.start_transitions.normal_(0, 1)
        crf.end_transitions.normal_(0, 1)
    emissions = torch.randn(4, 5, 3)
    lengths = [5, 3, 1, 4]
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    return crf, emissions, mask, lengths


def test_viterbi_matches_brute_force(crf_batch):
    crf, emissions, mask, lengths = crf_batch
    decoded = crf.decode(emissions, mask)
    for b, n in enumerate(lengths):
        scores = _brute_scores(crf, emissions[b], n)
        best = max(scores, key=lambda k: scores[k].item())
        assert decoded[b] == list(best)


def test_log_partition_and_likelihood_match_enumeration(crf_batch):
    crf, emissions, mask, lengths = crf_batch
    tags = torch.randint(0, 3, (4, 5))
    logz = crf.log_partition(emissions, mask)
    ll = crf.log_likelihood(emissions, tags, mask)
    for b, n in enumerate(lengths):
        scores = _brute_scores(crf, emissions[b], n)
        expected_logz = torch.logsumexp(torch.stack(list(scores.values())), 0)
        assert logz[b].item() == pytest.approx(expected_logz.item(), abs=1e-4)
        own = scores[tuple(tags[b, :n].tolist())]
        assert ll[b].item() == pytest.approx((own - expected_logz).item(), abs=1e-4)
    # probabilities of all sequences of the length-3 example sum to one
    probs = torch.stack([torch.exp(s - logz[1]) for s in _brute_scores(crf, emissions[1], 3).values()])
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_training_the_crf_learns_a_transition_rule():
    # Tag 1 may only follow tag 1 or 2 in the data; emissions alone cannot tell 1 from 2 (identical).
    torch.manual_seed(0)
    crf = CRF(3)
    opt = torch.optim.Adam(crf.parameters(), lr=0.1)
    emissions = torch.zeros(2, 4, 3)
    emissions[:, :, 0] = torch.tensor([[2.0, -2, -2, -2], [2.0, -2, -2, -2]])
    tags = torch.tensor([[0, 2, 1, 1], [0, 2, 1, 1]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    first = crf(emissions, tags, mask).item()
    for _ in range(100):
        opt.zero_grad()
        loss = crf(emissions, tags, mask)
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    assert crf.decode(emissions, mask)[0] == [0, 2, 1, 1]


def test_bad_mask_is_rejected():
    crf = CRF(2)
    with pytest.raises(ValueError, match="first step"):
        crf.decode(torch.zeros(1, 3, 2), torch.tensor([[False, True, True]]))
