"""transformers integration: tiny random-config models built with from_config (no download).

Every family runs with attn_implementation="attention_ext" against "eager" (and "sdpa")
with the same weights, in fp32: logits and parameter gradients to 1e-4, with and without
padding, and greedy generation with a KV cache (tokens equal, step logits to 1e-4). The
path counters of attention_ext.hf prove which layers ran on our kernels.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[hf])")

import attention_ext.hf as aehf  # noqa: E402  (registers "attention_ext")
from attention_ext import _layers, functional  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    Qwen2Config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


TF5 = int(transformers.__version__.split(".")[0]) >= 5
W = 8  # sliding_window of the causal families: a query sees 8 keys, itself included
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, initializer_range=0.2, pad_token_id=0)
LG4 = ["sliding_attention", "full_attention"] * 2


def family_config(name):
    """(config, number of attention layers, what runs them without padding)."""
    if name == "llama":
        return LlamaConfig(**COMMON, num_hidden_layers=2), 2, "kernel"
    if name == "mistral":
        return MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=W), 2, "kernel"
    if name == "qwen2":  # alternating local/global through layer_types
        return Qwen2Config(**COMMON, num_hidden_layers=4, use_sliding_window=True, sliding_window=W,
                           max_window_layers=0, layer_types=LG4), 4, "kernel"
    if name == "gemma2":  # alternating, attn_logit_softcapping=50 inside the kernels
        return Gemma2Config(**COMMON, num_hidden_layers=4, sliding_window=W, query_pre_attn_scalar=16,
                            layer_types=LG4), 4, "kernel"
    if name == "gemma2_nosoftcap":
        return Gemma2Config(**COMMON, num_hidden_layers=4, sliding_window=W, query_pre_attn_scalar=16,
                            layer_types=LG4, attn_logit_softcapping=None, final_logit_softcapping=None), 4, "kernel"
    if name == "gemma3":  # 5 local : 1 global
        return Gemma3TextConfig(**COMMON, num_hidden_layers=6, sliding_window=W, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention"] * 5 + ["full_attention"]), 6, "kernel"
    if name == "gpt_oss":  # learned attention sinks (s_aux) inside the kernels, alternating local/global
        cfg = GptOssConfig(**COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=W, layer_types=["sliding_attention", "full_attention"])
        return cfg, 2, "kernel"
    if name == "modernbert":  # bidirectional, local layers see |i - j| <= 64, global every 3rd layer
        cfg = ModernBertConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, local_attention=128, global_attn_every_n_layers=3,
                               max_position_embeddings=512, initializer_range=0.2, pad_token_id=0,
                               reference_compile=False)
        return cfg, 3, "kernel"
    raise KeyError(name)


CAUSAL = ["llama", "mistral", "qwen2", "gemma2", "gemma2_nosoftcap", "gemma3", "gpt_oss"]
FAMILIES = CAUSAL + ["modernbert"]


def build(name, impl, device, config=None):
    cfg = copy.deepcopy(config if config is not None else family_config(name)[0])  # from_config writes into it
    cls = AutoModelForMaskedLM if name == "modernbert" else AutoModelForCausalLM
    torch.manual_seed(0)
    return cls.from_config(cfg, attn_implementation=impl).to(device).eval()


def pair(name, ref_impl, device):
    ref = build(name, ref_impl, device)
    ours = build(name, "attention_ext", device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(name, padded, device, n=None):
    g = torch.Generator().manual_seed(1)
    n = n or (160 if name == "modernbert" else 24)  # longer than the windows
    ids = torch.randint(1, 97, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    if padded:
        if name == "modernbert":
            mask[1, n - 30:] = 0  # right padding
        else:
            mask[1, :7] = 0  # left padding, as in batched generation
        ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def assert_close(ours, ref, what, rel=1e-4):
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    err = (ours - ref).abs().max().item() if ref.numel() else 0.0
    tol = rel * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_grads_match_eager(name, padded, device):
    _, layers, path = family_config(name)
    ref, ours = pair(name, "eager", device)
    ids, mask = inputs(name, padded, device)
    valid = mask.bool()
    weights = torch.randn(*ids.shape, 97, generator=torch.Generator().manual_seed(2)).to(device)
    aehf.reset_counts()
    out = {}
    for tag, model in (("ref", ref), ("ours", ours)):
        logits = model(input_ids=ids, attention_mask=mask if padded else None).logits
        (logits * weights)[valid].sum().backward()
        out[tag] = logits
    assert_close(out["ours"][valid], out["ref"][valid], f"{name} logits")
    for (pname, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        if p_ref.grad is not None:
            assert_close(p_ours.grad, p_ref.grad, f"{name} grad {pname}")
    counts = aehf.fallback_counts()
    assert counts[path] == layers, counts  # padded batches too: the padding is the kernels' key_mask
    assert sum(counts.values()) == layers, counts


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "modernbert"])
def test_logits_match_sdpa(name, device):
    ref, ours = pair(name, "sdpa", device)
    for padded in (False, True):
        ids, mask = inputs(name, padded, device)
        with torch.no_grad():
            a = ref(input_ids=ids, attention_mask=mask).logits
            b = ours(input_ids=ids, attention_mask=mask).logits
        assert_close(b[mask.bool()], a[mask.bool()], f"{name} logits vs sdpa (padded={padded})")


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt_oss"])
def test_generate_with_kv_cache(name, padded, device):
    _, layers, path = family_config(name)
    ref, ours = pair(name, "eager", device)
    ids, mask = inputs(name, padded, device, n=14)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    aehf.reset_counts()
    with torch.no_grad():
        r = ref.generate(ids, **kw)
        o = ours.generate(ids, **kw)
    assert torch.equal(o.sequences, r.sequences)
    for step, (lo, lr) in enumerate(zip(o.logits, r.logits)):
        assert_close(lo, lr, f"{name} step {step} logits")
    counts = aehf.fallback_counts()
    assert counts[path] == 10 * layers, counts  # prefill + 9 cached decoding steps, padded or not


STATIC_W = 6  # the window of the static-cache tests: shorter than their long prompt


def static_pair(name, device):
    """Eager and attention_ext models of one family with 2 layers and a 6-key window
    (Mistral: both sliding; the others one sliding, one full), weight matrices redrawn at
    std 0.15: at transformers' initialisation the attention pattern hardly moves the
    tokens, and a lost causal mask or window would go unseen."""
    base = dict(COMMON, num_hidden_layers=2, sliding_window=STATIC_W)
    types = dict(layer_types=["sliding_attention", "full_attention"])
    cfg = {"mistral": lambda: MistralConfig(**base),
           "qwen2": lambda: Qwen2Config(**base, use_sliding_window=True, max_window_layers=0, **types),
           "gemma2": lambda: Gemma2Config(**base, query_pre_attn_scalar=16, **types),
           "gemma3": lambda: Gemma3TextConfig(**base, query_pre_attn_scalar=16, **types)}[name]()
    return (*redrawn_pair(name, cfg, device), 0 if name == "mistral" else 1)


def redrawn_pair(name, cfg, device):
    """Eager and attention_ext models of ``cfg`` with the weight matrices redrawn at std 0.15."""
    ref = build(name, "eager", device, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1:
                p.copy_((torch.randn(p.shape, generator=g) * 0.15).to(p.device))
    ours = build(name, "attention_ext", device, cfg)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("copied", [False, True], ids=["as_returned", "copied"])
@pytest.mark.parametrize("prompt", [12, 5], ids=["prompt_over_window", "prompt_under_window"])
@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3", "qwen2"])
def test_generate_static_cache_left_padded(name, prompt, copied, device):
    """cache_implementation="static", left padding: eager's tokens and step logits.

    generate copies a static cache's 4-D masks (.contiguous()), and a copy keeps shape,
    dtype and values, not attributes; "copied" clones every mask our mask function
    returns, so the masks are read by shape alone. A prompt of 12 passes the window in the
    prefill (the sliding layers' keys are then just the prompt: plain, our key padding);
    one of 5 fills the window while decoding (not yet full: transformers' dense mask)."""
    from transformers.masking_utils import AttentionMaskInterface

    ref, ours, full_layers = static_pair(name, device)
    ids = torch.randint(1, 97, (2, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4 if prompt == 12 else 2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    steps = 4
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0, cache_implementation="static")

    def copy_of_mask(*args, **kwargs):
        m = aehf.mask_function(*args, **kwargs)
        return m if m is None else m.clone()

    with torch.no_grad():
        r = ref.generate(ids, **kw)
        if copied:
            AttentionMaskInterface.register("attention_ext", copy_of_mask)
        try:
            aehf.reset_counts()
            o = ours.generate(ids, **kw)
        finally:
            AttentionMaskInterface.register("attention_ext", aehf.mask_function)
    assert torch.equal(o.sequences, r.sequences)
    for step, (lo, lr) in enumerate(zip(o.logits, r.logits)):
        assert_close(lo, lr, f"{name} static cache step {step} logits")
    # prefill: a full layer's keys are the whole cache, a sliding layer's the prompt when it passes the window,
    # else the window-sized buffer: the short key row of the written slots, on the kernels. Decoding: every
    # layer on the kernels, transformers' one-row masks as key_mask.
    assert aehf.fallback_counts() == {"kernel": 2 * steps, "dense_mask": 0, "dropout": 0}


def static_model_pair(name, device, layers):
    """Eager and attention_ext models of one family, ``layers`` layers of the family's own
    types (Mistral: every layer sliding; Gemma 2: alternating; Gemma 3: 5 sliding : 1 full),
    window STATIC_W, weights redrawn (:func:`redrawn_pair`)."""
    base = dict(COMMON, num_hidden_layers=layers, sliding_window=STATIC_W)
    cfg = {"mistral": lambda: MistralConfig(**base),
           "gemma2": lambda: Gemma2Config(**base, query_pre_attn_scalar=16),
           "gemma3": lambda: Gemma3TextConfig(**base, query_pre_attn_scalar=16)}[name]()
    return redrawn_pair(name, cfg, device)


@pytest.mark.parametrize("n", [11, 5], ids=["prompt_over_window", "prompt_under_window"])
@pytest.mark.parametrize("cache", ["static", "sliding_window", "hybrid", None])
@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_generate_static_caches_batch_of_4_left_padded(name, cache, n, device):
    """A batch of 4 left-padded prompts (padding 0, 1, 2, 4 of 5 tokens or 0, 2, 5, 9 of 11), greedy, with the
    caches transformers builds for the family (static full layers: the whole buffer; static
    sliding layers: a window-sized buffer it shifts as it fills; "sliding_window" and "hybrid"
    are the older names, None the dynamic default): eager's tokens, every call on the kernels.
    8 new tokens carry the rows that start short of the window past it."""
    layers = 6 if name == "gemma3" else 4
    ref, ours = static_model_pair(name, device, layers)
    if name != "mistral":  # Mistral: no layer_types, every layer slides
        assert {"sliding_attention", "full_attention"} <= set(ours.config.layer_types)
    steps = 8
    ids = torch.randint(1, 97, (4, n), generator=torch.Generator().manual_seed(3)).to(device)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 2, 5, 9) if n == 11 else (0, 1, 2, 4)):
        mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache)
    with torch.no_grad():
        r = ref.generate(ids, **kw)
        aehf.reset_counts()
        o = ours.generate(ids, **kw)
    if TF5:  # 5.x: "sliding_window" builds the StaticCache of the config's layer types; "hybrid" and None the
        # dynamic caches (DynamicSlidingWindowLayer for sliding layers)
        assert type(o.past_key_values).__name__ == ("DynamicCache" if cache in ("hybrid", None) else "StaticCache")
    assert torch.equal(o.sequences, r.sequences)
    for step, (lo, lr) in enumerate(zip(o.logits, r.logits)):
        assert_close(lo[mask[:, -1].bool()], lr[mask[:, -1].bool()], f"{name} {cache} cache step {step} logits")
    assert aehf.fallback_counts() == {"kernel": steps * layers, "dense_mask": 0, "dropout": 0}


def test_attention_forward_reads_masks_by_shape(device):
    """What each mask means follows from shape and dtype, which a copy keeps: a bool
    (B, 1, 1, N) mask is key padding for several queries (the layer adds its causal
    window), and for one query the whole mask (a static cache's row: the query need not be
    at the last key); other query-independent masks of a causal layer are refused."""
    import types

    import torch.nn.functional as F

    module = types.SimpleNamespace(is_causal=True, config=None)
    g = torch.Generator().manual_seed(0)
    B, H, N, D, w = 2, 2, 10, 8, 4
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device) for _ in range(3))
    pad = torch.ones(B, N, dtype=torch.bool, device=device)
    pad[1, :3] = False
    i, j = torch.arange(N, device=device).view(-1, 1), torch.arange(N, device=device).view(1, -1)
    aehf.reset_counts()
    # several queries: the key padding and the layer's causal window of w keys
    out, _ = aehf.attention_forward(module, q, k, v, pad.view(B, 1, 1, N).clone(), sliding_window=w)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=pad.view(B, 1, 1, N) & (j <= i) & (i - j < w))
    valid = pad  # a padded query sees no key (zeros here, NaN in SDPA)
    assert_close(out[valid], want.transpose(1, 2)[valid], "key padding, several queries")
    # one query at position 5 of 10 static slots (slots 6.. unused, masked): its row is the whole mask; the
    # layer's window applied from the last slot would see only unused slots
    row = pad & (j[0] <= 5) & (j[0] > 5 - w)
    out, _ = aehf.attention_forward(module, q[:, :, 5:6], k, v, row.view(B, 1, 1, N).clone(), sliding_window=w)
    want = F.scaled_dot_product_attention(q[:, :, 5:6], k, v, attn_mask=row.view(B, 1, 1, N))
    assert_close(out, want.transpose(1, 2), "one query, a static cache's row")
    # several queries and a row shorter than the keys (a static cache's prefill): the keys end with the row, the
    # queries are its last ones; the unused slots after it hold garbage that must not be seen
    M = 7
    k2, v2 = k.clone(), v.clone()
    k2[:, :, M:], v2[:, :, M:] = 1e4, float("nan")
    out, _ = aehf.attention_forward(module, q[:, :, 4:M], k2, v2, pad[:, :M].reshape(B, 1, 1, M).clone(),
                                    sliding_window=w)
    want = F.scaled_dot_product_attention(q[:, :, 4:M], k[:, :, :M], v[:, :, :M],
                                          attn_mask=pad[:, :M].view(B, 1, 1, M) & (j[:, :M] <= i[4:M])
                                          & (i[4:M] - j[:, :M] < w))
    assert_close(out, want.transpose(1, 2), "several queries, a row shorter than the keys")
    assert aehf.fallback_counts()["kernel"] == 3
    for other in (torch.zeros(B, 1, 1, N, device=device), pad.view(B, 1, 1, N).expand(B, 1, N, N)):
        with pytest.raises(RuntimeError, match="query-independent"):
            aehf.attention_forward(module, q, k, v, other)


@pytest.mark.parametrize("name", ["llama", "qwen2", "modernbert"])
def test_no_dense_mask_without_padding(name, device, monkeypatch):
    """Without padding the mask function returns None: transformers' mask builder never runs."""
    from transformers import masking_utils

    ref, ours = pair(name, "eager", device)
    ids, mask = inputs(name, False, device)

    def refuse(*args, **kwargs):
        raise AssertionError("a dense attention mask was built")

    monkeypatch.setattr(masking_utils, "sdpa_mask", refuse)
    aehf.reset_counts()
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
        if name != "modernbert" or TF5:  # 4.57's ModernBERT builds its masks itself
            ours(input_ids=ids)
    assert aehf.fallback_counts()["kernel"] > 0


@pytest.mark.parametrize("name", ["mistral", "gemma2", "modernbert"])
def test_padding_builds_no_dense_mask(name, device, monkeypatch):
    """A padded batch runs on the kernels with the padding as key_mask: neither transformers'
    mask builder nor our band mask runs, and the logits match eager on the real tokens."""
    from transformers import masking_utils

    _, layers, _ = family_config(name)
    ref, ours = pair(name, "eager", device)
    ids, mask = inputs(name, True, device)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits

    def refuse(*args, **kwargs):
        raise AssertionError("a dense attention mask was built")

    monkeypatch.setattr(masking_utils, "sdpa_mask", refuse)
    monkeypatch.setattr(_layers, "band_mask", refuse)  # every dense band mask of ours is built here
    aehf.reset_counts()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_close(got[valid], expected[valid], f"{name} padded logits")
    # (4.57's ModernBERT builds its N x N masks itself; its key padding is read back from them)
    assert aehf.fallback_counts()["kernel"] == layers


def test_mask_function_returns_key_padding_or_documents(device):
    """With padding: the key padding as a bool (B, 1, 1, N) tensor (O(B*N)); for packed
    sequences (position ids that restart) the documents' cu_seqlens, int32 (B, 1, 1, S+1)."""
    cfg, _, _ = family_config("llama")
    model = build("llama", "attention_ext", device)
    ids, mask = inputs("llama", True, device)
    seen = []
    orig = aehf.attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask)
        return orig(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register("attention_ext", spy)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            padding = seen[-1]
            assert padding.shape == (2, 1, 1, 24) and padding.dtype == torch.bool
            assert torch.equal(padding[:, 0, 0], mask.bool())
            # two packed sequences per row (position ids restart): their boundaries
            pos = torch.cat([torch.arange(10), torch.arange(14)]).view(1, -1).expand(2, -1).to(device)
            aehf.reset_counts()
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            cu = seen[-1]
            assert cu.dtype == torch.int32 and cu.tolist() == [[[[0, 10, 24]]]] * 2
            assert aehf.fallback_counts() == {"kernel": 2, "dense_mask": 0, "dropout": 0}
            # the second sequence of a packed row equals running it alone
            alone = model(input_ids=ids[:, 10:], use_cache=False).logits
            assert_close(packed[:, 10:], alone, "packed vs alone")
    finally:
        AttentionInterface.register("attention_ext", orig)


PACKED = [5, 13, 9, 20]  # document lengths, several longer than the window W


def packed_batch(flash_kwargs):
    """One flattened row from DataCollatorWithFlattening: position ids restart at 0 per
    document; with flash_kwargs also the cu_seq_lens_q/k and max_length_q/k FlashAttention reads."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(4)
    docs = [{"input_ids": torch.randint(1, 97, (n,), generator=g).tolist()} for n in PACKED]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(docs, return_tensors="pt")


def refuse_dense_masks(monkeypatch):
    """Every dense mask, transformers' or ours, raises from here on."""
    from transformers import masking_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a dense attention mask was built")

    for owner, name in ((masking_utils, "sdpa_mask"), (_layers, "band_mask"), (_layers, "document_mask")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "flash_kwargs"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2", "gemma3"])
def test_packed_sequences_match_eager(name, flash_kwargs, device, monkeypatch):
    """A DataCollatorWithFlattening batch (Qwen2, Gemma 2 and 3: sliding and full layers;
    Mistral: all sliding, W = 8 keys inside each document; Gemma 2 with its softcap) runs on
    the kernels with the documents' cu_seqlens, no dense mask anywhere: logits and parameter
    gradients as eager on the same
    batch (which builds its block-diagonal mask from the position ids), and each document's
    logits as running it alone (so eager's mask is the one meant)."""
    _, layers, _ = family_config(name)
    ref, ours = pair(name, "eager", device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed_batch(flash_kwargs).items()}
    batch.pop("labels")
    n = sum(PACKED)
    weights = torch.randn(1, n, 97, generator=torch.Generator().manual_seed(2)).to(device)
    out = {}
    for tag, model in (("ref", ref), ("ours", ours)):
        if tag == "ours":
            refuse_dense_masks(monkeypatch)
            aehf.reset_counts()
        logits = model(**batch, use_cache=False).logits
        (logits * weights).sum().backward()
        out[tag] = logits
    assert aehf.fallback_counts() == {"kernel": layers, "dense_mask": 0, "dropout": 0}
    monkeypatch.undo()
    assert_close(out["ours"], out["ref"], f"{name} packed logits")
    for (pname, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        if p_ref.grad is not None:
            assert_close(p_ours.grad, p_ref.grad, f"{name} packed grad {pname}")
    start = 0
    with torch.no_grad():
        for length in PACKED:
            alone = ref(input_ids=batch["input_ids"][:, start:start + length], use_cache=False).logits
            assert_close(out["ours"][:, start:start + length], alone, f"{name} document at {start} alone")
            start += length


def test_packed_rows_differ(device, monkeypatch):
    """Two rows packed differently (2 and 3 documents: cu_seqlens (2, 4), the short row
    repeats its end) match eager on the same batch."""
    ref, ours = pair("qwen2", "eager", device)
    pos = torch.stack([torch.cat([torch.arange(11), torch.arange(19)]),
                       torch.cat([torch.arange(4), torch.arange(16), torch.arange(10)])]).to(device)
    ids = torch.randint(1, 97, pos.shape, generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        refuse_dense_masks(monkeypatch)
        aehf.reset_counts()
        got = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert aehf.fallback_counts() == {"kernel": 4, "dense_mask": 0, "dropout": 0}
    assert_close(got, want, "qwen2 rows packed differently")


def test_attention_forward_reads_flash_kwargs(device):
    """With no mask, cu_seq_lens_q/k (FlashAttention's kwargs) are the documents, as the
    FlashAttention-2 path reads them: each document attends alone (causal, window w)."""
    import types

    import torch.nn.functional as F

    module = types.SimpleNamespace(is_causal=True, config=None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g).to(device) for _ in range(3))
    cu = torch.tensor([0, 3, 12, 20], dtype=torch.int32, device=device)
    aehf.reset_counts()
    out, _ = aehf.attention_forward(module, q, k, v, None, sliding_window=4, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                    max_length_q=9, max_length_k=9)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        band = _layers.band_mask(b - a, b - a, causal=True, left=3, device=device)
        want = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=band)
        assert_close(out[:, a:b], want.transpose(1, 2), f"document {a}:{b}")
    assert aehf.fallback_counts()["kernel"] == 1
    with pytest.raises(NotImplementedError, match="cu_seq_lens"):
        aehf.attention_forward(module, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                               None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


def test_set_attn_implementation_switches_every_layer(device):
    ref = build("gemma2_nosoftcap", "eager", device)
    ids, _ = inputs("gemma2_nosoftcap", False, device)
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        ref.set_attn_implementation("attention_ext")
        aehf.reset_counts()
        b = ref(input_ids=ids).logits
    assert ref.config._attn_implementation == "attention_ext"
    assert aehf.fallback_counts()["kernel"] == 4
    assert_close(b, a, "after set_attn_implementation")


@pytest.mark.parametrize("pattern", ["LG", "LLLLLG", "G", "L"])
def test_alternate_native_family_matches_eager(pattern, device):
    """Qwen2 reads layer_types itself: eager and attention_ext agree after alternate()."""
    cfg = Qwen2Config(**COMMON, num_hidden_layers=6)
    ref = build("qwen2", "eager", device, cfg)
    ours = build("qwen2", "attention_ext", device, cfg)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        aehf.alternate(m, pattern, window=W)
    assert ours.config.layer_types == aehf.layer_types(pattern, 6)
    ids, mask = inputs("qwen2", True, device, n=20)
    with torch.no_grad():
        for am in (None, mask):
            a, b = ref(input_ids=ids, attention_mask=am).logits, ours(input_ids=ids, attention_mask=am).logits
            v = mask.bool() if am is not None else torch.ones_like(mask, dtype=torch.bool)
            assert_close(b[v], a[v], f"alternate {pattern}")
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ref.generate(ids[:1], **kw), ours.generate(ids[:1], **kw))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_alternate_llama_mistral_honoured_by_attention_ext(family, device):
    """Llama/Mistral code ignores layer_types; under attention_ext the pattern still holds:
    same function as a Qwen2 (native layer_types) with the same weights and zero biases."""
    base = dict(COMMON, num_hidden_layers=4)
    cfg = LlamaConfig(**base) if family == "llama" else MistralConfig(**base, sliding_window=W)
    ours = build(family, "attention_ext", device, cfg)
    aehf.alternate(ours, "LG", window=W)
    ref = build("qwen2", "eager", device, Qwen2Config(**base))
    aehf.alternate(ref, "LG", window=W)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("bias") for k in missing)
    with torch.no_grad():
        for k in missing:
            ref.get_parameter(k).zero_()
    ids, mask = inputs("llama", True, device)
    with torch.no_grad():
        for am in (None, mask):
            a, b = ref(input_ids=ids, attention_mask=am).logits, ours(input_ids=ids, attention_mask=am).logits
            v = mask.bool() if am is not None else torch.ones_like(mask, dtype=torch.bool)
            assert_close(b[v], a[v], f"{family} alternate LG (padded={am is not None})")
        kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))


def test_alternate_config_and_gemma3_model(device):
    cfg = Gemma3TextConfig(**COMMON, num_hidden_layers=4, sliding_window=W, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention"] * 4)
    ref = build("gemma3", "eager", device, cfg)
    ours = build("gemma3", "attention_ext", device, cfg)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):  # a global layer appears: per-layer-type RoPE is rebuilt where needed
        aehf.alternate(m, "LG", window=W)
    ids, _ = inputs("gemma3", False, device)
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, "gemma3 alternate LG")
    c = aehf.alternate(copy.deepcopy(cfg), "LLG", window=5)
    assert c.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert c.sliding_window == 5
    with pytest.raises(ValueError, match="pattern"):
        aehf.alternate(copy.deepcopy(cfg), "LXG")


def test_alternate_modernbert_config():
    cfg = ModernBertConfig(num_hidden_layers=6, local_attention=128, reference_compile=False)
    aehf.alternate(cfg, "GLL", window=32)
    types = getattr(cfg, "layer_types", None)
    if TF5:
        assert types == ["full_attention", "sliding_attention", "sliding_attention"] * 2
        assert cfg.sliding_window == 32
    else:
        assert cfg.global_attn_every_n_layers == 3 and cfg.local_attention == 64
        with pytest.raises(NotImplementedError):
            aehf.alternate(cfg, "LG")


def test_softcap_runs_in_the_kernels(device, monkeypatch):
    """Gemma 2's attn_logit_softcapping reaches the op; a cap small enough to bind changes
    the logits (so a dropped softcap would fail) and still matches eager."""
    cfg, layers, _ = family_config("gemma2")
    cfg = copy.deepcopy(cfg)
    cfg.attn_logit_softcapping = 0.5
    ref = build("gemma2", "eager", device, cfg)
    ours = build("gemma2", "attention_ext", device, cfg)
    ours.load_state_dict(ref.state_dict())
    ids, _ = inputs("gemma2", False, device)
    seen = []
    orig = functional.flash_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("softcap"))
        return orig(*args, **kwargs)

    monkeypatch.setattr(functional, "flash_attention", spy)
    aehf.reset_counts()
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, ours(input_ids=ids).logits
        cfg.attn_logit_softcapping = None
        uncapped = build("gemma2", "eager", device, cfg)
        uncapped.load_state_dict(ref.state_dict())
        c = uncapped(input_ids=ids).logits
    assert_close(b, a, "softcap 0.5")
    assert (a - c).abs().max() > 1e-2  # the cap binds
    assert aehf.fallback_counts()["kernel"] == layers
    assert seen == [0.5] * (layers // 2)  # the global layers; the local ones run sliding_window_attention


def test_dropout_runs_on_the_kernels(device):
    ids, _ = inputs("llama", False, device)
    cfg, _, _ = family_config("llama")
    cfg = copy.deepcopy(cfg)
    cfg.attention_dropout = 0.5
    model = build("llama", "attention_ext", device, cfg).train()
    on_kernels = device == "cpu"  # CUDA has no dropout kernel yet: exact eager math, counted
    plain = copy.deepcopy(model).eval()
    for batch in ({"input_ids": ids},
                  {k: v.to(device) for k, v in packed_batch(False).items() if k != "labels"}):
        aehf.reset_counts()
        torch.manual_seed(9)
        a = model(**batch, use_cache=False).logits
        counts = aehf.fallback_counts()
        assert counts["kernel" if on_kernels else "dropout"] == 2 and sum(counts.values()) == 2, counts
        torch.manual_seed(9)
        assert torch.equal(model(**batch, use_cache=False).logits, a)  # the torch seed decides the masks
        torch.manual_seed(10)
        b = model(**batch, use_cache=False).logits
        c = plain(**batch, use_cache=False).logits  # eval: no dropout
        assert (a - b).abs().max() > 1e-2 and (a - c).abs().max() > 1e-2  # dropout is applied
        a.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        model.zero_grad()
    # eval mode: exactly the eager model
    ref = build("llama", "eager", device, cfg).eval()
    ref.load_state_dict(model.state_dict())
    assert_close(plain(input_ids=ids).logits, ref(input_ids=ids).logits, "eval")


def test_sinks_run_in_the_kernels(device):
    """gpt-oss's s_aux reaches the op as sinks: sinks large enough to bind change the logits
    (so dropped sinks would fail), and ours still match eager, sinks' gradients included."""
    cfg, layers, _ = family_config("gpt_oss")
    ref, ours = pair("gpt_oss", "eager", device)
    with torch.no_grad():
        for model in (ref, ours):
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(3.0)
    ids, _ = inputs("gpt_oss", False, device)
    aehf.reset_counts()
    a, b = ref(input_ids=ids).logits, ours(input_ids=ids).logits
    assert_close(b, a, "gpt_oss logits with sinks")
    a.sum().backward(), b.sum().backward()
    for lr, lo in zip(ref.model.layers, ours.model.layers):
        assert_close(lo.self_attn.sinks.grad, lr.self_attn.sinks.grad, "sinks grad")
    assert aehf.fallback_counts()["kernel"] == layers
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.self_attn.sinks.fill_(-30.0)  # no sink at all
        assert (ours(input_ids=ids).logits - b).abs().max() > 1e-2
