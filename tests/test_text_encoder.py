"""Text encoder and tokenizer against transformers on the same weights."""
import logging

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mobilediffusion.loading import load_text_encoder
from mobilediffusion.text_encoder import PACKAGED_TOKENIZER, TextEncoder
from mobilediffusion.config import TextEncoderConfig

PROMPTS = [
    "a photo of a cat",
    "A red circle, in the top-left; on a WHITE background!!",
    "naïve café — crème brûlée 🍮 (très jolie)",
    "",
    " ".join(["astronaut riding a horse"] * 30),  # > 77 tokens
]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference_tokenizer():
    return CLIPTokenizer.from_pretrained(str(PACKAGED_TOKENIZER))


def test_known_ids():
    # CLIP's BPE ids for these words are well known: a=320, photo=1125, of=539, cat=2368
    ids = TextEncoder(TextEncoderConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                                        num_attention_heads=1)).tokenize(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()  # padded with <|endoftext|>


def test_ids_equal_clip_tokenizer(reference_tokenizer, caplog):
    enc = TextEncoder(TextEncoderConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1))
    with caplog.at_level(logging.WARNING, logger="mobilediffusion.text_encoder"):
        ids = enc.tokenize(PROMPTS)
    ref = reference_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids)
    assert ids[-1, -1].item() == 49407  # the long prompt keeps its EOS after truncation
    warnings = [r for r in caplog.records if "longer than" in r.getMessage()]
    assert len(warnings) == 1  # only the long prompt warns


def _random_clip(cfg: CLIPTextConfig, tmp_path):
    torch.manual_seed(0)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # no parameter keeps a trivial initial value
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    "act,layers,width,heads",
    [("quick_gelu", 2, 32, 4), ("gelu", 3, 48, 3)],  # ViT-L/14-like, OpenCLIP-H-like (SD2)
)
def test_encoder_matches_transformers(tmp_path, reference_tokenizer, act, layers, width, heads):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act=act)
    ref = _random_clip(cfg, tmp_path)
    enc = load_text_encoder(tmp_path)
    assert enc.config.hidden_act == act and enc.config.num_hidden_layers == layers
    ids = enc.tokenize(PROMPTS)
    with torch.no_grad():
        ours = enc.encode(ids)
        theirs = ref(input_ids=ids).last_hidden_state
    assert ours.shape == (len(PROMPTS), 77, width)
    assert rel_err(ours, theirs) <= 1e-5


def test_checkpoint_that_does_not_fit(tmp_path):
    from mobilediffusion.errors import CheckpointError
    from mobilediffusion.weights.keymap import load_state

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    state = CLIPTextModel(cfg).state_dict()
    enc = TextEncoder(TextEncoderConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2))
    from mobilediffusion.weights.text_keys import clip_text_keymap

    with pytest.raises(CheckpointError, match="fc1.weight"):
        load_state(enc.model, state, clip_text_keymap(enc.key_prefix), what="text encoder")


@pytest.mark.parametrize("saved_prefix", ["text_model.", ""])
def test_both_key_spellings_load(saved_prefix):
    """Released SD checkpoints say text_model.*, transformers 5 saves bare names: both load."""
    from mobilediffusion.weights.keymap import load_state
    from mobilediffusion.weights.text_keys import clip_text_keymap

    cfg = TextEncoderConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    src = TextEncoder(cfg)
    state = {saved_prefix + k.removeprefix("text_model."): v for k, v in src.model.state_dict().items()}
    state[saved_prefix + "embeddings.position_ids"] = torch.arange(77)[None]  # as older exports saved it
    dst = TextEncoder(cfg)
    load_state(dst.model, state, clip_text_keymap(dst.key_prefix), what="text encoder")
    ids = src.tokenize(["a cat"])
    assert torch.equal(src.encode(ids), dst.encode(ids))


# --------------------------------------------------------------------------- long prompts, emphasis (ComfyUI's rules)
@pytest.mark.parametrize("text,expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (red:1.2) cat", [("a ", 1.0), ("red", 1.2), (" cat", 1.0)]),
    ("(big)", [("big", 1.1)]),
    ("((big))", [("big", 1.1 * 1.1)]),
    ("((big):0.5)", [("big", 0.5 * 1.1)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 2.0), (" c", 0.5)]),
    (r"\(literal\) (x:2)", [("(literal) ", 1.0), ("x", 2.0)]),
    ("(a:b)", [("a:b", 1.1)]),  # not a number after the last colon: (...) only
    ("(time: 12:30)", [("time: 12", 30.0)]),  # the last colon counts
    ("unclosed (paren", [("unclosed ", 1.0), ("(paren", 1.0)]),
    ("stray) paren", [("stray) paren", 1.0)]),
    ("", []),
])
def test_parse_weights(text, expected):
    from mobilediffusion.prompts import parse_weights

    got = parse_weights(text)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_chunks_follow_comfyui_rules():
    """75 tokens per chunk with BOS/EOS; a short word that does not fit moves whole to the next chunk (the chunk
    is padded); a word of 8+ tokens is split at the boundary."""
    from mobilediffusion.prompts import MAX_WORD_LENGTH, chunk

    kw = dict(bos=1, eos=2, pad=0, max_length=10)  # 8 tokens per chunk
    w = lambda ids, weight=1.0: [(i, weight) for i in ids]  # noqa: E731
    ids = lambda chunks: [[t for t, _ in c] for c in chunks]  # noqa: E731
    assert ids(chunk([], **kw)) == [[1, 2, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert ids(chunk([w(range(10, 18))], **kw)) == [[1, *range(10, 18), 2]]  # exactly full: no second chunk
    # 6 tokens, then a 3-token word: it moves (padded chunk), then the rest
    assert ids(chunk([w(range(10, 16)), w([20, 21, 22])], **kw)) == [[1, *range(10, 16), 2, 0, 0],
                                                                       [1, 20, 21, 22, 2, 0, 0, 0, 0, 0]]
    # a word of MAX_WORD_LENGTH tokens is split instead
    big = list(range(30, 30 + MAX_WORD_LENGTH))
    assert ids(chunk([w(range(10, 16)), w(big)], **kw)) == [[1, *range(10, 16), 30, 31, 2],
                                                             [1, *range(32, 38), 2, 0, 0]]
    weights = [[x for _, x in c] for c in chunk([w([5, 6], 1.5)], **kw)]
    assert weights == [[1.0, 1.5, 1.5] + [1.0] * 7]  # BOS/EOS/padding keep weight 1


def test_long_weighted_prompt_equals_transformers_chunked(tmp_path, reference_tokenizer):
    """A ~200-token prompt with emphasis: each chunk through transformers' CLIPTextModel on the same weights, the
    weights applied against the empty prompt (ComfyUI's formula), concatenated; and contexts of different lengths
    batch by repetition."""
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
    ref = _random_clip(cfg, tmp_path)
    enc = load_text_encoder(tmp_path)
    prompt = ("a (majestic:1.3) lighthouse on a rocky cliff, " * 20) + "((stormy sky)), \\(photo\\)"
    ids, weights = enc.chunks(prompt)
    k = ids.shape[0]
    assert k == 3 and ids.shape == (3, 77)
    assert (ids[:, 0] == 49406).all() and all(49407 in row.tolist() for row in ids)
    assert weights.unique().tolist() == pytest.approx([1.0, 1.21, 1.3])
    # the reference: the plain (unweighted, unparenthesised) text tokenized by CLIPTokenizer gives the same tokens
    plain = ("a majestic lighthouse on a rocky cliff, " * 20) + "stormy sky, (photo)"
    flat = reference_tokenizer(plain)["input_ids"][1:-1]
    ours = [t for row in ids.tolist() for t in row if t not in (49406, 49407)]
    assert ours == flat
    with torch.no_grad():
        z = ref(input_ids=ids).last_hidden_state  # (3, 77, D)
        empty = ref(input_ids=reference_tokenizer([""], padding="max_length", max_length=77,
                                                  return_tensors="pt").input_ids).last_hidden_state  # (1, 77, D)
        w = weights[..., None]
        expected = torch.where(w != 1, (z - empty) * w + empty, z).reshape(1, 3 * 77, -1)
        got = enc.encode_prompts([prompt])
        assert got.shape == (1, 231, 32) and rel_err(got, expected) <= 1e-5
        # a batch of a long and a short prompt: each repeated to the common length (231)
        both = enc.encode_prompts([prompt, "a cat"])
        short = ref(input_ids=reference_tokenizer(["a cat"], padding="max_length", max_length=77,
                                                  return_tensors="pt").input_ids).last_hidden_state
        assert both.shape == (2, 231, 32)
        assert rel_err(both[1], short[0].repeat(3, 1)) <= 1e-5 and rel_err(both[:1], expected) <= 1e-5


def test_repeated_context_gives_the_same_unet_output():
    """Why contexts of different lengths may be repeated to a common one: cross-attention over a context repeated
    n times equals attention over it once, so a guided batch [short uncond, long cond] is exact."""
    from mobilediffusion.guidance import guided_model
    from mobilediffusion.pipeline import build_pipeline
    from mobilediffusion.presets import PRESETS

    pipe = build_pipeline(PRESETS["tiny"], seed=1)
    x = torch.randn(1, pipe.config.latent_channels, 16, 16)
    cond = pipe.text_encoder.encode_prompts(["a " + "long " * 90 + "prompt"])  # 2 chunks
    uncond = pipe.text_encoder.encode_prompts([""])  # 1 chunk
    t = torch.tensor([500.0])
    with torch.no_grad():
        batched = guided_model(pipe.unet, [(cond, 1.0)], [(uncond, 1.0)], 3.0)(x, t)
        u, c = pipe.unet(x, t, uncond).float(), pipe.unet(x, t, cond).float()
    assert rel_err(batched, u + 3.0 * (c - u)) <= 1e-5
