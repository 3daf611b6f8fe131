"""Built-in modality encoders: behaviour on hand-made inputs (the generic contract,
gradient and determinism checks run over every encoder in test_conformance.py)."""

import math

import pytest
import torch
from m3tfed import get_catalogue
from m3tfed.plugins.encoders import (
    ImageEncoder,
    InteractionEncoder,
    TabularEncoder,
    build_text_encoder,
)
from m3tfed.plugins.encoders.text import ByteTokenizer, chunk_mean
from m3tfed.training import make_optimizer

D = 16


# -- tabular -----------------------------------------------------------------------------


def test_tabular_one_token_per_feature_and_formula():
    torch.manual_seed(0)
    enc = TabularEncoder(D, n_numeric=2, cardinalities=[3])
    x = {"numeric": torch.tensor([[2.0, -1.0]]), "categorical": torch.tensor([[1]])}
    tokens, mask = enc(x)
    assert tokens.shape == (1, 3, D) and mask.tolist() == [[True, True, True]]
    torch.testing.assert_close(tokens[0, 0], 2.0 * enc.num_weight[0] + enc.num_bias[0])
    torch.testing.assert_close(tokens[0, 1], -1.0 * enc.num_weight[1] + enc.num_bias[1])
    # column 0's block starts at row 0; row 0 is "missing", so category 1 is row 2
    torch.testing.assert_close(tokens[0, 2], enc.cat_embed.weight[2] + enc.cat_bias[0])


def test_tabular_nan_is_embedded_with_finite_gradients():
    torch.manual_seed(0)
    enc = TabularEncoder(D, n_numeric=3, cardinalities=[2, 4])
    numeric = torch.tensor([[0.5, math.nan, 1.0], [math.nan, math.nan, math.nan]])
    categorical = torch.tensor([[-1, 3], [0, -1]])
    tokens, mask = enc({"numeric": numeric, "categorical": categorical})
    assert torch.isfinite(tokens).all() and mask.all()  # embedded, not masked
    torch.testing.assert_close(tokens[0, 1], enc.num_missing[1])
    torch.testing.assert_close(tokens[1, 0], enc.num_missing[0])
    # the same missing feature gives the same token whatever the other values are
    torch.testing.assert_close(tokens[0, 1], tokens[1, 1])
    # a missing category is its column's row 0 (column 1 starts after column 0's 3 rows)
    torch.testing.assert_close(tokens[0, 3], enc.cat_embed.weight[0] + enc.cat_bias[0])
    torch.testing.assert_close(tokens[1, 4], enc.cat_embed.weight[3] + enc.cat_bias[1])
    tokens.sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # NaN in column 1 of both rows: its weight got no signal, its missing vector did
    assert enc.num_weight.grad[1].abs().sum() == 0
    assert enc.num_missing.grad[1].abs().sum() > 0


def test_tabular_only_numeric_or_only_categorical():
    assert TabularEncoder(D, n_numeric=0, cardinalities=[5])(
        {"categorical": torch.tensor([[4]])}
    ).tokens.shape == (1, 1, D)
    assert TabularEncoder(D, n_numeric=2, cardinalities=[])(
        {"numeric": torch.zeros(3, 2)}
    ).tokens.shape == (3, 2, D)


def test_tabular_errors_name_the_column():
    enc = TabularEncoder(D, n_numeric=1, cardinalities=[3, 2])
    with pytest.raises(ValueError, match=r"categorical column 1 has values outside -1\.\.1"):
        enc({"numeric": torch.zeros(1, 1), "categorical": torch.tensor([[0, 2]])})
    with pytest.raises(ValueError, match=r"'numeric' must be \[B, 1\], got \[1, 2\]"):
        enc({"numeric": torch.zeros(1, 2), "categorical": torch.tensor([[0, 0]])})
    with pytest.raises(KeyError, match="categorical"):
        enc({"numeric": torch.zeros(1, 1)})


# -- text --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_special_ids():
    tok = ByteTokenizer(max_length=64)
    text = "Schüler écrit 学生 ok"
    ids = tok.encode(text)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.encode("A") == [1, ord("A") + 3, 2]


def test_byte_tokenizer_truncation_keeps_whole_characters():
    tok = ByteTokenizer(max_length=8)  # 6 bytes of text
    assert tok.decode(tok.encode("abcdefghij")) == "abcdef"
    ids = tok.encode("abcde学")  # 学 is 3 bytes: it does not fit after 5 bytes
    assert len(ids) == 7 and tok.decode(ids) == "abcde"
    assert tok.encode("abcdefghij", max_length=5)[-1] == tok.sep_token_id


def test_byte_tokenizer_batch_padding():
    tok = ByteTokenizer(max_length=16)
    batch = tok(["hi", "hello"])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert tok.decode(batch["input_ids"][0]) == "hi"


def test_chunk_mean_pools_contiguous_chunks():
    hidden = torch.arange(10.0).view(1, 5, 2)  # positions 0..4, values (0,1), (2,3), ...
    mask = torch.tensor([[True, True, True, False, False]])
    tokens, tmask = chunk_mean(hidden, mask, size=3)
    assert tmask.tolist() == [[True, False]]
    torch.testing.assert_close(tokens[0, 0], torch.tensor([2.0, 3.0]))  # mean of 0,2,4 / 1,3,5
    tokens, tmask = chunk_mean(hidden, mask, size=2)  # 5 -> 3 chunks, the last one padding
    assert tmask.tolist() == [[True, True, False]]
    torch.testing.assert_close(tokens[0, 1], torch.tensor([4.0, 5.0]))  # only position 2 is real
    same, smask = chunk_mean(hidden, mask, size=1)
    assert torch.equal(same[mask], hidden[mask]) and torch.equal(smask, mask)
    assert not same[~mask].any()  # padded positions pool to zeros


def test_text_encoder_strings_and_ids_agree_and_t_is_bounded():
    torch.manual_seed(0)
    enc = build_text_encoder(D, max_length=40, max_tokens=4, hidden=16)  # chunks of 10 ids
    texts = ["a short one", "a much longer essay " * 5]  # 13 ids; truncated to 40
    out = enc(texts)
    assert out.tokens.shape == (2, 4, D)
    assert out.mask[1].all() and out.mask[0].tolist() == [True, True, False, False]
    again = enc(enc.tokenize(texts))
    torch.testing.assert_close(out.tokens, again.tokens)
    one = enc("a short one")  # a single string is one sample, with the same chunks
    assert one.tokens.shape == (1, 2, D) and one.mask.all()
    torch.testing.assert_close(one.tokens[0], out.tokens[0, :2], rtol=1e-4, atol=1e-5)


def test_text_encoder_padding_does_not_change_a_sample():
    torch.manual_seed(0)
    enc = build_text_encoder(D, max_length=64, max_tokens=64, hidden=16)
    alone = enc(["padding must not leak"])
    batched = enc(["padding must not leak", "a much, much longer neighbour that forces padding"])
    n = int(alone.mask.sum())
    torch.testing.assert_close(batched.tokens[0, :n], alone.tokens[0, :n], rtol=1e-4, atol=1e-5)
    assert not batched.mask[0, n:].any()


def test_text_encoder_frozen_backbone_keeps_adapter_trainable():
    enc = build_text_encoder(D, freeze_backbone=True)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias"}


# -- image -------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "p"), [(32, 32, 8), (16, 32, 8), (12, 8, 4)])
def test_image_token_count(h, w, p):
    enc = ImageEncoder(D, image_size=32, patch_size=p, channels=3, depth=1)
    tokens, mask = enc(torch.rand(2, 3, h, w))
    assert tokens.shape == (2, (h // p) * (w // p), D) and mask.all()


def test_image_rejects_bad_shapes_with_expected_layout():
    enc = ImageEncoder(D, image_size=16, patch_size=4, channels=1)
    with pytest.raises(
        ValueError,
        match=r"\[B, 1, H, W\] with H, W multiples of 4 and at most 16; got \[1, 1, 10, 16\]",
    ):
        enc(torch.rand(1, 1, 10, 16))
    with pytest.raises(ValueError, match="got \\[1, 3, 16, 16\\]"):
        enc(torch.rand(1, 3, 16, 16))


def test_image_depth_zero_is_patch_embedding_only():
    enc = ImageEncoder(D, image_size=8, patch_size=4, depth=0)
    assert len(enc.layers) == 0 and enc(torch.rand(1, 1, 8, 8)).tokens.shape == (1, 4, D)


# -- sequence ----------------------------------------------------------------------------


def _log(b=2, length=6, skills=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "skill": torch.randint(0, skills, (b, length), generator=g),
        "correct": torch.randint(0, 2, (b, length), generator=g),
        "mask": torch.ones(b, length, dtype=torch.bool),
    }


def test_sequence_is_causal():
    torch.manual_seed(0)
    enc = InteractionEncoder(D, num_skills=10, max_len=8).eval()
    x = _log()
    base = enc(x).tokens
    t = 2
    changed = {k: v.clone() for k, v in x.items()}
    changed["correct"][:, t + 1] = 1 - changed["correct"][:, t + 1]
    changed["skill"][:, t + 1] = (changed["skill"][:, t + 1] + 3) % 10
    out = enc(changed).tokens
    torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])  # tokens <= t unchanged
    assert not torch.allclose(out[:, t + 1], base[:, t + 1])  # token t+1 did change


def test_sequence_interaction_id_uses_correctness():
    torch.manual_seed(0)
    enc = InteractionEncoder(D, num_skills=10, max_len=8).eval()
    x = _log(b=1, length=1)
    y = {k: v.clone() for k, v in x.items()}
    y["correct"] = 1 - y["correct"]
    assert not torch.allclose(enc(x).tokens, enc(y).tokens)


def test_sequence_padding_left_or_right_gives_same_tokens():
    torch.manual_seed(0)
    enc = InteractionEncoder(D, num_skills=10, max_len=8).eval()
    skill, correct = torch.tensor([[3, 4, 5]]), torch.tensor([[1, 0, 1]])
    right = enc(
        {
            "skill": torch.cat([skill, torch.zeros(1, 2, dtype=torch.long)], 1),
            "correct": torch.cat([correct, torch.zeros(1, 2, dtype=torch.long)], 1),
            "mask": torch.tensor([[True, True, True, False, False]]),
        }
    )
    left = enc(
        {
            "skill": torch.cat([torch.full((1, 2), 7), skill], 1),
            "correct": torch.cat([torch.ones(1, 2, dtype=torch.long), correct], 1),
            "mask": torch.tensor([[False, False, True, True, True]]),
        }
    )
    torch.testing.assert_close(right.tokens[0, :3], left.tokens[0, 2:], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(left.tokens).all()  # padded queries have a non-empty softmax row


def test_sequence_query_token_sees_history_and_is_appended():
    torch.manual_seed(0)
    enc = InteractionEncoder(D, num_skills=10, max_len=8).eval()
    x = _log(length=4)
    x["mask"][1, 2:] = False
    x["query_skill"] = torch.tensor([1, 2])
    tokens, mask = enc(x)
    assert (
        tokens.shape == (2, 5, D)
        and mask[:, -1].all()
        and mask[1].tolist() == [True, True, False, False, True]
    )
    y = {k: v.clone() for k, v in x.items()}
    y["correct"][:, 0] = 1 - y["correct"][:, 0]
    assert not torch.allclose(enc(y).tokens[:, -1], tokens[:, -1])  # query depends on history
    y = {k: v.clone() for k, v in x.items()}
    y["correct"][1, 3] = 1 - y["correct"][1, 3]  # a padded step: nobody may see it
    torch.testing.assert_close(enc(y).tokens[1][mask[1]], tokens[1][mask[1]])


def test_sequence_errors():
    enc = InteractionEncoder(D, num_skills=10, max_len=4)
    with pytest.raises(ValueError, match="6 steps, max_len is 4"):
        enc(_log(length=6))
    bad = _log(length=3)
    bad["skill"][0, 0] = 10
    with pytest.raises(ValueError, match=r"skill ids must be in 0\.\.9, got .*\.\.10"):
        enc(bad)


# -- registration ------------------------------------------------------------------------


def test_builtin_encoders_are_registered_by_modality():
    cat = get_catalogue()
    modality = {
        name: cat.get("encoder", name).modality for name in ("tabular", "text", "image", "sequence")
    }
    assert modality == {
        "tabular": "tabular",
        "text": "text",
        "image": "image",
        "sequence": "interactions",
    }
    assert all(cat.get("encoder", n).package == "m3tfed" for n in modality)


# -- sequence, factored tokens (question, concept, response) -------------------------------


def _question_log(n, g, difficulty, concept_of):
    """Students answering 12 of 1000 questions, then a 13th; P(correct) depends on the
    student's ability and the question's difficulty, and ability shows only through
    correctness across many different questions."""
    ability = torch.randn(n, generator=g)
    q = torch.randint(0, 1000, (n, 13), generator=g)
    y = (
        torch.rand(n, 13, generator=g) < torch.sigmoid(1.5 * ability[:, None] - difficulty[q])
    ).long()
    return q, concept_of[q], y


def _train_next_response(tokens, steps=100, seed=0, query_bias=True, lr=1e-2):
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(seed)
    difficulty, concept_of = (
        torch.randn(1000, generator=g),
        torch.randint(0, 10, (1000,), generator=g),
    )
    train, val = (
        _question_log(800, g, difficulty, concept_of),
        _question_log(400, g, difficulty, concept_of),
    )

    def inputs(log, idx):
        q, c, y = (t[idx] for t in log)
        if tokens == "pair":  # what a source without concepts did: question ids as skills
            return {"skill": q[:, :12], "correct": y[:, :12], "query_skill": q[:, 12]}
        return {
            "skill": c[:, :12],
            "question": q[:, :12],
            "correct": y[:, :12],
            "query_skill": c[:, 12],
            "query_question": q[:, 12],
        }

    torch.manual_seed(seed)
    factored = tokens == "factored"
    enc = InteractionEncoder(
        16,
        num_skills=10 if factored else 1000,
        max_len=12,
        tokens=tokens,
        num_questions=1000 if factored else 0,
        query_bias=query_bias,
    )
    head = torch.nn.Linear(16, 1)
    both = torch.nn.ModuleList([enc, head])  # the query bias's lr multiplier, as trainers do
    opt = make_optimizer(both, both.parameters(), lr, "adamw", 0.0)
    for _ in range(steps):
        idx = torch.randint(0, 800, (64,), generator=g)
        logit = head(enc(inputs(train, idx)).tokens[:, -1]).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logit, train[2][idx, 12].float()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logit = head(enc(inputs(val, torch.arange(400))).tokens[:, -1]).squeeze(-1)
    return roc_auc_score(val[2][:, 12].numpy(), logit.numpy())


def test_factored_sequence_learns_from_1000_question_ids():
    # Same data, same steps: the pair embedding (one vector per question x response) has
    # nothing shared to learn "this student answers correctly" from; factored tokens do.
    pair, factored = (
        _train_next_response("pair", query_bias=False),
        _train_next_response("factored", query_bias=False),
    )
    assert factored > 0.6 and factored > pair + 0.04, (pair, factored)


def test_query_bias_learns_what_the_next_question_id_says():
    # Question ids as skills (a source without concepts), at the federation's default
    # learning rate: within 100 steps the per-item bias on the query token learns what
    # each question's difficulty says; without it the model stays near chance
    # (measured 0.496 -> 0.542).
    without = _train_next_response("pair", query_bias=False, lr=3e-3)
    with_bias = _train_next_response("pair", lr=3e-3)
    assert with_bias > 0.52 and with_bias > without + 0.03, (without, with_bias)


def test_query_bias_starts_at_zero_and_reads_the_question_id_when_given():
    torch.manual_seed(0)
    enc = InteractionEncoder(
        D, num_skills=10, max_len=8, tokens="factored", num_questions=1000
    ).eval()
    assert enc.query_bias.shape == (1000, 1) and not enc.query_bias.any()
    x = _log(length=4)
    x["question"] = torch.tensor([[0, 999, 5, 7], [1, 2, 3, 998]])
    x["query_skill"], x["query_question"] = torch.tensor([1, 1]), torch.tensor([999, 0])
    before = enc(x).tokens
    with torch.no_grad():
        enc.query_bias[999] = 0.5  # the first sample's next question, not a skill id
    after = enc(x).tokens
    assert not torch.allclose(after[0], before[0]) and torch.allclose(after[1], before[1])
    assert InteractionEncoder(D, num_skills=10, query_bias=False).query_bias is None
    # no next question id: no row is read (skill 1 would have read question 1's row)
    with torch.no_grad():
        enc.query_bias[1] = 0.5
    no_question = {k: v for k, v in x.items() if k != "query_question"}
    unbiased = enc(no_question).tokens
    with torch.no_grad():
        enc.query_bias.zero_()
    torch.testing.assert_close(enc(no_question).tokens, unbiased)


def test_query_bias_leaves_other_initial_weights_and_logs_without_a_query_alone():
    # The default federation's logs have no query: the option must not change its run.
    def build(query_bias):
        torch.manual_seed(0)
        enc = InteractionEncoder(D, num_skills=10, max_len=8, query_bias=query_bias).eval()
        return enc, torch.rand(3)  # the next draw of the global generator

    (on, after_on), (off, after_off) = build(True), build(False)
    torch.testing.assert_close(after_on, after_off)
    x = _log(length=4)
    torch.testing.assert_close(on(x).tokens, off(x).tokens)


def test_factored_sequence_question_ids_checked_and_start_at_their_concept():
    torch.manual_seed(0)
    enc = InteractionEncoder(
        D, num_skills=10, max_len=8, tokens="factored", num_questions=1000
    ).eval()
    x = _log(length=4)
    x["question"] = torch.tensor([[0, 999, 5, 7], [1, 2, 3, 998]])
    x["query_skill"], x["query_question"] = torch.tensor([1, 2]), torch.tensor([999, 0])
    tokens, _ = enc(x)
    # difficulties start at 0: before training, a question id changes nothing
    without = {k: v for k, v in x.items() if k not in ("question", "query_question")}
    torch.testing.assert_close(enc(without).tokens, tokens)
    with torch.no_grad():
        enc.difficulty.weight[999] = 1.0
    assert not torch.allclose(enc(x).tokens[0], tokens[0])
    bad = {**x, "question": x["question"].clone()}
    bad["question"][0, 0] = 1000
    with pytest.raises(ValueError, match=r"question ids must be in 0\.\.999"):
        enc(bad)
    with pytest.raises(ValueError, match="num_questions"):
        InteractionEncoder(D, num_skills=10, max_len=8)(x)
    with pytest.raises(ValueError, match="tokens must be"):
        InteractionEncoder(D, tokens="dkt")
