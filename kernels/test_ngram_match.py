"""N-gram match: the torch reference against `specdec.drafters.PromptLookup` (whose tests compare it with Hugging Face),
row by row, and the Triton kernel against the reference."""
import pytest, torch
from specdec_kernels import ngram_match_torch
from specdec.drafters import PromptLookup

def make_rows(seed, B=6, S_cap=40, alphabet=4):
    "Rows over a small alphabet (many matches), of lengths 0, 1, 2 and longer; slots past each length hold junk (99)."
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, alphabet, (B, S_cap), generator=g)
    lengths = torch.tensor([S_cap, 0, 1, 2, 17, 29])[:B]
    tokens[torch.arange(S_cap) >= lengths[:, None]] = 99
    return tokens, lengths

def prompt_lookup(tokens, lengths, max_ngram, min_ngram, k):
    "PromptLookup's drafts, row by row, padded with 0 to k."
    drafts, counts = [], []
    for row, length in zip(tokens, lengths.tolist()):
        d = PromptLookup(max_ngram, min_ngram).propose(row[None, :length], k).tokens[0].tolist()
        drafts.append(d + [0] * (k - len(d))); counts.append(len(d))
    return drafts, counts

CASES = [(3, 1, 4, 0), (3, 1, 1, 1), (4, 2, 8, 2), (2, 2, 5, 3), (1, 1, 3, 4), (3, 1, 0, 5)]

@pytest.mark.parametrize("max_ngram,min_ngram,k,seed", CASES)
def test_reference_matches_prompt_lookup(max_ngram, min_ngram, k, seed):
    tokens, lengths = make_rows(seed)
    draft, n_draft = ngram_match_torch(tokens, lengths, max_ngram, min_ngram, k)
    expected_draft, expected_n = prompt_lookup(tokens, lengths, max_ngram, min_ngram, k)
    assert draft.tolist() == expected_draft and n_draft.tolist() == expected_n
    if k: assert n_draft[1] == n_draft[2] == 0 and n_draft[0] > 0       # lengths 0 and 1 cannot match; 40 random tokens do

def test_no_match_drafts_nothing():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 7, 8, 0, 0]])
    draft, n_draft = ngram_match_torch(tokens, torch.tensor([6, 4]), 3, 1, 3)
    assert draft.tolist() == [[0, 0, 0], [7, 8, 0]] and n_draft.tolist() == [0, 2]

@pytest.mark.parametrize("max_ngram,min_ngram,k,seed", CASES)
def test_triton_matches_reference(triton_impl, device, max_ngram, min_ngram, k, seed):
    tokens, lengths = (t.to(device) for t in make_rows(seed))
    expected = ngram_match_torch(tokens, lengths, max_ngram, min_ngram, k)
    got = triton_impl("ngram_match")(tokens, lengths, max_ngram, min_ngram, k, block_s=16)
    for e, g in zip(expected, got): assert g.dtype == torch.long and torch.equal(e, g)

def test_bad_inputs_name_the_problem():
    tokens, lengths = make_rows(0)
    with pytest.raises(ValueError, match="need 1 <= min_ngram <= max_ngram"): ngram_match_torch(tokens, lengths, 1, 2, 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 40\]"): ngram_match_torch(tokens, lengths + 5, 3, 1, 4)
    with pytest.raises(TypeError, match="tokens must have dtype torch.int64"): ngram_match_torch(tokens.int(), lengths, 3, 1, 4)
